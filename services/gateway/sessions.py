"""One multiplexed moe.v1.InferenceSession.Open call per attention worker, shared by the gateway's streams.

A `WorkerSession` lives on the gateway's event loop. `start` gives a request a stream number
(unique within the session) and a queue, and sends `start` on the call; a reader task takes
each `SessionEvents` message (one decode step's events for all of the worker's streams) and
puts every event on its stream's queue. A stream's queue gets its GenerateResponses (tokens,
then one final or one error) or, when the session ends first, one `SessionFailed`. When the call
ends or fails, the session is broken for good: every open stream is woken with that status (a
call that ends OK with streams still open is UNAVAILABLE "worker closed the session") and
`on_end` lets the owner drop it, so the next request opens a fresh session.

A client that reads more slowly than its tokens arrive leaves them on its stream's queue; past
`max_unread` waiting messages the stream is cancelled at the worker and ends RESOURCE_EXHAUSTED
after the messages already queued, so one stalled client cannot grow the gateway's memory
without bound (the worker sends each step's events for all streams at once and cannot hold back
one stream's).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import grpc

from moe.v1 import inference_pb2, inference_pb2_grpc

TERMINAL = ("final", "error")
DEFAULT_MAX_UNREAD = 4096  # messages waiting for one slow client before its stream is ended


@dataclass(frozen=True)
class SessionFailed:
    """Put on a stream's queue instead of its terminal event: the session ended (or the stream
    was cancelled) first. `code`/`details` are what the client would be told."""

    code: grpc.StatusCode
    details: str


StreamItem = inference_pb2.GenerateResponse | SessionFailed


class WorkerSession:
    """The gateway's session with one worker; create, use and close it on the event loop."""

    def __init__(self, endpoint: str, channel: grpc.aio.Channel,
                 on_end: Callable[["WorkerSession"], None] | None = None, *,
                 max_unread: int = DEFAULT_MAX_UNREAD) -> None:
        self.endpoint = endpoint
        self.on_end = on_end
        self.max_unread = max_unread
        self.broken: SessionFailed | None = None
        self.closed = False  # closed by the gateway (close()), not ended by the worker or the connection
        self._numbers = itertools.count(1)
        self._streams: dict[int, asyncio.Queue[StreamItem]] = {}  # open streams (no terminal event yet)
        self._requests: asyncio.Queue[inference_pb2.SessionRequest | None] = asyncio.Queue()
        self._call = inference_pb2_grpc.InferenceSessionStub(channel).Open(self._outgoing())
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"session-{endpoint}")

    # ---- streams ----------------------------------------------------------------------------
    def start(self, request: inference_pb2.GenerateRequest,
              timeout_s: float = 0.0) -> tuple[int, asyncio.Queue[StreamItem]]:
        """Start `request` as a new stream; returns its number and the queue its events arrive on."""
        number = next(self._numbers)
        events: asyncio.Queue[StreamItem] = asyncio.Queue()
        if self.broken is not None:
            events.put_nowait(self.broken)
            return number, events
        self._streams[number] = events
        self._requests.put_nowait(inference_pb2.SessionRequest(stream=number, start=request, timeout_s=timeout_s))
        return number, events

    def cancel(self, number: int, code: grpc.StatusCode = grpc.StatusCode.CANCELLED,
               details: str = "cancelled by the gateway") -> None:
        """Stop a stream that is still open: tell the worker, and wake its queue with (code, details).
        A no-op for a stream that already got its terminal event, or once the session is broken."""
        events = self._streams.pop(number, None)
        if events is None:
            return
        self._requests.put_nowait(inference_pb2.SessionRequest(stream=number, cancel=True))
        events.put_nowait(SessionFailed(code, details))

    def drop(self, number: int) -> None:
        """Forget a stream (its reader is done with it); nothing is sent."""
        self._streams.pop(number, None)

    # ---- the call ---------------------------------------------------------------------------
    async def _outgoing(self) -> AsyncIterator[inference_pb2.SessionRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        failure = SessionFailed(grpc.StatusCode.UNAVAILABLE, f"worker {self.endpoint} closed the session")
        try:
            async for batch in self._call:
                for item in batch.events:
                    events = self._streams.get(item.stream)
                    if events is None:
                        continue  # cancelled or dropped here; the worker had sent it already
                    if item.response.WhichOneof("event") in TERMINAL:
                        del self._streams[item.stream]  # over: no cancel will be sent for it
                    events.put_nowait(item.response)
                    if events.qsize() > self.max_unread and item.stream in self._streams:
                        self.cancel(item.stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"the client read too slowly: {events.qsize()} messages waited unread at "
                                    f"the gateway (--max-unread {self.max_unread}); generation stopped")
        except grpc.RpcError as err:
            failure = SessionFailed(err.code(), err.details() or "")
        except asyncio.CancelledError:  # the call was cancelled here (close(), channel closed)
            failure = SessionFailed(grpc.StatusCode.UNAVAILABLE, f"session with worker {self.endpoint} closed")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._fail(failure)
                raise
        except Exception as err:  # noqa: BLE001 - e.g. a message that does not parse
            failure = SessionFailed(grpc.StatusCode.UNAVAILABLE, f"session with worker {self.endpoint} failed: {err!r}")
        self._fail(failure)

    def _fail(self, failure: SessionFailed) -> None:
        """Mark the session broken (the first failure wins), wake every open stream, unlist it."""
        if self.broken is None:
            self.broken = failure
        streams, self._streams = self._streams, {}
        for events in streams.values():
            events.put_nowait(self.broken)
        self._requests.put_nowait(None)  # ends the request iterator
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)

    def close(self, details: str | None = None) -> None:
        """End the session now: open streams fail UNAVAILABLE and the call is cancelled."""
        self.closed = self.broken is None
        self._fail(SessionFailed(grpc.StatusCode.UNAVAILABLE,
                                 details or f"session with worker {self.endpoint} closed"))
        self._call.cancel()
