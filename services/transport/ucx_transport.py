"""Expert dispatch over UCX (UCXX), the worker side: one endpoint per (worker, replica), frames of
ucx_framing.py; the replica side is ucx_server.py.

    transport = UcxTransport("fp8")                   # RuntimeError (UcxUnavailable) without ucxx
    client = transport.connect(replica)               # replica.endpoints["ucx"] = "host:port"
    out = client.submit(batch, timeout=5.0).result()  # ReplicaUnavailable on endpoint error/timeout

Threads: one progress thread per process (`UcxRuntime`, ucx_runtime.py: how it progresses, sleeps
and wakes, UCXPY_PROGRESS_MODE) serves every client and listener of the process. `submit` does its
work on the caller's thread: it encodes (dtype conversion / FP8 quantisation in parallel with other
callers), then, under the runtime's `ucx` lock, posts the frame's sends and then the receives for
the reply (the replica starts on the request meanwhile); a small send completes inside that call,
and a receive is picked up by whichever thread the reply wakes, so the progress thread is not
woken for either. The caller waiting on the future (`result()`) receives the reply itself: it
drives progress while it waits (UcxRuntime.wait), so the reply wakes only that thread; callers
waiting while another one drives get their futures completed by it, and the progress thread
handles what arrives while nobody waits.

Failure: each connection keeps one timer on the progress thread, at its earliest deadline; an
endpoint error (peer killed, connection reset), a receive error or the timer fails the future
with ReplicaUnavailable. An endpoint error fails every pending future of that endpoint at once;
the next submit reconnects.
A reply that comes after its timeout lands in the buffers posted for it and is dropped.

Where bytes are copied (host memory; "GPU" = tensors on a CUDA device):
| step | copies |
|---|---|
| caller: fp32 -> bf16 / fp8 encode | one pass that writes the wire tensor (none in fp32 mode) |
| head message (header + sections that fit 256 KiB) | those sections copied into the head buffer (D2H on GPU) |
| tail sections (large hidden states, outputs) | none in Python: UCX reads the tensor's memory (TCP: kernel socket copies; cuda_ipc/RDMA: none) |
| receive | tails land in preallocated torch tensors (on `device`; a reply's before it is sent); inline sections are views of the head buffer |
| reply conversion to the caller's dtype | bf16 -> fp32 when the caller's hidden was fp32/fp8 |
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import secrets
import threading
import time
from functools import partial
from typing import Any

import numpy as np
import torch

from services.common import tensors
from services.common.errors import InvalidArgument
from services.common.logging import event, get_logger
from services.transport import ucx_framing as wire
from services.transport.base import DISPATCH_BYTES, DISPATCH_FAILURES, DISPATCH_WAIT, ExpertClient, ReplicaLike, Transport
from services.transport.ucx_runtime import (  # noqa: F401 - UcxUnavailable, ucx_available re-exported
    CLOSE_TIMEOUT_S,
    UcxRuntime,
    UcxUnavailable,
    ucx_available,
)
from services.wire.batch import ExpertBatch, result_dtype, wire_tensors
from services.wire.dtypes import check_dispatch_dtype, reply_dtype
from services.wire.failures import ReplicaUnavailable, caller_error

log = get_logger("transport.ucx")

NAME = "ucx"
_DISPATCHED = DISPATCH_BYTES.labels(NAME, "dispatch")
_COMBINED = DISPATCH_BYTES.labels(NAME, "combine")
_WAIT = DISPATCH_WAIT.labels(NAME)


def _settle(future: concurrent.futures.Future, result=None, error: Exception | None = None) -> None:
    """Complete `future` unless it already is (a timer and a reply may race to it)."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


class _Pending:
    """One submitted batch until its reply (or failure); a plain class with slots: one per call."""

    __slots__ = ("future", "started", "deadline", "out_dtype", "device", "shape", "tail", "tail_request",
                 "settled")

    def __init__(self, future: concurrent.futures.Future, started: float, deadline: float,
                 out_dtype: torch.dtype, device: torch.device, shape: tuple[int, int]) -> None:
        self.future = future
        self.started = started          # time.monotonic() at submit
        self.deadline = deadline        # time.monotonic() by which the reply must be here
        self.out_dtype = out_dtype      # what the caller gets back
        self.device = device            # where the output tensor is received
        self.shape = shape              # of the reply's output, [T, H] in the reply dtype
        self.tail: torch.Tensor | None = None   # the output, when it travels as a tail: received in place
        self.tail_request: Any = None           # its posted receive
        self.settled = False            # outcome decided (the future may be completed a moment later)


def _fail(runtime: UcxRuntime, pending: _Pending, err: Exception, reason: str) -> None:
    if pending.settled:
        return
    pending.settled = True
    _WAIT.observe(time.monotonic() - pending.started)
    DISPATCH_FAILURES.labels(NAME, reason).inc()
    runtime.wake_later(partial(_settle, pending.future, error=err))


class _Connection:
    """One UCX endpoint to a replica and the replies it waits for. A caller thread opens it and
    posts on it; its receive side, timers and failure run where progress runs."""

    def __init__(self, client: "UcxExpertClient") -> None:
        self.client = client
        self.runtime = runtime = client.runtime
        self.link = secrets.randbits(32)   # the replica tags every message to us with it
        self.pending: dict[int, _Pending] = {}
        # one timer per connection, at the earliest deadline of its pending requests (a timer per
        # request filled the runtime's heap with timers of requests answered long before)
        self.expiry_at = math.inf
        self.broken: str | None = None
        self.connected = False
        host, port = client.address
        self.endpoint = runtime.api.UCXEndpoint.create(runtime.worker, host, port, True)
        # runs inside UCX's progress: act after it returns
        self.endpoint.set_close_callback(runtime.call, (partial(self.fail, "endpoint closed or failed"),))
        # the process's inline limit holds for both directions of the link (requests are encoded
        # with it before a connection is picked)
        hello = np.array([self.link, runtime.inline_limit], dtype="<u8")
        runtime.watch(self.endpoint.stream_send(runtime.Array(hello)), self._hello_sent, keep=hello)
        runtime.call_at(time.monotonic() + client.connect_timeout, self._check_connected)

    # ---- on a caller's thread ---------------------------------------------------------------
    def submit(self, sequence: int, pending: _Pending, frame: wire.Frame, reply_dtype: torch.dtype) -> None:
        """Post the request, then the receives for its reply; raises ReplicaUnavailable or a UCXX
        error. The request goes first: the replica works on it while this thread posts the rest.
        No thread progresses the worker meanwhile (this one holds `ucx`), so the reply cannot be
        matched before its receives exist."""
        if self.endpoint is None:   # fail() runs under `ucx` too: this cannot change below
            raise ReplicaUnavailable(self.client.replica_id, self.broken or "endpoint closed")
        try:
            self.runtime.send_frame(self.endpoint, self.link, wire.KIND_REQUEST, sequence, frame, self.fail)
            # a fresh buffer per reply: an inline output handed to the caller is a view of it
            head = np.empty(wire.reply_head_size(pending.shape, reply_dtype, self.runtime.inline_limit), dtype=np.uint8)
            head_request = self.runtime.receive(self.endpoint, head, wire.tag(self.link, wire.KIND_REPLY, 0, sequence))
            if wire.inline_count([wire.Section(pending.shape, reply_dtype)], self.runtime.inline_limit) == 0:
                pending.tail = torch.empty(pending.shape, dtype=reply_dtype, device=pending.device)
                pending.tail_request = self.runtime.receive(
                    self.endpoint, wire.byte_view(pending.tail), wire.tag(self.link, wire.KIND_REPLY, 1, sequence))
            self.pending[sequence] = pending
            # the reply's arrival wakes whichever thread progresses (the waiting caller, mostly)
            self.runtime.watch(head_request, partial(self._on_head, pending, head), keep=head, wake=False)
            if pending.deadline < self.expiry_at:
                self._expire_at(pending.deadline)
        except BaseException:
            self.pending.pop(sequence, None)
            pending.tail = pending.tail_request = None   # cancels that receive, under `ucx`
            raise

    # ---- where progress runs (the progress thread or a driving caller) ----------------------
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

    def _on_head(self, pending: _Pending, head: np.ndarray, request) -> None:
        if self.endpoint is None:   # failed: fail() settled the request already
            return
        try:
            request.check_error()
            header = wire.parse_header(head, wire.KIND_REPLY)
        except Exception as err:  # noqa: BLE001 - peer death shows up as a UCXX error here
            self.fail(f"receive failed: {type(err).__name__}: {err}")
            return
        if self.pending.pop(header.sequence, None) is not pending:
            self.fail(f"reply {header.sequence} came under the tag of another request")
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
            tensors, _ = wire.split_inline(head, header, wire.reply_sections(header), self.runtime.inline_limit)
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

    def _expire_at(self, deadline: float) -> None:
        """Check the pending requests for expiry at `deadline` (hold `ucx`)."""
        self.expiry_at = deadline
        self.runtime.call_at(deadline, partial(self._expire, deadline))

    def _expire(self, deadline: float) -> None:
        if deadline != self.expiry_at:   # superseded by an earlier check
            return
        now, earliest = time.monotonic(), math.inf
        for pending in self.pending.values():
            if pending.settled:
                continue
            if pending.deadline <= now:
                # stays in `pending`: a late reply then lands in the receive posted for it
                _fail(self.runtime, pending, ReplicaUnavailable(
                    self.client.replica_id, f"no reply within {now - pending.started:.3g}s"), "timeout")
            else:
                earliest = min(earliest, pending.deadline)
        self.expiry_at = math.inf
        if earliest < math.inf:
            self._expire_at(earliest)

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
        self.reply_dtype = tensors.DTYPES[reply_dtype(dispatch_dtype)]
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
        future = self.runtime.future()
        hidden = batch.hidden
        started = time.monotonic()
        pending = _Pending(future, started, started + timeout, result_dtype(hidden.dtype), hidden.device,
                           tuple(hidden.shape))
        sequence = next(self._sequence)
        try:
            wire_hidden, scales, ids, weights = wire_tensors(batch, self.dispatch_dtype)
            frame = wire.encode_request(sequence, batch.layer, ids, weights, wire_hidden, scales, self.reply_dtype,
                                        self.runtime.inline_limit)
        except InvalidArgument as err:   # e.g. fp8 refuses NaN/Inf hidden
            _fail(self.runtime, pending, err, "invalid")
            return future
        except ValueError as err:        # shapes that disagree
            _fail(self.runtime, pending, InvalidArgument(f"expert batch: {err}"), "invalid")
            return future
        _DISPATCHED.inc(frame.nbytes)
        connection = None
        try:
            with self.runtime.ucx:
                connection = self._connect()
                connection.submit(sequence, pending, frame, self.reply_dtype)
        except ReplicaUnavailable as err:
            _fail(self.runtime, pending, err, "closed" if self._closed else "endpoint")
        except Exception as err:  # noqa: BLE001 - UCXX raises its own errors for a dead endpoint
            reason = f"send failed: {type(err).__name__}: {err}"
            _fail(self.runtime, pending, ReplicaUnavailable(self.replica_id, reason), "endpoint")
            if connection is not None:
                self.runtime.call(partial(connection.fail, reason))
        return future

    # ---- where progress runs (the progress thread or a driving caller) ----------------------
    def reject(self, pending: _Pending, header: wire.Header, head: np.ndarray) -> None:
        error = caller_error(self.replica_id, wire.STATUS_NAMES.get(header.status, ""), wire.error_text(head, header))
        _fail(self.runtime, pending, error, "invalid" if isinstance(error, InvalidArgument) else "replica")

    def resolve(self, pending: _Pending, output: torch.Tensor) -> None:
        _COMBINED.inc(wire.HEADER.size + output.nbytes)
        if pending.settled:   # timed out already: the late reply is dropped
            return
        pending.settled = True
        output = output.to(device=pending.device, dtype=pending.out_dtype)
        _WAIT.observe(time.monotonic() - pending.started)
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
