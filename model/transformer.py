"""DeepSeek-V2/V3 decoder: embeddings, MLA + (dense MLP | MoE) layers, final norm, LM head."""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.kv_cache import LatentKVCache
from model.layers import MLP, LMHead, RMSNorm, RotaryEmbedding
from model.mla import MLA
from model.moe import ExpertBank, MoE


def attention_dtype(param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Dtype of the absorbed attention math: fp32 on CPU (bf16 batched matmuls there run slower
    than fp32 ones on these small tensors, docs/performance.md), the model's dtype on accelerators."""
    return torch.float32 if device.type == "cpu" else param_dtype


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
        rot: torch.Tensor,
        cache: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, S, D]; rot: [B, S, R, R] rotary matrices of the new positions; cache: this
        layer's pool [N, C+R], only read; context: None for fresh prefill, else ([B, T] slot ids,
        [B, S, T] additive mask in the attention dtype, [B, S] where the new tokens sit in T).
        Returns (x [B, S, D], the new tokens' latents [B, S, C+R] for the caller to store): a
        block that never writes the pool compiles into a graph that does not copy it."""
        h = self.attn_norm(x)
        latent = self.attn.latents(h, rot).to(cache.dtype)  # [B, S, C+R]
        if context is None:
            a = self.attn.forward_naive(h, rot, latent)
        else:
            index, bias, new_at = context
            # index_select, not cache[index]: advanced indexing gathers these rows ~4x slower on CPU
            past = cache.index_select(0, index.reshape(-1)).view(*index.shape, -1)  # [B, T, C+R]
            past.scatter_(1, new_at[..., None].expand_as(latent), latent)
            a = self.attn.forward_absorbed(h, rot, past.to(bias.dtype), bias)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), latent


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, with_routed_experts: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_interleave)
        self.layers = nn.ModuleList(Block(cfg, i, with_routed_experts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, capacity_tokens: int, block_size: int = 16) -> LatentKVCache:
        p = self.head.weight
        return LatentKVCache(self.cfg.num_hidden_layers, capacity_tokens, self.cfg.kv_cache_dim, p.dtype, p.device, block_size)

    @property
    def attention_dtype(self) -> torch.dtype:
        p = self.head.weight
        return attention_dtype(p.dtype, p.device)

    @property
    def experts_in_process(self) -> bool:
        """Whether every MoE block holds its routed experts here (an `ExpertBank`), rather than
        dispatching to remote shards: only then does a decode step fit in one CUDA graph.
        Checked per step, since an attention worker installs its remote experts after load."""
        return all(isinstance(block.ffn.experts, ExpertBank) for block in self.layers if isinstance(block.ffn, MoE))

    @property
    def experts_traceable(self) -> bool:
        """Whether torch.compile can trace every MoE block's dispatch and combine into one
        decode graph: local experts, or remote ones behind custom operators."""
        return all(getattr(block.ffn.experts, "traceable", False) for block in self.layers if isinstance(block.ffn, MoE))

    def prepare_decode(self) -> None:
        """Lay out what the absorbed path reads per layer (`MLA.prepare_decode`), so that decode
        steps, and graphs built from them, read it instead of rebuilding it every step."""
        for block in self.layers:
            block.attn.prepare_decode(self.attention_dtype)

    def forward_pure(self, tokens, positions, pool: torch.Tensor, context, all_logits: bool, run_block=None):
        """The forward pass without side effects: tokens [B, S] at positions [B, S] ->
        (logits [B, S or 1, V] fp32, latents [L, B, S, C+R] of the new tokens, to be stored at
        their slots). pool: [L, N, C+R] latent cache, only read; context as in `Block.forward`;
        run_block(block, x, ...) replaces `block(x, ...)` (a compiled `Block.forward`)."""
        x = self.embed(tokens)
        rot = self.rotary.rotation(positions)  # [B, S, R, R], shared by every layer
        latents = []
        for block in self.layers:
            args = (x, rot, pool[block.layer], context)
            x, latent = block(*args) if run_block is None else run_block(block, *args)
            latents.append(latent)
        if not all_logits:
            x = x[:, -1:]
        return self.head(self.norm(x)), torch.stack(latents)

    def _run(self, tokens, positions, pool, write_slots, context, all_logits: bool, run_block=None) -> torch.Tensor:
        """`forward_pure`, then the new latents stored at write_slots [B, S]."""
        logits, latents = self.forward_pure(tokens, positions, pool, context, all_logits, run_block)
        store_latents(pool, write_slots, latents)
        return logits

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: LatentKVCache, seq: object, all_logits: bool = False) -> torch.Tensor:
        """Fresh sequence: tokens [S] -> logits [S, V] (or [1, V] for the last token only).

        The sequence must already hold cache blocks for at least S tokens.
        """
        S = tokens.numel()
        positions = torch.arange(S, device=tokens.device)[None]
        slots = cache.slots(seq, 0, S)[None]
        return self._run(tokens[None], positions, cache.pool, slots, None, all_logits)[0]

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, cache: LatentKVCache, seq: object, start: int, all_logits: bool = False) -> torch.Tensor:
        """Continue a sequence that has `start` tokens cached: tokens [S] -> logits, through the
        absorbed path over the latent cache (chunked prefill; `start=0` redoes a prefill that way)."""
        S = tokens.numel()
        positions = torch.arange(start, start + S, device=tokens.device)[None]
        write_slots = cache.slots(seq, start, start + S)[None]
        index = cache.slots(seq, 0, start + S)[None]  # [1, T]
        allowed = torch.ones(S, start + S, dtype=torch.bool, device=tokens.device).tril(start)
        bias = torch.zeros(1, S, start + S, dtype=self.attention_dtype, device=tokens.device)
        bias.masked_fill_(~allowed, float("-inf"))  # [1, S, T]
        return self._run(tokens[None], positions, cache.pool, write_slots, (index, bias, positions), all_logits)[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: LatentKVCache, seqs: list[object], lengths: list[int]) -> torch.Tensor:
        """One token for each of B sequences: tokens [B] at positions `lengths` -> logits [B, V].

        lengths[i] is how many tokens sequence i has in the cache before this step. Everything
        that depends only on the batch (positions, gather table, mask, rotary matrices) is built
        once here, not per layer.
        """
        index, bias = cache.gather_table(seqs, [n + 1 for n in lengths], self.attention_dtype)  # [B, T], [B, T]
        positions = torch.tensor(lengths, device=tokens.device)[:, None]  # [B, 1]
        write_slots = index.gather(1, positions)  # [B, 1]
        return self.decode_step(tokens, positions, cache.pool, write_slots, index, bias[:, None, :])

    def decode_step(self, tokens, positions, pool, write_slots, index, bias, run_block=None) -> torch.Tensor:
        """The decode step on tensors alone (what a CUDA graph captures): tokens [B], positions
        [B, 1], pool [L, N, C+R], write_slots [B, 1], index [B, T], bias [B, 1, T] -> logits [B, V]."""
        logits, latents = self.decode_pure(tokens, positions, pool, index, bias, run_block)
        store_latents(pool, write_slots, latents)
        return logits

    def decode_pure(self, tokens, positions, pool, index, bias, run_block=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_step` without storing: -> (logits [B, V], latents [L, B, 1, C+R]); what a CPU
        decoder compiles (see model/compiled_decode.py)."""
        logits, latents = self.forward_pure(tokens[:, None], positions, pool, (index, bias, positions), False, run_block)
        return logits[:, 0], latents


def store_latents(pool: torch.Tensor, slots: torch.Tensor, latents: torch.Tensor) -> None:
    """pool [L, N, C+R]; slots [B, S]; latents [L, B, S, C+R]: every layer's new latents in one copy."""
    pool.index_copy_(1, slots.reshape(-1), latents.flatten(1, 2))
