"""Multi-head Latent Attention over a latent KV cache.

Per token and layer the cache holds only c_KV (kv_lora_rank values, after kv_norm) and the shared
rotary key (qk_rope_head_dim values, already rotated): 576 values for DeepSeek-V3 instead of
2 x 128 heads x 192.

Two paths compute the same attention:
- naive (prefill): expand c_KV into per-head keys and values with W_UKV, then ordinary attention;
- absorbed (decode): fold W_UK into the query and W_UV into the output, and attend directly over
  the latent cache, so per step nothing per-head is materialised for past tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import RMSNorm, RotaryEmbedding


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        qk_head_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(cfg.hidden_size, self.n_heads * qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)

    def _queries(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding):
        B, S, _ = x.shape
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, rotary(q_rope, positions)  # [B, S, H, nope], [B, S, H, rope]

    def latents(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        """[B, S, D] -> [B, S, kv_lora_rank + rope]: exactly what the cache stores for these tokens."""
        kv = self.wkv_a(x)
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_norm(c_kv), rotary(k_rope, positions)], dim=-1)

    def _split_wkv_b(self):
        w = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]  # W_UK [H, nope, C], W_UV [H, v, C]

    def forward_naive(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, latent: torch.Tensor
    ) -> torch.Tensor:
        """Prefill of fresh sequences: attend causally among the S new tokens.

        x: [B, S, D]; latent: [B, S, C + R] from `latents` (the caller also writes it to the cache).
        """
        B, S, _ = x.shape
        q_nope, q_rope = self._queries(x, positions, rotary)
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(c_kv).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, S, nope+rope]
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.softmax_scale)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))

    def forward_absorbed(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        context: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attention over latent context (decode, or prefill that continues a sequence).

        x: [B, S, D] new tokens; context: [B, T, C + R] latents of every attended position
        (new tokens included); mask: [B, S, T] bool, True where attention is allowed.
        """
        B, S, _ = x.shape
        q_nope, q_rope = self._queries(x, positions, rotary)
        w_uk, w_uv = self._split_wkv_b()
        c_kv, k_rope = context.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [B, S, H, C]
        scores = torch.einsum("bshc,btc->bsht", q_latent, c_kv) + torch.einsum("bshr,btr->bsht", q_rope, k_rope)
        scores = scores.float() * self.softmax_scale
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1).to(x.dtype)  # [B, S, H, T]
        out_latent = torch.einsum("bsht,btc->bshc", probs, c_kv)
        out = torch.einsum("bshc,hdc->bshd", out_latent, w_uv)  # [B, S, H, v]
        return self.wo(out.reshape(B, S, self.n_heads * self.v_dim))
