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
from model.layers import RMSNorm, rotate


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
        # (W_UK [H, nope, C], W_UV^T [H, C, v]) in the attention dtype, once `prepare_decode` ran
        self.absorbed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._absorbed_key: tuple | None = None  # the wkv_b `absorbed` was built from

    def _queries(self, x: torch.Tensor, rot: torch.Tensor):
        B, S, _ = x.shape
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, rotate(q_rope, rot)  # [B, S, H, nope], [B, S, H, rope]

    def latents(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, kv_lora_rank + rope]: exactly what the cache stores for these tokens.

        rot: [B, S, R, R] from `RotaryEmbedding.rotation` for these tokens' positions."""
        kv = self.wkv_a(x)
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_norm(c_kv), rotate(k_rope, rot)], dim=-1)

    def _split_wkv_b(self):
        w = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]  # W_UK [H, nope, C], W_UV [H, v, C]

    def prepare_decode(self, dtype: torch.dtype) -> None:
        """Lay W_UK and W_UV out for the absorbed path, so a decode step (and a graph built from
        it) reads them instead of re-laying them out per layer. Kept while wkv_b stays the same
        (tensor and in-place version): graphs built earlier hold these very tensors. A later
        change to wkv_b needs another call."""
        w = self.wkv_b.weight
        key = (w.data_ptr(), w._version, dtype, w.device)
        if self._absorbed_key != key:
            self.absorbed = self.absorb(dtype)
            self._absorbed_key = key

    def absorb(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, C], W_UV^T [H, C, v]) contiguous in `dtype`."""
        w_uk, w_uv = self._split_wkv_b()
        return w_uk.to(dtype).contiguous(), w_uv.transpose(1, 2).to(dtype).contiguous()

    def forward_naive(self, x: torch.Tensor, rot: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Prefill of fresh sequences: attend causally among the S new tokens.

        x: [B, S, D]; latent: [B, S, C + R] from `latents` (the caller also writes it to the cache).
        """
        B, S, _ = x.shape
        q_nope, q_rope = self._queries(x, rot)
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(c_kv).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, S, nope+rope]
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.softmax_scale)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))

    def forward_absorbed(
        self, x: torch.Tensor, rot: torch.Tensor, context: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attention over latent context (decode, or prefill that continues a sequence).

        x: [B, S, D] new tokens; context: [B, T, C + R] latents of every attended position (new
        tokens included), in the dtype the attention math runs in (fp32 on CPU: bf16 batched
        matmuls are slow there); bias: [B, S, T] additive mask in that dtype, 0 where attention
        is allowed and -inf where not.
        Every contraction is one bmm: "bshd,hdc->bshc" (absorb W_UK), "b(hs)c,btc->b(hs)t"
        (scores over latent + rope key at once), "b(hs)t,btc->b(hs)c", "bshc,hcv->bshv" (W_UV).
        """
        B, S, _ = x.shape
        H, C = self.n_heads, self.kv_lora_rank
        dtype = context.dtype
        w_uk, w_uv_t = self.absorbed if self.absorbed is not None else self.absorb(dtype)
        q_nope, q_rope = self._queries(x, rot)
        q_nope = q_nope.to(dtype).reshape(B * S, H, self.nope_dim).transpose(0, 1)  # [H, B*S, nope]
        q_latent = torch.bmm(q_nope, w_uk).view(H, B, S, C).transpose(0, 1)  # [B, H, S, C]
        q = torch.cat([q_latent, q_rope.to(dtype).transpose(1, 2)], dim=-1).view(B, H * S, C + self.rope_dim)
        # rows ordered (head, position): the mask repeats once per head (broadcasts when S == 1)
        scores = torch.baddbmm(bias if S == 1 else bias.repeat(1, H, 1), q, context.transpose(1, 2), alpha=self.softmax_scale)
        probs = scores.softmax(dim=-1)  # [B, H*S, T]
        out_latent = torch.bmm(probs, context[..., :C])  # [B, H*S, C]
        out_latent = out_latent.view(B, H, S, C).permute(1, 0, 2, 3).reshape(H, B * S, C)
        out = torch.bmm(out_latent, w_uv_t)  # [H, B*S, v]
        out = out.view(H, B, S, self.v_dim).permute(1, 2, 0, 3).reshape(B, S, H * self.v_dim)
        return self.wo(out.to(x.dtype))
