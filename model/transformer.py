"""DeepSeek-V2/V3 decoder: embeddings, MLA + (dense MLP | MoE) layers, final norm, LM head."""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.kv_cache import LatentKVCache
from model.layers import MLP, RMSNorm, RotaryEmbedding
from model.mla import MLA
from model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, with_routed_experts: bool):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = (
            MoE(cfg, layer, with_routed_experts) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        cache: torch.Tensor,
        write_slots: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """x: [B, S, D]; cache: this layer's pool [N, C+R]; write_slots: [B, S] where the new
        latents go; context: None for fresh prefill, else ([B, T] slot ids, [B, S, T] mask)."""
        h = self.attn_norm(x)
        latent = self.attn.latents(h, positions, rotary)  # [B, S, C+R]
        cache[write_slots] = latent.to(cache.dtype)
        if context is None:
            a = self.attn.forward_naive(h, positions, rotary, latent)
        else:
            index, mask = context
            a = self.attn.forward_absorbed(h, positions, rotary, cache[index].to(h.dtype), mask)
        x = x + a
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, with_routed_experts: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_interleave)
        self.layers = nn.ModuleList(Block(cfg, i, with_routed_experts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, capacity_tokens: int, block_size: int = 16) -> LatentKVCache:
        p = self.head.weight
        return LatentKVCache(self.cfg.num_hidden_layers, capacity_tokens, self.cfg.kv_cache_dim, p.dtype, p.device, block_size)

    def _run(self, tokens, positions, cache: LatentKVCache, write_slots, context, all_logits: bool) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, positions, self.rotary, cache.pool[block.layer], write_slots, context)
        if not all_logits:
            x = x[:, -1:]
        return self.head(self.norm(x)).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: LatentKVCache, seq: object, all_logits: bool = False) -> torch.Tensor:
        """Fresh sequence: tokens [S] -> logits [S, V] (or [1, V] for the last token only).

        The sequence must already hold cache blocks for at least S tokens.
        """
        S = tokens.numel()
        positions = torch.arange(S, device=tokens.device)[None]
        slots = cache.slots(seq, 0, S)[None]
        return self._run(tokens[None], positions, cache, slots, None, all_logits)[0]

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, cache: LatentKVCache, seq: object, start: int, all_logits: bool = False) -> torch.Tensor:
        """Continue a sequence that has `start` tokens cached: tokens [S] -> logits, through the
        absorbed path over the latent cache (chunked prefill; `start=0` redoes a prefill that way)."""
        S = tokens.numel()
        positions = torch.arange(start, start + S, device=tokens.device)[None]
        write_slots = cache.slots(seq, start, start + S)[None]
        index = cache.slots(seq, 0, start + S)[None]  # [1, T]
        causal = torch.ones(S, start + S, dtype=torch.bool, device=tokens.device).tril(start)[None]  # [1, S, T]
        return self._run(tokens[None], positions, cache, write_slots, (index, causal), all_logits)[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: LatentKVCache, seqs: list[object], lengths: list[int]) -> torch.Tensor:
        """One token for each of B sequences: tokens [B] at positions `lengths` -> logits [B, V].

        lengths[i] is how many tokens sequence i has in the cache before this step.
        """
        positions = torch.tensor(lengths, device=tokens.device)[:, None]  # [B, 1]
        write_slots = torch.stack([cache.slots(s, n, n + 1) for s, n in zip(seqs, lengths)])  # [B, 1]
        index, valid = cache.context(seqs, [n + 1 for n in lengths])
        return self._run(tokens[:, None], positions, cache, write_slots, (index, valid[:, None, :]), False)[:, 0]
