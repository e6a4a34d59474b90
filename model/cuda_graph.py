"""Decode steps replayed from CUDA graphs (issue 7): one graph per (batch, context) bucket.

A decode step is captured once per bucket over static input buffers and replayed for every
later step of that shape: the step has no host-device synchronisation and no allocation that
depends on routing (experts run as grouped GEMMs over fixed [B*K] rows, attention over a fixed
[B, T] gather table with an additive -inf mask), so one replay costs a handful of microseconds
of CPU instead of ~1,000 kernel launches. Prefill stays eager and writes the same latent cache.

Rows of a bucket past the real batch decode a dummy token into a scratch cache block, so they
never touch a real sequence's latents.

Where Triton is available, each layer runs through `torch.compile(Block.forward)` (inductor,
static shapes) inside the graph: it fuses the norms, rotary, gating and expert bookkeeping, which
halved the kernels a V2-Lite-sized step launches (docs/performance.md). Every
layer of a kind shares one compiled graph per bucket; compiling costs ~10-30 s on a bucket's
first use, so the decoder logs it.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from model.kv_cache import LatentKVCache
from model.transformer import Block, Transformer

log = logging.getLogger("moe.model")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SCRATCH = ("cuda-graph-scratch",)  # cache owner of the padding rows' block


def bucket(n: int, sizes) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


class GraphDecoder:
    """`decode(tokens, seqs, lengths)` with the semantics of `Transformer.decode`, replayed."""

    def __init__(self, model: Transformer, cache: LatentKVCache, min_context: int = 256, compile_layers: bool | None = None):
        if cache.pool.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.model, self.cache = model, cache
        if compile_layers is None:
            compile_layers = can_compile()
        self.run_block = compiled_block_forward() if compile_layers else None
        self.device = cache.pool.device
        model.prepare_decode()  # the compiled layers read the absorbed weights, not rebuild them
        self.context_buckets = tuple(min_context << i for i in range(32) if min_context << i < 2 * cache.capacity_tokens)
        cache.allocate(SCRATCH, cache.block_size)
        self.scratch_slot = int(cache.slots(SCRATCH, 0, 1)[0])
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()  # all buckets share one memory pool

    def handles(self, n: int) -> bool:
        """Whether a decode step of n sequences replays a graph: when the experts are in process."""
        return self.model.experts_in_process

    def _static_inputs(self, B: int, T: int) -> dict[str, torch.Tensor]:
        bias = torch.full((B, 1, T), float("-inf"), dtype=self.model.attention_dtype, device=self.device)
        bias[:, :, 0] = 0
        return dict(
            tokens=torch.zeros(B, dtype=torch.long, device=self.device),
            positions=torch.zeros(B, 1, dtype=torch.long, device=self.device),
            write_slots=torch.full((B, 1), self.scratch_slot, dtype=torch.long, device=self.device),
            index=torch.full((B, T), self.scratch_slot, dtype=torch.long, device=self.device),
            bias=bias,
        )

    @torch.inference_mode()
    def _capture(self, B: int, T: int):
        started = time.monotonic()
        log.info("capturing the decode graph for batch %d, context %d%s", B, T, " (compiling layers)" if self.run_block else "")
        inputs = self._static_inputs(B, T)
        step = lambda: self.model.decode_step(pool=self.cache.pool, run_block=self.run_block, **inputs)  # noqa: E731
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, cuBLAS workspaces
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()  # [B, V]
        log.info("decode graph for batch %d, context %d ready in %.1f s", B, T, time.monotonic() - started)
        return graph, inputs, logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, seqs: list[object], lengths: list[int]) -> torch.Tensor:
        """tokens [n]; lengths[i] cached tokens of seqs[i] before this step -> logits [n, V]
        (a view into the graph's output buffer: valid until the next call)."""
        n = len(seqs)
        B = bucket(n, BATCH_BUCKETS)
        T = bucket(max(lengths) + 1, self.context_buckets)
        if (B, T) not in self.graphs:
            self.graphs[(B, T)] = self._capture(B, T)
        graph, inputs, logits = self.graphs[(B, T)]
        index, bias = self.cache.gather_table(seqs, [length + 1 for length in lengths], self.model.attention_dtype)
        width = index.shape[1]
        positions = torch.tensor(lengths, device=self.device)
        inputs["tokens"][:n].copy_(tokens)
        inputs["positions"][:n, 0].copy_(positions)
        inputs["index"][:n, :width].copy_(index)
        inputs["index"][:n, width:].fill_(self.scratch_slot)
        inputs["bias"][:n, 0, :width].copy_(bias)
        inputs["bias"][:n, 0, width:].fill_(float("-inf"))
        inputs["write_slots"][:n].copy_(index.gather(1, positions[:, None]))
        if n < B:  # padding rows: a dummy token attending to and writing only the scratch block
            inputs["tokens"][n:].zero_()
            inputs["positions"][n:].zero_()
            inputs["index"][n:].fill_(self.scratch_slot)
            inputs["write_slots"][n:].fill_(self.scratch_slot)
            inputs["bias"][n:].fill_(float("-inf"))
            inputs["bias"][n:, :, 0] = 0
        graph.replay()
        return logits[:n]


def can_compile() -> bool:
    """Inductor's CUDA kernels need Triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def compiled_block_forward():
    """`Block.forward` compiled for static shapes, one per process so that every decoder reuses
    what others compiled; every bucket x layer kind x weight dtype is an entry of its own."""
    raise_recompile_limit()
    return torch.compile(Block.forward, dynamic=False)


def raise_recompile_limit() -> None:
    """Dynamo keys its cache on the compiled function, one entry per guarded variant (shape
    bucket, layer kind, model): the default limit of 8 would silently send later ones back to
    eager code."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 1024))
