"""The requests an attention worker's calls have open, and where each one's events go.

The scheduler's step thread publishes each step's events in one call; `StreamHub.publish` hands
them to the server's event loop with one wake-up, where each goes to the `Sink` of its request
(services/attention/servicer.py: a Generate call's queue, or an InferenceSession stream).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from model.generate import GenerationRequest
from services.attention.scheduler import REQUESTS, Event, RequestHandle
from services.attention.worker import AttentionWorker
from services.common.errors import ResourceExhausted
from services.common.logging import event, get_logger

log = get_logger("attention")


class Sink(Protocol):
    def deliver(self, handle: RequestHandle, kind: str, payload: object) -> None: ...

    def flush(self) -> None: ...


class StreamHub:
    """The requests this worker's calls have open, each with the sink its events go to."""

    def __init__(self, worker: AttentionWorker, loop: asyncio.AbstractEventLoop, max_streams: int):
        """loop: the event loop the server runs its calls on; max_streams: requests served at
        once over all calls, queued ones included (past it, RESOURCE_EXHAUSTED)."""
        self.worker, self.loop, self.max_streams = worker, loop, max_streams
        self._sinks: dict[RequestHandle, Sink] = {}

    def publish(self, events: list[Event]) -> None:
        """Called by the scheduler's step thread."""
        self.loop.call_soon_threadsafe(self._fan_out, events)

    def _fan_out(self, events: list[Event]) -> None:
        touched: dict[Sink, None] = {}  # in order of first event
        for handle, kind, payload in events:
            sink = self._sinks.get(handle)
            if sink is None:  # the call already ended (cancelled by its client)
                continue
            if kind != "token":
                del self._sinks[handle]
            sink.deliver(handle, kind, payload)
            touched[sink] = None
        for sink in touched:
            sink.flush()

    def submit(self, gen: GenerationRequest, deadline: float | None, sink: Sink) -> RequestHandle:
        if len(self._sinks) >= self.max_streams:
            REQUESTS.labels("resource_exhausted").inc()
            raise ResourceExhausted(f"worker is serving its limit of {self.max_streams} streams (--max-streams); "
                                    "retry later or on another worker")
        handle = self.worker.scheduler.submit(gen, deadline)
        self._sinks[handle] = sink
        event(log, "generate started", request_id=gen.request_id, prompt_tokens=len(gen.prompt),
              max_new_tokens=gen.max_new_tokens)
        return handle

    def drop(self, handle: RequestHandle) -> None:
        """The caller is gone: stop the request now (frees its KV cache) unless it already ended."""
        if self._sinks.pop(handle, None) is not None:
            self.worker.scheduler.cancel(handle)
