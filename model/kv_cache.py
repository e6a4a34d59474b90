"""Latent KV cache pool: fixed-size blocks of per-token latents, shared by many sequences.

The pool is allocated once ([layers, blocks * block_size, kv_lora_rank + rope]) so its address
never changes; a sequence owns a list of blocks reserved up front for its whole budget
(prompt + max new tokens), so a running sequence can never run out of cache mid-generation.
"""

from __future__ import annotations

import torch


class CacheFull(Exception):
    """Not enough free blocks for a sequence's budget right now."""


class LatentKVCache:
    def __init__(
        self,
        num_layers: int,
        capacity_tokens: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        block_size: int = 16,
    ):
        if capacity_tokens < block_size:
            raise ValueError(f"KV cache capacity {capacity_tokens} tokens is below one block ({block_size})")
        self.block_size = block_size
        self.num_blocks = capacity_tokens // block_size
        self.pool = torch.zeros(num_layers, self.num_blocks * block_size, dim, dtype=dtype, device=device)
        self._free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self._slots: dict[object, torch.Tensor] = {}  # sequence -> [reserved tokens] flat slot ids

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        return len(self._free_blocks) * self.block_size

    @property
    def used_tokens(self) -> int:
        return self.capacity_tokens - self.free_tokens

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def fits(self, n_tokens: int) -> bool:
        return self.blocks_needed(n_tokens) <= len(self._free_blocks)

    def allocate(self, seq: object, n_tokens: int) -> None:
        if seq in self._slots:
            raise ValueError(f"sequence {seq!r} already holds cache blocks")
        need = self.blocks_needed(n_tokens)
        if need > len(self._free_blocks):
            raise CacheFull(f"needs {need * self.block_size} cache tokens, {self.free_tokens} free")
        blocks = torch.tensor([self._free_blocks.pop() for _ in range(need)], dtype=torch.long)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        slots = (blocks[:, None] * self.block_size + offsets).reshape(-1)[:n_tokens]
        self._slots[seq] = slots.to(self.pool.device)

    def free(self, seq: object) -> None:
        slots = self._slots.pop(seq, None)
        if slots is None:
            return
        blocks = torch.unique(slots // self.block_size).tolist()
        self._free_blocks.extend(reversed(blocks))

    def holds(self, seq: object) -> bool:
        return seq in self._slots

    def slots(self, seq: object, start: int, end: int) -> torch.Tensor:
        """Flat pool indices of positions [start, end) of a sequence."""
        table = self._slots[seq]
        if end > table.numel():
            raise IndexError(f"position {end - 1} is past the {table.numel()} tokens reserved for {seq!r}")
        return table[start:end]

    def context(self, seqs: list[object], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather table for a decode batch: ([B, T] slot ids, [B, T] bool valid), T = max length."""
        index, bias = self.gather_table(seqs, lengths, torch.float32)
        return index, bias == 0

    def gather_table(self, seqs: list[object], lengths: list[int], mask_dtype: torch.dtype):
        """As `context`, with the mask additive: ([B, T] slot ids, [B, T] 0 for the first
        lengths[i] positions of row i, -inf for padding). Padding points at slot 0, a valid row."""
        rows = [self._slots[seq][:length] for seq, length in zip(seqs, lengths)]
        longest = max(lengths)
        if min(lengths) == longest:  # nothing to pad (every batch of one): 2 ops instead of 7, ~60 us here
            return torch.stack(rows), torch.zeros(len(seqs), longest, dtype=mask_dtype, device=self.pool.device)
        index = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [B, T]
        pad = torch.arange(longest, device=self.pool.device)[None, :] >= torch.tensor(lengths, device=self.pool.device)[:, None]
        bias = torch.zeros(len(seqs), longest, dtype=mask_dtype, device=self.pool.device).masked_fill_(pad, float("-inf"))
        return index, bias
