"""The expert shard's logic (no gRPC): held weights, validation, cross-request batching, load.

    shard = ExpertShard.load(model_dir, experts=[0, 1, 2, 3], recorder=load_recorder).start()
    out = shard.compute(ExpertBatch(layer, hidden, ids, weights))     # [T, H] on its device, blocking
    future = shard.submit(batch)                                      # the same, asynchronous

`submit` validates on the caller's thread against the wire contract (services.wire.batch.validate:
InvalidArgument names the culprit) and queues the
work. One compute thread takes everything queued, groups it by layer, concatenates the tokens,
runs each layer's ExpertBank once and splits the output back to the requests, so frames from
many workers for the same layer become one grouped computation. Load counts go to the
LoadRecorder and Prometheus after the results are handed back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from prometheus_client import Counter, Histogram

from services.common.errors import InvalidArgument, Unavailable
from services.common.logging import event, get_logger
from services.wire.batch import ExpertBatch, Holdings, result_dtype, validate

log = get_logger("expert")

DEFAULT_CAPACITY_TOKENS = 8192

TOKENS = Counter("moe_expert_tokens_total", "Token slots computed, per (layer, logical expert)", ["layer", "expert"])
BATCH_TOKENS = Histogram("moe_expert_batch_tokens", "Tokens in one merged per-layer computation",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))
BATCH_REQUESTS = Histogram("moe_expert_batch_requests", "Requests merged into one per-layer computation",
                           buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
COMPUTE_SECONDS = Histogram("moe_expert_compute_seconds", "Seconds of one merged per-layer computation",
                            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
QUEUE_SECONDS = Histogram("moe_expert_queue_seconds", "Seconds a request waited for the compute thread",
                          buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
REJECTED = Counter("moe_expert_rejected_total", "Requests rejected before compute", ["reason"])


class LoadSink(Protocol):
    """services.common.redis_store.LoadRecorder, or anything with its `add`."""

    def add(self, layer: int, counts: dict[int, int]) -> None: ...


@dataclass
class _Work:
    layer: int
    hidden: torch.Tensor       # [T, H] compute dtype, on the shard's device
    ids: torch.Tensor          # [T, K] int64
    weights: torch.Tensor      # [T, K] float32
    out_dtype: torch.dtype
    future: concurrent.futures.Future
    queued: float              # time.monotonic()


class ExpertShard:
    """The weights of some experts on every MoE layer, computed in merged per-layer batches."""

    def __init__(self, banks: dict[int, torch.nn.Module], *, hidden_size: int, n_routed_experts: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu", recorder: LoadSink | None = None,
                 capacity_tokens: int = DEFAULT_CAPACITY_TOKENS) -> None:
        if not banks:
            raise ValueError("an expert shard needs at least one MoE layer")
        self.banks = dict(sorted(banks.items()))
        self.expert_ids = sorted(next(iter(self.banks.values())).expert_ids)
        self.hidden_size = hidden_size
        self.n_routed_experts = n_routed_experts
        self.dtype = dtype
        self.device = torch.device(device)
        self.recorder = recorder
        self.capacity_tokens = capacity_tokens if capacity_tokens > 0 else 1 << 62
        self.holdings = Holdings(list(self.banks), self.expert_ids, hidden_size, n_routed_experts)
        self._queue: collections.deque[_Work] = collections.deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.computes = 0          # merged per-layer computations run so far
        self.requests_done = 0     # requests answered by those computations

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, experts: list[int], *, dtype: str | torch.dtype | None = None,
             device: str = "cpu", recorder: LoadSink | None = None,
             capacity_tokens: int = DEFAULT_CAPACITY_TOKENS,
             progress: Callable[[int, int, int, int], None] | None = None) -> "ExpertShard":
        """Read only `experts` of every MoE layer; `progress(layer, i, n_layers, bytes)` per layer."""
        from model.checkpoint import load_expert_banks, resolve_dtype
        from model.config import ModelConfig

        cfg = ModelConfig.from_model_dir(model_dir)
        bad = [e for e in experts if not 0 <= e < cfg.n_routed_experts]
        if bad:
            raise ValueError(f"expert ids {bad} outside [0, {cfg.n_routed_experts}) of {model_dir}")
        layers = cfg.moe_layers
        if not layers:
            raise ValueError(f"{model_dir} has no MoE layer")
        banks = {}
        for i, layer in enumerate(layers):  # one layer at a time: progress, and bounded peak memory
            banks.update(load_expert_banks(model_dir, {layer: list(experts)}, dtype=dtype, device=device))
            if progress is not None:
                size = sum(p.numel() * p.element_size() for p in banks[layer].parameters())
                progress(layer, i, len(layers), size)
        return cls(banks, hidden_size=cfg.hidden_size, n_routed_experts=cfg.n_routed_experts,
                   dtype=resolve_dtype(cfg, dtype), device=device, recorder=recorder,
                   capacity_tokens=capacity_tokens)

    @property
    def layers(self) -> list[int]:
        return list(self.banks)

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for bank in self.banks.values() for p in bank.parameters())

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "ExpertShard":
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="expert-compute", daemon=True)
                self._thread.start()
        return self

    def drain(self, timeout: float = 10.0) -> bool:
        """Refuse new work (Unavailable), finish what is queued, stop the thread; True when done."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is None:
            self._fail_queued("expert shard stopped before computing this request")
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._fail_queued("expert shard stopped before computing this request")
        return True

    def _fail_queued(self, reason: str) -> None:
        with self._cv:
            left, self._queue = list(self._queue), collections.deque()
        for work in left:
            if not work.future.done():
                work.future.set_exception(Unavailable(reason))

    # ---- requests -------------------------------------------------------------------------
    def compute(self, batch: ExpertBatch, timeout: float | None = None) -> torch.Tensor:
        """Blocking: [T, H] output on the shard's device, in the hidden's dtype (float32 for
        float8 hidden)."""
        return self.submit(batch).result(timeout)

    def submit(self, batch: ExpertBatch, out_dtype: torch.dtype | None = None) -> concurrent.futures.Future:
        """Validate (InvalidArgument, raised here) and queue; the future's result is [T, H]."""
        try:
            work = self._validate(batch, out_dtype)
        except InvalidArgument:
            REJECTED.labels("invalid").inc()
            raise
        with self._cv:
            if not self._accepting:
                REJECTED.labels("draining").inc()
                raise Unavailable("expert shard is draining; send this layer to another replica")
            self._queue.append(work)
            self._cv.notify()
        return work.future

    def _validate(self, batch: ExpertBatch, out_dtype: torch.dtype | None) -> _Work:
        x, ids = validate(batch, self.holdings, self.dtype)
        return _Work(batch.layer, x.to(self.device), ids.to(self.device), batch.weights.to(self.device),
                     out_dtype or result_dtype(batch.hidden.dtype), concurrent.futures.Future(), time.monotonic())

    # ---- the compute thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return  # stopping and drained
                taken = self._take_locked()
            try:
                self._compute_round(taken)
            except Exception as err:  # noqa: BLE001 - one failed round must not kill the thread
                event(log, "expert compute failed", level=logging.ERROR, exc_info=True,
                      error=f"{type(err).__name__}: {err}")
                for work in taken:
                    if not work.future.done():
                        work.future.set_exception(err)

    def _take_locked(self) -> list[_Work]:
        """Everything queued, up to capacity_tokens (always at least one request)."""
        taken, tokens = [], 0
        while self._queue:
            t = self._queue[0].hidden.shape[0]
            if taken and tokens + t > self.capacity_tokens:
                break
            taken.append(self._queue.popleft())
            tokens += t
        return taken

    def _compute_round(self, taken: list[_Work]) -> None:
        now = time.monotonic()
        by_layer: dict[int, list[_Work]] = {}
        for work in taken:
            QUEUE_SECONDS.observe(now - work.queued)
            by_layer.setdefault(work.layer, []).append(work)
        loads = []
        for layer, works in by_layer.items():
            loads.append((layer, self._compute_layer(layer, works)))
        for layer, ids in loads:  # after every future is resolved: off the requests' latency
            self._record_load(layer, ids)

    def _compute_layer(self, layer: int, works: list[_Work]) -> torch.Tensor:
        started = time.perf_counter()
        if len(works) == 1:
            x, ids, weights = works[0].hidden, works[0].ids, works[0].weights
        else:
            K = max(w.ids.shape[1] for w in works)
            x = torch.cat([w.hidden for w in works])
            ids = torch.cat([_pad(w.ids, K, -1) for w in works])
            weights = torch.cat([_pad(w.weights, K, 0.0) for w in works])
        with torch.inference_mode():
            out = self.banks[layer](x, ids, weights)  # [sum T, H] compute dtype
        self.computes += 1
        self.requests_done += len(works)
        COMPUTE_SECONDS.observe(time.perf_counter() - started)
        BATCH_TOKENS.observe(x.shape[0])
        BATCH_REQUESTS.observe(len(works))
        start = 0
        for work in works:
            T = work.hidden.shape[0]
            part = out[start:start + T].to(dtype=work.out_dtype)  # on the shard's device: the transport moves it
            start += T
            if not work.future.done():
                work.future.set_result(part)
        return ids

    def _record_load(self, layer: int, ids: torch.Tensor) -> None:
        valid = ids[ids >= 0]
        if valid.numel() == 0:
            return
        counts = torch.bincount(valid.cpu(), minlength=self.n_routed_experts).tolist()
        per_expert = {e: c for e, c in enumerate(counts) if c}
        for expert, tokens in per_expert.items():
            TOKENS.labels(str(layer), str(expert)).inc(tokens)
        if self.recorder is not None:
            self.recorder.add(layer, per_expert)


def _pad(t: torch.Tensor, k: int, value: float) -> torch.Tensor:
    if t.shape[1] == k:
        return t
    pad = torch.full((t.shape[0], k - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)

