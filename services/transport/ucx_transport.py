"""Expert dispatch over UCX (UCXX): one endpoint per (worker, replica), frames of ucx_framing.py.

    transport = UcxTransport("fp8")                   # RuntimeError (UcxUnavailable) without ucxx
    client = transport.connect(replica)               # replica.endpoints["ucx"] = "host:port"
    out = client.submit(batch, timeout=5.0).result()  # ReplicaUnavailable on endpoint error/timeout

    server = serve_ucx(50054, shard.compute)          # beside the shard's gRPC server
    server.close()

Threads: UCXX's asyncio API runs in one private event-loop thread per process (`_UcxRuntime`),
shared by every client and listener of the process. `submit` encodes on the caller's thread
(dtype conversion / FP8 quantisation in parallel with other callers) and hands the frame to the
loop. The listener runs each request's `compute` in a thread pool, so requests from many
workers reach the shard concurrently and its compute thread merges them per layer.

Failure: every request has a timer on the loop; an endpoint error (peer killed, connection
reset), a receive error or the timer fails the future with ReplicaUnavailable. An endpoint
error fails every pending future of that endpoint at once; the next submit reconnects.

Progress: UCXX's own progress thread plus Python futures (UCXPY_PROGRESS_MODE=thread,
UCXPY_ENABLE_PYTHON_FUTURE=1) by default: a request completes by a notifier setting its asyncio
future. Without Python futures UCXX waits by re-polling every pending request on each loop turn,
and an endpoint always has a receive pending, so an idle client or listener burns a whole core
(measured ~0.9 CPU-s per second idle) and starves the threads that do the work. Both variables
override the default; benchmarks/transport_bench.py compares the modes. Re-polling (blocking or
polling mode) gave raw single-threaded UCX the lowest small-message round trip here (~120 us vs
~1.1 ms), but in this module the spinning loop thread holds the GIL against the callers and the
compute threads, and the expert path got ~10x slower: keep it for processes with cores to spare
and no other Python threads. UCX_* variables
(UCX_TLS, UCX_RNDV_THRESH, ...) apply as usual.

Where bytes are copied (host memory; "GPU" = tensors on a CUDA device):
| step | copies |
|---|---|
| caller: fp32 -> bf16 / fp8 encode | one pass that writes the wire tensor (none in fp32 mode) |
| head message (header + sections that fit 8 KiB) | small sections copied into the head buffer (D2H on GPU) |
| tail sections (large hidden states, outputs) | none in Python: UCX reads the tensor's memory (TCP: kernel socket copies; cuda_ipc/RDMA: none) |
| receive | tails land in preallocated torch tensors (on `device`); inline sections are views of the head buffer |
| reply conversion to the caller's dtype | bf16 -> fp32 when the caller's hidden was fp32/fp8 |
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
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

log = get_logger("transport.ucx")

NAME = "ucx"
DEFAULT_PROGRESS_MODE = "thread"
COMPUTE_THREADS = 32          # concurrent compute calls the listener keeps in flight
CLOSE_TIMEOUT_S = 5.0


class UcxUnavailable(RuntimeError):
    """UCXX cannot be used in this process; `--transport ucx` must stop here, not fall back."""


_import_result: tuple[bool, str] | None = None


def ucx_available() -> tuple[bool, str]:
    """(True, "ucxx <version> / UCX <version>") or (False, why it cannot be imported)."""
    global _import_result
    if _import_result is None:
        # UCXX sets UCX_MEMTYPE_CACHE itself, which UCX >= 1.19 no longer knows and warns about
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        try:
            import ucxx
        except Exception as err:  # noqa: BLE001 - a broken install raises more than ImportError
            _import_result = (False, f"cannot import ucxx ({type(err).__name__}: {err}); "
                                     "install ucxx-cu12 (or ucxx-cu13) or use --transport grpc")
        else:
            _import_result = (True, f"ucxx {ucxx.__version__} / UCX {ucxx.__ucx_version__}")
    return _import_result


def _require_ucx():
    ok, reason = ucx_available()
    if not ok:
        raise UcxUnavailable(f"transport 'ucx': {reason}")
    import ucxx

    return ucxx


def _wire_buffer(tensor: torch.Tensor):
    """What UCXX accepts for a uint8 torch tensor: numpy on the host, the tensor on a GPU
    (torch exposes __cuda_array_interface__); neither copies."""
    return tensor if tensor.is_cuda else tensor.numpy()


class _UcxRuntime:
    """The process's UCX worker and the event-loop thread that drives it."""

    _instance: "_UcxRuntime | None" = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self.ucxx = _require_ucx()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ucx-loop", daemon=True)
        self.thread.start()
        self.run(self._init(), timeout=60.0)

    @classmethod
    def get(cls) -> "_UcxRuntime":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = _UcxRuntime()
            return cls._instance

    async def _init(self) -> None:
        # inside the loop, so UCXX binds its progress (event fd reader) to this loop
        mode = os.environ.get("UCXPY_PROGRESS_MODE", DEFAULT_PROGRESS_MODE)
        python_future = os.environ.get("UCXPY_ENABLE_PYTHON_FUTURE", "1") != "0" and mode.startswith("thread")
        try:
            self.ucxx.init(progress_mode=mode, enable_python_future=python_future)
        except RuntimeError:  # initialised by someone else in this process: just drive it here too
            self.ucxx.continuous_ucx_progress(event_loop=self.loop)
        # UCXX's notifier thread is not a daemon and only ends when told to; interpreter exit joins
        # non-daemon threads *before* atexit handlers, so stop it from the hook that runs earlier
        register = getattr(threading, "_register_atexit", atexit.register)
        register(self.ucxx.stop_notifier_thread)
        self.progress_mode = mode

    def run(self, coro, timeout: float):
        """Run `coro` on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@dataclass
class _Pending:
    future: concurrent.futures.Future
    started: float                 # time.monotonic() at submit
    out_dtype: torch.dtype         # what the caller gets back
    device: torch.device           # where the output tensor is received
    timer: asyncio.TimerHandle | None = None


def _fail(pending: _Pending, err: Exception, reason: str) -> None:
    if pending.timer is not None:
        pending.timer.cancel()
    DISPATCH_WAIT.labels(NAME).observe(time.monotonic() - pending.started)
    DISPATCH_FAILURES.labels(NAME, reason).inc()
    if not pending.future.done():
        pending.future.set_exception(err)


async def _send_frame(endpoint, frame: wire.Frame) -> None:
    if not frame.tails:  # the common decode case: one message, no task to spawn
        await endpoint.send(frame.head.numpy())
        return
    # posted together: UCX keeps one endpoint's tag messages in order, and the tails of a large
    # frame then stream while the head is still in flight
    await asyncio.gather(*(endpoint.send(_wire_buffer(part)) for part in (frame.head, *frame.tails)))


async def _receive_head(endpoint, kind: int) -> tuple[wire.Header, torch.Tensor]:
    """The next frame's header and head buffer (a fresh one per frame: inline views stay valid)."""
    head = torch.empty(wire.HEAD_CAPACITY, dtype=torch.uint8)
    await endpoint.recv(head.numpy())
    return wire.parse_header(head, kind), head


async def _receive_sections(endpoint, header: wire.Header, head: torch.Tensor,
                            device: torch.device | None) -> list[torch.Tensor]:
    """Every section of the frame: views of `head` for inline ones, tails received on `device`."""
    sections = wire.request_sections(header) if header.kind == wire.KIND_REQUEST else wire.reply_sections(header)
    tensors, tails = wire.split_inline(head, header, sections)
    for section in tails:
        tensor = torch.empty(section.shape, dtype=section.dtype, device=device)
        await endpoint.recv(_wire_buffer(wire.byte_view(tensor)))
        tensors.append(tensor)
    return tensors


class _Connection:
    """One UCX endpoint to a replica: its send queue, its pending futures, its receive loop.
    Lives on the runtime's loop; every method runs there."""

    def __init__(self, client: "UcxExpertClient") -> None:
        self.client = client
        self.pending: dict[int, _Pending] = {}
        self.sendq: asyncio.Queue[wire.Frame] = asyncio.Queue()
        self.broken: str | None = None
        self.endpoint = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        client = self.client
        host, port = client.address
        try:
            self.endpoint = await asyncio.wait_for(
                client.runtime.ucxx.create_endpoint(host, port, connect_timeout=client.connect_timeout),
                client.connect_timeout)
        except Exception as err:  # noqa: BLE001 - any connect failure is the replica's
            self.fail(f"cannot connect to ucx://{host}:{port}: {type(err).__name__}: {err}")
            return
        receiver = asyncio.get_running_loop().create_task(self._receive_loop())
        try:
            while True:
                await _send_frame(self.endpoint, await self.sendq.get())
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - endpoint errors surface here as UCXX exceptions
            self.fail(f"send failed: {type(err).__name__}: {err}")
        finally:
            receiver.cancel()

    async def _receive_loop(self) -> None:
        try:
            while True:
                header, head = await _receive_head(self.endpoint, wire.KIND_REPLY)
                waiting = self.pending.get(header.sequence)
                tensors = await _receive_sections(self.endpoint, header, head,
                                                  waiting.device if waiting is not None else None)
                DISPATCH_BYTES.labels(NAME, "combine").inc(wire.HEADER.size + header.text_bytes
                                                           + sum(t.nbytes for t in tensors))
                pending = self.pending.pop(header.sequence, None)
                if pending is not None:  # None: it timed out already; the late reply is dropped
                    self.client.resolve(pending, header, head, tensors)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - peer death shows up as a UCXX error here
            self.fail(f"receive failed: {type(err).__name__}: {err}")

    def add(self, sequence: int, pending: _Pending, frame: wire.Frame) -> None:
        self.pending[sequence] = pending
        self.sendq.put_nowait(frame)

    def fail(self, reason: str) -> None:
        """Mark broken, fail every pending future, drop the endpoint (the next submit reconnects)."""
        if self.broken is None:
            self.broken = reason
        pending, self.pending = self.pending, {}
        if pending:
            event(log, "ucx endpoint failed", level=logging.WARNING, replica=self.client.replica_id,
                  pending=len(pending), reason=reason)
        for item in pending.values():
            _fail(item, ReplicaUnavailable(self.client.replica_id, reason), "endpoint")
        self.task.cancel()
        if self.endpoint is not None:
            self.endpoint.abort()
            self.endpoint = None


class UcxExpertClient(ExpertClient):
    """The UCX link from this worker to one replica; thread-safe, reconnects after a failure."""

    def __init__(self, replica_id: str, address: str, dispatch_dtype: str, runtime: _UcxRuntime,
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
        self._connection: _Connection | None = None   # touched on the loop only
        self._closed = False
        self.connections_opened = 0

    def submit(self, batch: ExpertBatch, timeout: float) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        hidden = batch.hidden
        out_dtype = hidden.dtype if hidden.dtype in (torch.float32, torch.bfloat16) else torch.float32
        pending = _Pending(future, time.monotonic(), out_dtype, hidden.device)
        sequence = next(self._sequence)
        try:
            if batch.hidden_scales is not None or hidden.dtype == torch.float8_e4m3fn:
                wire_hidden, scales = hidden, batch.hidden_scales   # quantised by the caller already
            else:
                wire_hidden, scales = fp8.encode_hidden(hidden, self.dispatch_dtype)
            frame = wire.encode_request(sequence, batch.layer, batch.expert_ids, batch.weights,
                                        wire_hidden, scales, self.reply_dtype)
        except ValueError as err:
            _fail(pending, InvalidArgument(f"expert batch: {err}"), "invalid")
            return future
        DISPATCH_BYTES.labels(NAME, "dispatch").inc(frame.nbytes)
        try:
            self.runtime.loop.call_soon_threadsafe(self._enqueue, sequence, pending, frame, timeout)
        except RuntimeError as err:  # loop closed: only at interpreter shutdown
            _fail(pending, ReplicaUnavailable(self.replica_id, f"ucx loop stopped: {err}"), "closed")
        return future

    # ---- on the loop ------------------------------------------------------------------------
    def _enqueue(self, sequence: int, pending: _Pending, frame: wire.Frame, timeout: float) -> None:
        if self._closed:
            _fail(pending, ReplicaUnavailable(self.replica_id, "client closed"), "closed")
            return
        connection = self._connection
        if connection is None or connection.broken is not None:
            connection = self._connection = _Connection(self)
            self.connections_opened += 1
        pending.timer = self.runtime.loop.call_later(
            max(0.0, pending.started + timeout - time.monotonic()), self._expire, connection, sequence)
        connection.add(sequence, pending, frame)

    def _expire(self, connection: _Connection, sequence: int) -> None:
        pending = connection.pending.pop(sequence, None)
        if pending is not None:
            pending.timer = None
            _fail(pending, ReplicaUnavailable(
                self.replica_id, f"no reply within {time.monotonic() - pending.started:.3g}s"), "timeout")

    def resolve(self, pending: _Pending, header: wire.Header, head: torch.Tensor,
                tensors: list[torch.Tensor]) -> None:
        if header.status != wire.STATUS_OK:
            message = wire.error_text(head, header)
            if header.status == wire.STATUS_INVALID:
                _fail(pending, InvalidArgument(message), "invalid")
            else:
                _fail(pending, ReplicaUnavailable(self.replica_id, message), "replica")
            return
        if pending.timer is not None:
            pending.timer.cancel()
        # an inline output is a view of its frame's own head buffer, which nothing else reuses
        output = tensors[0].to(device=pending.device, dtype=pending.out_dtype)
        DISPATCH_WAIT.labels(NAME).observe(time.monotonic() - pending.started)
        if not pending.future.done():
            pending.future.set_result(output)

    async def _close_on_loop(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.fail("client closed")

    def close(self) -> None:
        if self._closed:
            return
        self.runtime.run(self._close_on_loop(), timeout=CLOSE_TIMEOUT_S)


class UcxTransport(Transport):
    name = NAME

    def __init__(self, dispatch_dtype: str, connect_timeout: float = 5.0) -> None:
        self.dispatch_dtype = check_dispatch_dtype(dispatch_dtype)
        self.connect_timeout = connect_timeout
        self.runtime = _UcxRuntime.get()

    def connect(self, replica: ReplicaLike) -> UcxExpertClient:
        address = (replica.endpoints or {}).get("ucx")
        if not address:
            raise ReplicaUnavailable(replica.id, "registry record has no ucx endpoint (expert started "
                                                 "without --ucx-port?)")
        return UcxExpertClient(replica.id, address, self.dispatch_dtype, self.runtime, self.connect_timeout)


# ---- shard side ---------------------------------------------------------------------------------
Compute = Callable[[ExpertBatch], torch.Tensor]


class UcxServer:
    """A UCX listener that answers request frames with `compute(batch)`; see serve_ucx."""

    def __init__(self, port: int, compute: Compute, device: str | torch.device = "cpu") -> None:
        self.runtime = _UcxRuntime.get()
        self.compute = compute
        self.device = torch.device(device)
        self.pool = concurrent.futures.ThreadPoolExecutor(COMPUTE_THREADS, thread_name_prefix="ucx-compute")
        self.endpoints: set = set()
        self.tasks: set[asyncio.Task] = set()
        self.listener = self.runtime.run(self._listen(port), timeout=30.0)
        self.port = self.listener.port

    async def _listen(self, port: int):
        return self.runtime.ucxx.create_listener(self._serve_endpoint, port)

    async def _serve_endpoint(self, endpoint) -> None:
        """One worker's endpoint: receive frames until it goes away; compute each concurrently."""
        self.endpoints.add(endpoint)
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[wire.Frame] = asyncio.Queue()
        sender = loop.create_task(self._send_replies(endpoint, replies))
        try:
            while True:
                header, head = await _receive_head(endpoint, wire.KIND_REQUEST)
                tensors = await _receive_sections(endpoint, header, head, self.device)
                task = loop.create_task(self._answer(header, tensors, replies))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except asyncio.CancelledError:
            raise
        except wire.FrameError as err:
            event(log, "ucx peer sent a bad frame; dropping its endpoint", level=logging.WARNING, error=str(err))
        except Exception as err:  # noqa: BLE001 - the worker went away (closed, killed, reset)
            event(log, "ucx peer disconnected", level=logging.DEBUG, error=f"{type(err).__name__}: {err}")
        finally:
            sender.cancel()
            self.endpoints.discard(endpoint)
            endpoint.abort()

    async def _answer(self, header: wire.Header, tensors: list[torch.Tensor],
                      replies: asyncio.Queue[wire.Frame]) -> None:
        frame = await asyncio.get_running_loop().run_in_executor(self.pool, self._reply_frame, header, tensors)
        replies.put_nowait(frame)

    def _reply_frame(self, header: wire.Header, tensors: list[torch.Tensor]) -> wire.Frame:
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

    @staticmethod
    async def _send_replies(endpoint, replies: asyncio.Queue[wire.Frame]) -> None:
        try:
            while True:
                await _send_frame(endpoint, await replies.get())
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the receive loop sees the same endpoint error and cleans up
            return

    async def _close_on_loop(self) -> None:
        self.listener.close()
        for task in list(self.tasks):
            task.cancel()
        for endpoint in list(self.endpoints):
            endpoint.abort()
        self.endpoints.clear()

    def close(self) -> None:
        """Stop listening and drop every worker's endpoint (their pending calls fail over)."""
        if self.listener.closed:
            return
        self.runtime.run(self._close_on_loop(), timeout=CLOSE_TIMEOUT_S)
        self.pool.shutdown(wait=False, cancel_futures=True)


def serve_ucx(port: int, compute: Compute, device: str | torch.device = "cpu") -> UcxServer:
    """Listen for expert frames on `port` (0: any free port, see .port); tails of incoming
    frames are received on `device`. Raises UcxUnavailable when ucxx cannot be imported."""
    server = UcxServer(port, compute, device)
    ok, version = ucx_available()
    event(log, "ucx listener started", port=server.port, ucx=version, progress=server.runtime.progress_mode)
    return server
