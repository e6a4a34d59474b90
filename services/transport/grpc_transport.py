"""Expert dispatch over gRPC: one channel and one bidirectional `Exchange` stream per replica.

    submit() --encode--> send queue --(gRPC's request iterator)--> shard
    futures by sequence <--resolve-- reader thread <--replies (any order)-- shard

A broken stream (replica died, connection reset) fails every pending future with
ReplicaUnavailable at once; the next submit opens a new stream. A per-client deadline thread
fails each future that outlives its timeout, so nothing waits past it even when the replica
hangs without closing the connection.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import grpc
import torch

from moe.v1 import expert_pb2, expert_pb2_grpc
from services.common import tensors
from services.common.errors import InvalidArgument
from services.common.logging import event, get_logger
from services.transport.base import DISPATCH_BYTES, DISPATCH_FAILURES, DISPATCH_WAIT, ExpertClient, ReplicaLike, Transport
from services.wire.batch import ExpertBatch, result_dtype, wire_tensors
from services.wire.dtypes import REPLY_DTYPES, check_dispatch_dtype, reply_dtype
from services.wire.failures import ReplicaUnavailable, caller_error

log = get_logger("transport.grpc")

NAME = "grpc"
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.keepalive_time_ms", 10_000),           # notice a silently dead peer
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
_CLOSE = object()  # ends a request iterator


def encode_request(batch: ExpertBatch, sequence: int, dispatch_dtype: str) -> expert_pb2.ExpertRequest:
    """ExpertBatch -> ExpertRequest (services.wire.batch.wire_tensors); InvalidArgument when the
    batch cannot be encoded."""
    hidden, scales, ids, weights = wire_tensors(batch, dispatch_dtype)
    request = expert_pb2.ExpertRequest(sequence=sequence, layer=batch.layer, output_dtype=reply_dtype(dispatch_dtype))
    tensors.encode(hidden, request.hidden)
    if scales is not None:
        tensors.encode(scales, request.hidden_scales)
    tensors.encode(ids, request.expert_ids)
    tensors.encode(weights, request.weights)
    return request


@dataclass(order=True)
class _Deadline:
    at: float
    sequence: int
    stream: "_Stream" = field(compare=False)


@dataclass
class _Pending:
    future: concurrent.futures.Future
    started: float             # time.monotonic() at submit
    out_dtype: torch.dtype     # what the caller gets back


class _Stream:
    """One Exchange call: its send queue, its pending futures, its reader thread."""

    def __init__(self, stub: expert_pb2_grpc.ExpertShardStub, replica_id: str, number: int) -> None:
        self.replica_id = replica_id
        self.sendq: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: dict[int, _Pending] = {}
        self.lock = threading.Lock()
        self.broken: str | None = None  # why, once the stream is unusable
        self.call = stub.Exchange(self._requests())
        self.reader = threading.Thread(target=self._read, name=f"expert-rx-{replica_id}-{number}", daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[expert_pb2.ExpertRequest]:
        while True:
            item = self.sendq.get()
            if item is _CLOSE:
                return
            yield item

    def add(self, sequence: int, pending: _Pending, request: expert_pb2.ExpertRequest) -> bool:
        """Queue a request; False when the stream is already broken."""
        with self.lock:
            if self.broken is not None:
                return False
            self.pending[sequence] = pending
        self.sendq.put(request)
        return True

    def take(self, sequence: int) -> _Pending | None:
        with self.lock:
            return self.pending.pop(sequence, None)

    def _read(self) -> None:
        reason = "stream closed by the replica"
        try:
            for reply in self.call:
                DISPATCH_BYTES.labels(NAME, "combine").inc(reply.ByteSize())
                pending = self.take(reply.sequence)
                if pending is None:
                    continue  # timed out already; a late reply is dropped
                _resolve(pending, reply, self.replica_id)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else str(err)
            reason = f"stream broken: {code.name if code else 'UNKNOWN'}: {details}"
        except Exception as err:  # noqa: BLE001 - any reader failure must fail the pending futures
            reason = f"stream reader failed: {type(err).__name__}: {err}"
            event(log, "stream reader failed", level=logging.ERROR, replica=self.replica_id, exc_info=True)
        self.fail(reason)

    def fail(self, reason: str) -> None:
        """Mark broken and fail every pending future with ReplicaUnavailable."""
        with self.lock:
            if self.broken is None:
                self.broken = reason
            pending, self.pending = self.pending, {}
        self.sendq.put(_CLOSE)
        if pending:
            event(log, "expert stream failed", level=logging.WARNING, replica=self.replica_id,
                  pending=len(pending), reason=reason)
        for item in pending.values():
            _fail(item, ReplicaUnavailable(self.replica_id, reason), "stream")

    def close(self, reason: str) -> None:
        self.fail(reason)
        self.call.cancel()


def _resolve(pending: _Pending, reply: expert_pb2.ExpertReply, replica_id: str) -> None:
    if reply.WhichOneof("result") == "output":
        try:
            out = tensors.decode(reply.output, field="output", allowed=REPLY_DTYPES)
            # decode() views the message's bytes (read-only): hand back a tensor the caller owns
            out = out.to(pending.out_dtype) if out.dtype != pending.out_dtype else out.clone()
        except InvalidArgument as err:
            _fail(pending, ReplicaUnavailable(replica_id, f"malformed reply: {err}"), "reply")
            return
        DISPATCH_WAIT.labels(NAME).observe(time.monotonic() - pending.started)
        if not pending.future.done():
            pending.future.set_result(out)
        return
    error = caller_error(replica_id, reply.error.code, reply.error.message)
    _fail(pending, error, "invalid" if isinstance(error, InvalidArgument) else "replica")


def _fail(pending: _Pending, err: Exception, reason: str) -> None:
    DISPATCH_WAIT.labels(NAME).observe(time.monotonic() - pending.started)
    DISPATCH_FAILURES.labels(NAME, reason).inc()
    if not pending.future.done():
        pending.future.set_exception(err)


class GrpcExpertClient(ExpertClient):
    """One channel + one Exchange stream to one replica, shared by all threads of a worker."""

    def __init__(self, replica_id: str, target: str, dispatch_dtype: str,
                 channel_options: tuple = CHANNEL_OPTIONS) -> None:
        self.replica_id = replica_id
        self.target = target
        self.dispatch_dtype = check_dispatch_dtype(dispatch_dtype)
        self._channel = grpc.insecure_channel(target, options=list(channel_options))
        self._stub = expert_pb2_grpc.ExpertShardStub(self._channel)
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._streams_opened = 0
        self._sequence = itertools.count(1)
        self._closed = False
        self._deadlines: list[_Deadline] = []
        self._deadline_cv = threading.Condition(self._lock)
        self._timer = threading.Thread(target=self._expire, name=f"expert-deadline-{replica_id}", daemon=True)
        self._timer.start()

    @property
    def streams_opened(self) -> int:
        """How many Exchange streams this client has opened (1 + reconnects)."""
        return self._streams_opened

    def submit(self, batch: ExpertBatch, timeout: float) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        started = time.monotonic()
        pending = _Pending(future, started, result_dtype(batch.hidden.dtype))
        sequence = next(self._sequence)
        try:
            request = encode_request(batch, sequence, self.dispatch_dtype)
        except InvalidArgument as err:  # e.g. fp8 refuses NaN/Inf hidden
            _fail(pending, err, "invalid")
            return future
        DISPATCH_BYTES.labels(NAME, "dispatch").inc(request.ByteSize())
        with self._lock:
            if self._closed:
                _fail(pending, ReplicaUnavailable(self.replica_id, "client closed"), "closed")
                return future
            stream = self._stream
            if stream is None or stream.broken is not None:
                try:
                    stream = self._stream = _Stream(self._stub, self.replica_id, self._streams_opened)
                except Exception as err:  # noqa: BLE001 - a failure to open is the replica's
                    _fail(pending, ReplicaUnavailable(self.replica_id, f"cannot open stream: {err}"), "stream")
                    return future
                self._streams_opened += 1
            heapq.heappush(self._deadlines, _Deadline(started + timeout, sequence, stream))
            if self._deadlines[0].sequence == sequence:  # the timer sleeps until the earliest deadline
                self._deadline_cv.notify()
        if not stream.add(sequence, pending, request):
            _fail(pending, ReplicaUnavailable(self.replica_id, stream.broken or "stream broken"), "stream")
        return future

    def _expire(self) -> None:
        """Fail futures whose deadline passed (one thread per client, sleeping until the next)."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                due = []
                while self._deadlines and self._deadlines[0].at <= now:
                    due.append(heapq.heappop(self._deadlines))
                if due:
                    self._lock.release()
                    try:
                        for item in due:
                            pending = item.stream.take(item.sequence)
                            if pending is not None:
                                _fail(pending, ReplicaUnavailable(
                                    self.replica_id, f"no reply within {now - pending.started:.3g}s"), "timeout")
                    finally:
                        self._lock.acquire()
                    continue
                wait = self._deadlines[0].at - now if self._deadlines else None
                self._deadline_cv.wait(wait)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stream, self._stream = self._stream, None
            self._deadline_cv.notify()
        if stream is not None:
            stream.close("client closed")
        self._channel.close()


class GrpcTransport(Transport):
    name = NAME

    def __init__(self, dispatch_dtype: str, channel_options: tuple = CHANNEL_OPTIONS) -> None:
        self.dispatch_dtype = check_dispatch_dtype(dispatch_dtype)
        self.channel_options = channel_options

    def connect(self, replica: ReplicaLike) -> GrpcExpertClient:
        target = (replica.endpoints or {}).get("grpc")
        if not target:
            raise ReplicaUnavailable(replica.id, "registry record has no grpc endpoint")
        return GrpcExpertClient(replica.id, target, self.dispatch_dtype, self.channel_options)
