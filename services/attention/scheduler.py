"""Continuous batching for an attention worker: one thread owns the engine and steps it.

The server's handlers `submit` requests and `cancel` them; the step thread admits new requests
between steps, applies cancellations and deadlines, runs one engine step, and hands every event
of that iteration (tokens, finals, errors) to `publish` in one call, so the server wakes once per
step however many streams it feeds. A step that fails (no live replica for an expert) fails
exactly the sequences that were in it; waiting requests are untouched.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

from model.errors import ModelError
from model.generate import Engine, GenerationRequest, Sequence, TokenEvent
from model.kv_cache import CacheFull
from services.common.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from services.common.logging import event, get_logger

log = get_logger("attention.scheduler")

REQUESTS = Counter("moe_attention_requests_total", "Generate requests by outcome", ["outcome"])
TOKENS = Counter("moe_attention_generated_tokens_total", "Tokens generated")
TTFT = Histogram("moe_attention_time_to_first_token_seconds", "Submission to first token",
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TOKEN_LATENCY = Histogram("moe_attention_token_latency_seconds", "Time between consecutive tokens of a request",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
STEP_SECONDS = Histogram("moe_attention_step_seconds", "Engine step time split by phase", ["phase"])
DECODE_STEPS = Counter("moe_attention_decode_steps_total",
                       "Decode steps by path: graph (compiled, or a CUDA graph) or eager", ["path"])
KV_USED = Gauge("moe_attention_kv_cache_used_tokens", "Latent KV-cache tokens reserved by sequences")
KV_TOTAL = Gauge("moe_attention_kv_cache_capacity_tokens", "Latent KV-cache capacity in tokens")
ACTIVE = Gauge("moe_attention_active_sequences", "Sequences decoding now")
QUEUED = Gauge("moe_attention_queued_sequences", "Sequences waiting for admission")


@dataclass(eq=False)
class RequestHandle:
    request: GenerationRequest
    deadline: float | None  # time.monotonic() value, None for no deadline
    seq: Sequence | None = None
    last_token_at: float | None = None
    cancelled: bool = False


# (handle, kind, payload): ("token", TokenEvent), then ("final", Sequence); or ("error", ServiceError)
Event = tuple[RequestHandle, str, object]


class Scheduler:
    def __init__(self, engine: Engine, step_wait_seconds=lambda: 0.0, step_context=contextlib.nullcontext):
        """step_wait_seconds: the running total of dispatch wait, for the step split;
        step_context: a context manager factory each engine step runs in."""
        self.engine = engine
        self._step_wait_seconds = step_wait_seconds
        self._step_context = step_context
        self._incoming: list[RequestHandle] = []
        self._cancelled: list[RequestHandle] = []
        self._by_seq: dict[int, RequestHandle] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._outbox: list[Event] = []
        self._publish: Callable[[list[Event]], None] = lambda events: None
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        KV_TOTAL.set(engine.cache.capacity_tokens)

    def start(self, publish: Callable[[list[Event]], None]) -> "Scheduler":
        """publish: called from the step thread with each iteration's events, in order."""
        self._publish = publish
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the sequences in flight finish (or `timeout`); fail what is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._by_seq or self._incoming):
            time.sleep(0.05)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=5.0)
        left = list(self._by_seq.values()) + self._incoming
        self._publish([(handle, "error", Unavailable("worker is shutting down")) for handle in left])

    # ---- called from gRPC threads ----------------------------------------------------------
    def submit(self, request: GenerationRequest, deadline: float | None) -> RequestHandle:
        request.validate(self.engine.cfg)  # bad input fails here, before touching the engine
        need = self.engine.budget(request)
        if need > self.engine.cache.capacity_tokens:
            REQUESTS.labels("resource_exhausted").inc()
            raise ResourceExhausted(
                f"request needs {need} KV-cache tokens; this worker holds {self.engine.cache.capacity_tokens}"
            )
        handle = RequestHandle(request, deadline)
        with self._wake:
            if self._stopping:
                raise Unavailable("worker is shutting down")
            self._incoming.append(handle)
            self._wake.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._wake:
            if not handle.cancelled:
                handle.cancelled = True
                self._cancelled.append(handle)
                self._wake.notify()

    def load(self) -> dict:
        return {
            "active": len(self.engine.running),
            "queued": len(self.engine.waiting) + len(self._incoming),
            "kv_used": self.engine.cache.used_tokens,
            "kv_total": self.engine.cache.capacity_tokens,
        }

    # ---- the step thread -------------------------------------------------------------------
    def _finish(self, handle: RequestHandle, error: ServiceError | None, outcome: str) -> None:
        if handle.seq is not None:
            self.engine.cancel(handle.seq)  # frees its cache blocks now (no-op when finished)
            self._by_seq.pop(handle.seq.id, None)
        self._outbox.append((handle, "error", error) if error else (handle, "final", handle.seq))
        REQUESTS.labels(outcome).inc()

    def _intake(self) -> None:
        with self._wake:
            while not (self._incoming or self._cancelled or self._stopping or not self.engine.idle):
                self._wake.wait(timeout=0.5)
            incoming, self._incoming = self._incoming, []
            cancelled, self._cancelled = self._cancelled, []
        for handle in incoming:
            try:
                handle.seq = self.engine.add(handle.request)
            except (ModelError, CacheFull) as err:
                self._outbox.append((handle, "error", err if isinstance(err, ModelError) else ResourceExhausted(str(err))))
                continue
            self._by_seq[handle.seq.id] = handle
        for handle in cancelled:
            if handle.seq is not None and handle.seq.id in self._by_seq:
                self._finish(handle, None, "cancelled")
        now = time.monotonic()
        for handle in [h for h in self._by_seq.values() if h.deadline is not None and now > h.deadline]:
            event(log, "deadline passed, sequence dropped", request_id=handle.request.request_id)
            self._finish(handle, DeadlineExceeded("deadline passed before generation finished"), "deadline")

    def _deliver(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()
        for ev in events:
            handle = self._by_seq.get(ev.seq.id)
            if handle is None:
                continue
            if handle.last_token_at is None:
                TTFT.observe(now - ev.seq.submitted_at)
            else:
                TOKEN_LATENCY.observe(now - handle.last_token_at)
            handle.last_token_at = now
            TOKENS.inc()
            self._outbox.append((handle, "token", ev))
            if ev.finish_reason is not None:
                self._by_seq.pop(ev.seq.id, None)
                self._outbox.append((handle, "final", ev.seq))
                REQUESTS.labels("ok").inc()

    def _fail_in_flight(self, error: ServiceError, outcome: str) -> None:
        """Fail every admitted sequence (the step they were in broke); waiting ones stay queued."""
        waiting = {s.id for s in self.engine.waiting}
        for handle in [h for h in self._by_seq.values() if h.seq.id not in waiting]:
            self._finish(handle, error, outcome)

    def _loop(self) -> None:
        while True:
            self._intake()
            if not self._stopping and not self.engine.idle:
                self._step()
            if self._outbox:
                events, self._outbox = self._outbox, []
                self._publish(events)
            if self._stopping:
                return

    def _step(self) -> None:
        wait_before = self._step_wait_seconds()
        started = time.perf_counter()
        try:
            with self._step_context():
                events = self.engine.step()
        except ServiceError as err:
            event(log, "step failed", level=logging.WARNING, error=str(err))
            self._fail_in_flight(err, "unavailable")
            return
        except Exception as err:  # noqa: BLE001 - a bug must not take the worker down silently
            log.exception("step crashed")
            self._fail_in_flight(Unavailable(f"worker step failed: {err}"), "internal")
            return
        elapsed = time.perf_counter() - started
        waited = self._step_wait_seconds() - wait_before
        STEP_SECONDS.labels("total").observe(elapsed)
        STEP_SECONDS.labels("dispatch_wait").observe(waited)
        STEP_SECONDS.labels("local_compute").observe(max(elapsed - waited, 0.0))
        if self.engine.decoded_by is not None:
            DECODE_STEPS.labels(self.engine.decoded_by).inc()
        self._deliver(events)
        KV_USED.set(self.engine.cache.used_tokens)
        ACTIVE.set(len(self.engine.running))
        QUEUED.set(len(self.engine.waiting))
