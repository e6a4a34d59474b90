"""Expert dispatch over UCX (UCXX): one endpoint per (worker, replica), frames of ucx_framing.py.

    transport = UcxTransport("fp8")                   # RuntimeError (UcxUnavailable) without ucxx
    client = transport.connect(replica)               # replica.endpoints["ucx"] = "host:port"
    out = client.submit(batch, timeout=5.0).result()  # ReplicaUnavailable on endpoint error/timeout

    server = serve_ucx(50054, shard.compute)          # beside the shard's gRPC server
    server.close()

Threads: one progress thread per process (`UcxRuntime`, ucx_runtime.py: how it progresses, sleeps
and wakes, UCXPY_PROGRESS_MODE) serves every client and listener of the process. `submit` does its
work on the caller's thread: it encodes (dtype conversion / FP8 quantisation in parallel with other
callers), then, under the runtime's `ucx` lock, posts the receive for the reply's tail and the
frame's sends; a small send completes inside that call, so the progress thread is not woken for
it. The progress thread receives the reply head and completes the caller's future itself. The
listener receives on the progress thread and runs each request's `compute` in a thread pool, whose
thread also posts the reply; requests from many workers reach the shard concurrently and its
compute thread merges them per layer.

Failure: every request has a timer on the progress thread; an endpoint error (peer killed,
connection reset), a receive error or the timer fails the future with ReplicaUnavailable. An
endpoint error fails every pending future of that endpoint at once; the next submit reconnects.
A reply that comes after its timeout lands in the buffers posted for it and is dropped.

Where bytes are copied (host memory; "GPU" = tensors on a CUDA device):
| step | copies |
|---|---|
| caller: fp32 -> bf16 / fp8 encode | one pass that writes the wire tensor (none in fp32 mode) |
| head message (header + sections that fit 8 KiB) | small sections copied into the head buffer (D2H on GPU) |
| tail sections (large hidden states, outputs) | none in Python: UCX reads the tensor's memory (TCP: kernel socket copies; cuda_ipc/RDMA: none) |
| receive | tails land in preallocated torch tensors (on `device`; a reply's before it is sent); inline sections are views of the head buffer |
| reply conversion to the caller's dtype | bf16 -> fp32 when the caller's hidden was fp32/fp8 |
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import grpc
import numpy as np
import torch

from services.common.errors import InvalidArgument, status_for
from services.common.logging import event, get_logger
from services.transport import fp8, ucx_framing as wire
from services.transport.base import (
    DISPATCH_BYTES,
    DISPATCH_FAILURES,
    DISPATCH_WAIT,
    ExpertBatch,
    ExpertClient,
    ReplicaLike,
    ReplicaUnavailable,
    Transport,
    check_dispatch_dtype,
)
from services.transport.ucx_runtime import (
    CLOSE_TIMEOUT_S,
    UcxRuntime,
    UcxUnavailable,  # noqa: F401 - re-exported: what UcxTransport() and serve_ucx raise without ucxx
    ignore,
    ucx_available,
)

log = get_logger("transport.ucx")

NAME = "ucx"
COMPUTE_THREADS = 32          # concurrent compute calls the listener keeps in flight

def _settle(future: concurrent.futures.Future, result=None, error: Exception | None = None) -> None:
    """Complete `future` unless it already is (a timer and a reply may race to it)."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


@dataclass
class _Pending:
    future: concurrent.futures.Future
    started: float                      # time.monotonic() at submit
    out_dtype: torch.dtype              # what the caller gets back
    device: torch.device                # where the output tensor is received
    shape: tuple[int, int]              # of the reply's output, [T, H] in the reply dtype
    tail: torch.Tensor | None = None    # the output, when it travels as a tail: received in place
    tail_request: Any = None            # its posted receive
    settled: bool = False               # outcome decided (the future may be completed a moment later)


def _fail(runtime: UcxRuntime, pending: _Pending, err: Exception, reason: str) -> None:
    if pending.settled:
        return
    pending.settled = True
    DISPATCH_WAIT.labels(NAME).observe(time.monotonic() - pending.started)
    DISPATCH_FAILURES.labels(NAME, reason).inc()
    runtime.wake_later(partial(_settle, pending.future, error=err))


class _Connection:
    """One UCX endpoint to a replica and the replies it waits for. A caller thread opens it and
    posts on it; its receive side, timers and failure run on the progress thread."""

    def __init__(self, client: "UcxExpertClient") -> None:
        self.client = client
        self.runtime = runtime = client.runtime
        self.link = secrets.randbits(32)   # the replica tags every message to us with it
        self.pending: dict[int, _Pending] = {}
        self.broken: str | None = None
        self.connected = False
        host, port = client.address
        self.endpoint = runtime.api.UCXEndpoint.create(runtime.worker, host, port, True)
        # runs inside UCX's progress: act after it returns
        self.endpoint.set_close_callback(runtime.call, (partial(self.fail, "endpoint closed or failed"),))
        hello = np.array([self.link], dtype="<u8")
        runtime.watch(self.endpoint.stream_send(runtime.Array(hello)), self._hello_sent, keep=hello)
        self._post_head(self.endpoint)
        runtime.call_at(time.monotonic() + client.connect_timeout, self._check_connected)

    def _post_head(self, endpoint) -> None:
        # a fresh buffer per frame: inline outputs handed to callers stay views of their own head
        head = np.empty(wire.HEAD_CAPACITY, dtype=np.uint8)
        request = self.runtime.receive(endpoint, head, wire.tag(self.link, wire.KIND_REPLY, 0, 0), wire.HEAD_MASK)
        self.runtime.watch(request, partial(self._on_head, head), keep=head)

    # ---- on a caller's thread ---------------------------------------------------------------
    def submit(self, sequence: int, pending: _Pending, frame: wire.Frame, reply_dtype: torch.dtype,
               timeout: float) -> None:
        """Post the reply's tail receive, then the request; raises ReplicaUnavailable or a UCXX error."""
        if self.endpoint is None:   # fail() runs under `ucx` too: this cannot change below
            raise ReplicaUnavailable(self.client.replica_id, self.broken or "endpoint closed")
        try:
            if wire.inline_count([wire.Section(pending.shape, reply_dtype)]) == 0:
                pending.tail = torch.empty(pending.shape, dtype=reply_dtype, device=pending.device)
                pending.tail_request = self.runtime.receive(
                    self.endpoint, wire.byte_view(pending.tail), wire.tag(self.link, wire.KIND_REPLY, 1, sequence))
            self.pending[sequence] = pending
            # weakly: the timer outlives most requests, and must not keep their outputs alive
            self.runtime.call_at(pending.started + timeout, partial(self._expire, weakref.ref(pending)))
            self.runtime.send_frame(self.endpoint, self.link, wire.KIND_REQUEST, sequence, frame, self.fail)
        except BaseException:
            self.pending.pop(sequence, None)
            pending.tail = pending.tail_request = None   # cancels that receive, under `ucx`
            raise

    # ---- on the progress thread -------------------------------------------------------------
    def _hello_sent(self, request) -> None:
        try:
            request.check_error()
        except Exception as err:  # noqa: BLE001
            host, port = self.client.address
            self.fail(f"cannot connect to ucx://{host}:{port}: {type(err).__name__}: {err}")
            return
        self.connected = True

    def _check_connected(self) -> None:
        if not self.connected:
            host, port = self.client.address
            self.fail(f"cannot connect to ucx://{host}:{port} within {self.client.connect_timeout:g}s")

    def _on_head(self, head: np.ndarray, request) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            return
        try:
            request.check_error()
            header = wire.parse_header(head, wire.KIND_REPLY)
            self._post_head(endpoint)
        except Exception as err:  # noqa: BLE001 - peer death shows up as a UCXX error here
            self.fail(f"receive failed: {type(err).__name__}: {err}")
            return
        pending = self.pending.pop(header.sequence, None)
        if pending is None:
            return
        if header.status != wire.STATUS_OK:
            pending.tail = pending.tail_request = None   # dropping the request cancels that receive
            self.client.reject(pending, header, head)
            return
        if (header.tokens, header.hidden) != pending.shape or header.wire_dtype != self.client.reply_dtype:
            self.fail(f"reply {header.sequence} is [{header.tokens}, {header.hidden}] {header.wire_dtype}, "
                      f"asked for {list(pending.shape)} {self.client.reply_dtype}")
            return
        if pending.tail_request is None:
            tensors, _ = wire.split_inline(head, header, wire.reply_sections(header))
            self.client.resolve(pending, tensors[0])
        elif pending.tail_request.completed:
            self._on_tail(pending, pending.tail_request)
        else:
            self.runtime.watch(pending.tail_request, partial(self._on_tail, pending), keep=pending.tail)

    def _on_tail(self, pending: _Pending, request) -> None:
        try:
            request.check_error()
        except Exception as err:  # noqa: BLE001
            reason = f"receive failed: {type(err).__name__}: {err}"
            _fail(self.runtime, pending, ReplicaUnavailable(self.client.replica_id, reason), "endpoint")
            self.fail(reason)
            return
        output, pending.tail, pending.tail_request = pending.tail, None, None
        self.client.resolve(pending, output)

    def _expire(self, ref: weakref.ref) -> None:
        pending = ref()
        if pending is None:   # answered and released
            return
        # stays in `pending`: a late reply then lands in the receive posted for it
        _fail(self.runtime, pending, ReplicaUnavailable(
            self.client.replica_id, f"no reply within {time.monotonic() - pending.started:.3g}s"), "timeout")

    def fail(self, reason: str) -> None:
        """Mark broken, fail every pending future, drop the endpoint (the next submit reconnects)."""
        if self.broken is None:
            self.broken = reason
        pending, self.pending = self.pending, {}
        waiting = [item for item in pending.values() if not item.settled]
        if waiting:
            event(log, "ucx endpoint failed", level=logging.WARNING, replica=self.client.replica_id,
                  pending=len(waiting), reason=reason)
        for item in waiting:
            _fail(self.runtime, item, ReplicaUnavailable(self.client.replica_id, reason), "endpoint")
        for item in pending.values():   # a caller may hold the last reference: cancel here, under `ucx`
            item.tail = item.tail_request = None
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            self.runtime.close_endpoint(endpoint)


class UcxExpertClient(ExpertClient):
    """The UCX link from this worker to one replica; thread-safe, reconnects after a failure."""

    def __init__(self, replica_id: str, address: str, dispatch_dtype: str, runtime: UcxRuntime,
                 connect_timeout: float = 5.0) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"replica {replica_id}: ucx endpoint '{address}' is not host:port")
        self.replica_id = replica_id
        self.address = (host.strip("[]"), int(port))
        self.dispatch_dtype = check_dispatch_dtype(dispatch_dtype)
        self.reply_dtype = torch.float32 if dispatch_dtype == "fp32" else torch.bfloat16
        self.runtime = runtime
        self.connect_timeout = connect_timeout
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()                 # guards the two below
        self._connection: _Connection | None = None
        self._closed = False
        self.connections_opened = 0

    def _connect(self) -> _Connection:
        """The open connection (or a new one); call with runtime.ucx held."""
        with self._lock:
            if self._closed:
                raise ReplicaUnavailable(self.replica_id, "client closed")
            connection = self._connection
            if connection is None or connection.broken is not None:
                connection = self._connection = _Connection(self)
                self.connections_opened += 1
            return connection

    def submit(self, batch: ExpertBatch, timeout: float) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        hidden = batch.hidden
        out_dtype = hidden.dtype if hidden.dtype in (torch.float32, torch.bfloat16) else torch.float32
        pending = _Pending(future, time.monotonic(), out_dtype, hidden.device, tuple(hidden.shape))
        sequence = next(self._sequence)
        try:
            if batch.hidden_scales is not None or hidden.dtype == torch.float8_e4m3fn:
                wire_hidden, scales = hidden, batch.hidden_scales   # quantised by the caller already
            else:
                wire_hidden, scales = fp8.encode_hidden(hidden, self.dispatch_dtype)
            frame = wire.encode_request(sequence, batch.layer, batch.expert_ids, batch.weights,
                                        wire_hidden, scales, self.reply_dtype)
        except ValueError as err:
            _fail(self.runtime, pending, InvalidArgument(f"expert batch: {err}"), "invalid")
            return future
        DISPATCH_BYTES.labels(NAME, "dispatch").inc(frame.nbytes)
        connection = None
        try:
            with self.runtime.ucx:
                connection = self._connect()
                connection.submit(sequence, pending, frame, self.reply_dtype, timeout)
        except ReplicaUnavailable as err:
            _fail(self.runtime, pending, err, "closed" if self._closed else "endpoint")
        except Exception as err:  # noqa: BLE001 - UCXX raises its own errors for a dead endpoint
            reason = f"send failed: {type(err).__name__}: {err}"
            _fail(self.runtime, pending, ReplicaUnavailable(self.replica_id, reason), "endpoint")
            if connection is not None:
                self.runtime.call(partial(connection.fail, reason))
        return future

    # ---- on the progress thread -------------------------------------------------------------
    def reject(self, pending: _Pending, header: wire.Header, head: np.ndarray) -> None:
        message = wire.error_text(head, header)
        if header.status == wire.STATUS_INVALID:
            _fail(self.runtime, pending, InvalidArgument(message), "invalid")
        else:
            _fail(self.runtime, pending, ReplicaUnavailable(self.replica_id, message), "replica")

    def resolve(self, pending: _Pending, output: torch.Tensor) -> None:
        DISPATCH_BYTES.labels(NAME, "combine").inc(wire.HEADER.size + output.nbytes)
        if pending.settled:   # timed out already: the late reply is dropped
            return
        pending.settled = True
        output = output.to(device=pending.device, dtype=pending.out_dtype)
        DISPATCH_WAIT.labels(NAME).observe(time.monotonic() - pending.started)
        self.runtime.wake_later(partial(_settle, pending.future, output))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connection, self._connection = self._connection, None
        if connection is not None:
            self.runtime.run(partial(connection.fail, "client closed"), timeout=CLOSE_TIMEOUT_S)


class UcxTransport(Transport):
    name = NAME

    def __init__(self, dispatch_dtype: str, connect_timeout: float = 5.0) -> None:
        self.dispatch_dtype = check_dispatch_dtype(dispatch_dtype)
        self.connect_timeout = connect_timeout
        self.runtime = UcxRuntime.get()

    def connect(self, replica: ReplicaLike) -> UcxExpertClient:
        address = (replica.endpoints or {}).get("ucx")
        if not address:
            raise ReplicaUnavailable(replica.id, "registry record has no ucx endpoint (expert started "
                                                 "without --ucx-port?)")
        return UcxExpertClient(replica.id, address, self.dispatch_dtype, self.runtime, self.connect_timeout)


# ---- shard side ---------------------------------------------------------------------------------
Compute = Callable[[ExpertBatch], torch.Tensor]


class _Peer:
    """One worker's endpoint at a listener: requests are received on the progress thread, replies
    posted by the compute thread that made them."""

    def __init__(self, server: "UcxServer", endpoint) -> None:
        self.server = server
        self.runtime = runtime = server.runtime
        self.endpoint = endpoint
        self.link = 0
        endpoint.set_close_callback(runtime.call, (partial(self.drop, "endpoint closed or failed"),))
        hello = np.zeros(1, dtype="<u8")
        runtime.watch(endpoint.stream_recv(runtime.Array(hello)), partial(self._on_hello, hello), keep=hello)

    # ---- on the progress thread -------------------------------------------------------------
    def _on_hello(self, hello: np.ndarray, request) -> None:
        try:
            request.check_error()
            self.link = int(hello[0])
            self._post_head()
        except Exception as err:  # noqa: BLE001
            self.drop(f"{type(err).__name__}: {err}")

    def _post_head(self) -> None:
        head = np.empty(wire.HEAD_CAPACITY, dtype=np.uint8)
        request = self.runtime.receive(self.endpoint, head, wire.tag(self.link, wire.KIND_REQUEST, 0, 0),
                                       wire.HEAD_MASK)
        self.runtime.watch(request, partial(self._on_head, head), keep=head)

    def _on_head(self, head: np.ndarray, request) -> None:
        if self.endpoint is None:
            return
        try:
            request.check_error()
            header = wire.parse_header(head, wire.KIND_REQUEST)
            self._post_head()
            tensors, sections = wire.split_inline(head, header, wire.request_sections(header))
            receives = []
            for part, section in enumerate(sections, start=1):
                tensor = torch.empty(section.shape, dtype=section.dtype, device=self.server.device)
                receives.append(self.runtime.receive(self.endpoint, wire.byte_view(tensor),
                                                     wire.tag(self.link, wire.KIND_REQUEST, part, header.sequence)))
                tensors.append(tensor)
        except wire.FrameError as err:
            event(log, "ucx peer sent a bad frame; dropping its endpoint", level=logging.WARNING, error=str(err))
            self.drop(str(err))
            return
        except Exception as err:  # noqa: BLE001 - the worker went away (closed, killed, reset)
            self.drop(f"{type(err).__name__}: {err}")
            return
        self._when_received(header, tensors, receives)

    def _when_received(self, header: wire.Header, tensors: list[torch.Tensor], receives: list,
                       _completed=None) -> None:
        """Start the compute once every tail of the request is in `tensors`."""
        if self.endpoint is None:
            return
        while receives and receives[0].completed:
            try:
                receives.pop(0).check_error()
            except Exception as err:  # noqa: BLE001
                self.drop(f"{type(err).__name__}: {err}")
                return
        if receives:
            self.runtime.watch(receives[0], partial(self._when_received, header, tensors, receives), keep=tensors)
            return
        self.runtime.wake_later(partial(self._start_compute, header, tensors))

    def _start_compute(self, header: wire.Header, tensors: list[torch.Tensor]) -> None:
        try:
            self.server.pool.submit(self._answer, header, tensors)
        except RuntimeError:  # the pool is shut down: the listener is closing
            pass

    def drop(self, reason: str) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is None:
            return
        event(log, "ucx peer disconnected", level=logging.DEBUG, reason=reason)
        self.server.peers.discard(self)
        self.runtime.close_endpoint(endpoint)

    # ---- on a compute thread ----------------------------------------------------------------
    def _answer(self, header: wire.Header, tensors: list[torch.Tensor]) -> None:
        frame = self.server.reply_frame(header, tensors)
        with self.runtime.ucx:   # drop() runs under it too: the endpoint stays open meanwhile
            if self.endpoint is None:
                return
            try:
                self.runtime.send_frame(self.endpoint, self.link, wire.KIND_REPLY, header.sequence, frame, ignore)
            except Exception:  # noqa: BLE001 - the receive side sees the same endpoint error and drops it
                return


class UcxServer:
    """A UCX listener that answers request frames with `compute(batch)`; see serve_ucx."""

    def __init__(self, port: int, compute: Compute, device: str | torch.device = "cpu") -> None:
        self.runtime = UcxRuntime.get()
        self.compute = compute
        self.device = torch.device(device)
        self.pool = concurrent.futures.ThreadPoolExecutor(COMPUTE_THREADS, thread_name_prefix="ucx-compute")
        self.peers: set[_Peer] = set()
        self.closed = False
        self.listener = self.runtime.run(
            lambda: self.runtime.api.UCXListener.create(self.runtime.worker, port, self._on_connect), timeout=30.0)
        self.port = self.listener.port

    def _on_connect(self, conn_request: int) -> None:
        # runs inside UCX's progress: accept after it returns
        self.runtime.call(partial(self._accept, conn_request))

    def _accept(self, conn_request: int) -> None:
        if self.closed:
            return
        endpoint = self.runtime.api.UCXEndpoint.create_from_conn_request(self.listener, conn_request, True)
        self.peers.add(_Peer(self, endpoint))

    def reply_frame(self, header: wire.Header, tensors: list[torch.Tensor]) -> wire.Frame:
        """Runs on a compute thread: compute, convert to the reply dtype, frame it (or the error)."""
        ids, weights, *rest = tensors
        batch = ExpertBatch(header.layer, rest[-1], ids, weights, rest[0] if len(rest) == 2 else None)
        try:
            output = self.compute(batch)
            return wire.encode_reply(header.sequence, output.to(header.reply_dtype))
        except Exception as err:  # noqa: BLE001 - reported to the caller, never fatal to the listener
            mapped = status_for(err)
            if mapped is None:
                event(log, "ucx compute failed", level=logging.ERROR, layer=header.layer,
                      error=f"{type(err).__name__}: {err}", exc_info=True)
                return wire.encode_error(header.sequence, wire.STATUS_ERROR, f"{type(err).__name__}: {err}")
            code, message = mapped
            # bad input fails on any replica; anything else (draining, overloaded) may succeed elsewhere
            status = wire.STATUS_INVALID if code == grpc.StatusCode.INVALID_ARGUMENT else wire.STATUS_UNAVAILABLE
            return wire.encode_error(header.sequence, status, message)

    def _close_on_thread(self) -> None:
        self.closed = True
        self.listener = None   # UCXX destroys the listener with its last reference
        for peer in list(self.peers):
            peer.drop("listener closed")

    def close(self) -> None:
        """Stop listening and drop every worker's endpoint (their pending calls fail over)."""
        if self.closed:
            return
        self.runtime.run(self._close_on_thread, timeout=CLOSE_TIMEOUT_S)
        self.pool.shutdown(wait=False, cancel_futures=True)


def serve_ucx(port: int, compute: Compute, device: str | torch.device = "cpu") -> UcxServer:
    """Listen for expert frames on `port` (0: any free port, see .port); tails of incoming
    frames are received on `device`. Raises UcxUnavailable when ucxx cannot be imported."""
    server = UcxServer(port, compute, device)
    ok, version = ucx_available()
    event(log, "ucx listener started", port=server.port, ucx=version, progress=server.runtime.progress_mode)
    return server
