"""CPU decode steps of up to 16 sequences through a graph compiled by torch.compile (inductor).

A small CPU decode step is bound by dispatching ~600 tensor ops of a few microseconds each and
by weight reads that MKL's small-M GEMMs stream slowly. In the compiled graph the small ops
fuse, and every weight is multiplied as a product summed over its input dimension (the
streaming variants of model/kernels/cpu.py, installed while a graph is traced: linears for up to
STREAMED_ROWS rows, and `pair_experts` for the routed experts, where each (token, expert) pair
streams its expert's weights without gathering them), which inductor turns into kernels that
stream weights several times faster. Figures: docs/performance.md.

The graph for more than STREAMED_ROWS sequences is compiled with inductor's freezing: weights
become constants of the graph, and its linears run on oneDNN-packed copies, although each
(token, expert) pair reads its expert's weights again (sorted by expert, mostly from cache).
Frozen weights are read once, at compile time, and graphs are kept per model object: a model
whose weights change afterwards must be loaded again.

Every graph's wrapper is generated in C++, and after a decoder's first step of a graph dynamo's
guards are no longer evaluated for it (see `compiled_steps`): both cut the Python left around
a step. The same skipping is what lets the graph keep the streaming variants it traced while the
model's eager steps use the eager kernels: a decoder installs the variants around each guarded
(first) step only.

The graph only reads the cache pool and returns the step's latents, which are stored after it:
a compiled graph that wrote the pool would copy all of it every step. Shapes are dynamic (batch,
context, pool size), so one graph serves every context length: compiling takes ~20-45 s each
for single sequences, for 2 to STREAMED_ROWS and for more of them, on first use. Steps past
`max_batch` stay eager, where the expert loop reads each touched expert once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import weakref

import torch
import torch._inductor.config
import torch.fx.experimental._config

from model.cuda_graph import raise_recompile_limit
from model.kernels.cpu import STREAMED_ROWS, compiled_variants
from model.kv_cache import LatentKVCache
from model.transformer import Transformer, store_latents

# the largest decode step that runs compiled: past it the eager expert loop, which reads each
# touched expert once, catches up with the pairs' repeated reads (docs/performance.md)
COMPILED_BATCH = 16

log = logging.getLogger("moe.model")


class CompiledDecoder:
    """`decode(tokens, seqs, lengths)` with the semantics of `Transformer.decode`."""

    def __init__(self, model: Transformer, cache: LatentKVCache, max_batch: int = COMPILED_BATCH):
        if cache.pool.device.type != "cpu":
            raise ValueError("CompiledDecoder runs on CPU; CUDA devices replay graphs (GraphDecoder)")
        self.model, self.cache, self.max_batch = model, cache, max_batch
        self.compiled: set[str] = set()  # graphs (`graph_for`) this decoder has run once, guarded
        model.prepare_decode()

    @staticmethod
    def available() -> bool:
        """Inductor's CPU kernels are C++ compiled at run time."""
        return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))

    def handles(self, n: int) -> bool:
        """Whether a decode step of n sequences runs compiled: at most max_batch of them, with
        experts a graph can call (`Transformer.experts_traceable`)."""
        return n <= self.max_batch and self.model.experts_traceable

    def warm_up(self, largest: int) -> None:
        """Compile, before any request, every graph that steps of up to `largest` sequences
        use: one step of 1, up to STREAMED_ROWS and up to `largest` scratch sequences of one
        token each, whose cache blocks are freed afterwards. The steps' logits are discarded."""
        sizes = sorted({min(n, largest, self.max_batch) for n in (1, STREAMED_ROWS, self.max_batch)})
        for i, n in enumerate(sizes, 1):
            log.info("warming up CPU decode graph %d of %d (%s)", i, len(sizes), graph_for(n))
            seqs = [("warm-up", k) for k in range(n)]
            for seq in seqs:
                self.cache.allocate(seq, 2)
            try:
                self.decode(torch.zeros(n, dtype=torch.long), seqs, [1] * n)
            finally:
                for seq in seqs:
                    self.cache.free(seq)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, seqs: list[object], lengths: list[int]) -> torch.Tensor:
        """tokens [n]; lengths[i] cached tokens of seqs[i] before this step -> logits [n, V]."""
        index, bias = self.cache.gather_table(seqs, [n + 1 for n in lengths], self.model.attention_dtype)  # [B, T]
        positions = torch.tensor(lengths)[:, None]  # [B, 1]
        graph = graph_for(len(seqs))
        first, started = graph not in self.compiled, time.monotonic()
        if not first:
            # this decoder's model and graph were checked by dynamo's guards on the first step
            # (see `compiled_steps`); evaluating them again cost a noticeable share of a step
            context = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        else:
            log.info("first CPU decode step for %s: compiles the graph unless this model has it (~20-45 s)", graph)
            # read while tracing: the norms' eps and the gates' scales become constants of the
            # graph (as dynamic floats, each was a tensor built before every step); past
            # STREAMED_ROWS, the parameters too. Without duck shaping, a context length that
            # happens to equal a weight's size (the head count, say) is not made one with it and
            # then specialised: the graph would fail on the next length, guards being skipped
            context = contextlib.ExitStack()
            # the graph traces, and its guards check, the compiled CPU kernels
            context.enter_context(compiled_variants(self.model))
            context.enter_context(torch._dynamo.config.patch(specialize_float=True))
            context.enter_context(torch.fx.experimental._config.patch(use_duck_shape=False))
            if len(seqs) > STREAMED_ROWS:
                context.enter_context(torch._inductor.config.patch(freezing=True))
        step = compiled_steps(self.model)[graph]
        with context:
            logits, latents = step(self.model, tokens, positions, self.cache.pool, index, bias[:, None, :])
        if first:
            self.compiled.add(graph)
            log.info("CPU decode step ready in %.1f s", time.monotonic() - started)
        store_latents(self.cache.pool, index.gather(1, positions), latents)
        return logits


def graph_for(n: int) -> str:
    """Which compiled graph a step of n sequences runs: torch.compile specialises size-1
    dimensions, and linears stream weights for up to STREAMED_ROWS rows only."""
    if n == 1:
        return "one sequence"
    return f"2 to {STREAMED_ROWS} sequences" if n <= STREAMED_ROWS else f"more than {STREAMED_ROWS} sequences"


_compiled_steps: weakref.WeakKeyDictionary[Transformer, dict[str, object]] = weakref.WeakKeyDictionary()


def compiled_steps(model: Transformer) -> dict[str, object]:
    """`Transformer.decode_pure` compiled with dynamic shapes, one per graph (`graph_for`) and
    model, shared by the model's decoders.

    Each is a region of dynamo's cache of its own (`isolate_recompiles`), holding only that
    model's variants of that graph: after a decoder's first, guarded step of a graph, the graph's
    later steps skip guard evaluation and cannot be served another model's or graph's code. Every
    wrapper is generated in C++ (the Python one cost a sizeable share of a step); the graph for
    more than STREAMED_ROWS sequences is frozen (see the module docstring)."""
    if model not in _compiled_steps:
        raise_recompile_limit()
        _compiled_steps[model] = {
            graph_for(n): torch.compile(
                Transformer.decode_pure, dynamic=True, fullgraph=True, isolate_recompiles=True,
                options={"cpp_wrapper": True},
            )
            for n in (1, STREAMED_ROWS, STREAMED_ROWS + 1)
        }
    return _compiled_steps[model]
