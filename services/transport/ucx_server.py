"""The shard side of the UCX expert path: a listener that answers request frames (ucx_framing.py).

    server = serve_ucx(50054, shard.submit)           # submit(batch, reply_dtype) -> Future
    server = serve_ucx(0, run_in_threads(compute))    # a blocking compute(batch) (tests, stand-ins)
    server.close()

Threads: the process's progress thread (ucx_runtime.py) probes for request heads (their length
varies with the inline sections), receives each whole, and hands the request to
`submit` itself, right before it sleeps; the thread that completes the future (the shard's compute
thread) encodes and posts the reply from the future's callback. A request therefore wakes one
thread between arriving and being answered (the shard's compute thread), and none when its future
is complete on return. `submit` must not block: ExpertShard.submit validates and queues.
"""

from __future__ import annotations

import concurrent.futures
import logging
from functools import partial
from typing import Callable

import numpy as np
import torch

from services.common.logging import event, get_logger
from services.transport import ucx_framing as wire
from services.transport.ucx_runtime import CLOSE_TIMEOUT_S, UcxRuntime, ignore, ucx_available
from services.wire.batch import ExpertBatch
from services.wire.failures import replica_status

log = get_logger("transport.ucx")

COMPUTE_THREADS = 32          # concurrent blocking compute calls run_in_threads keeps in flight

Compute = Callable[[ExpertBatch], torch.Tensor]
Submit = Callable[[ExpertBatch, torch.dtype], "concurrent.futures.Future[torch.Tensor]"]


def run_in_threads(compute: Compute, threads: int = COMPUTE_THREADS) -> Submit:
    """A blocking `compute(batch)` as a listener's submit: each batch runs on a pool thread, which
    converts the output to the reply dtype."""
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ucx-compute")
    return lambda batch, reply_dtype: pool.submit(lambda: compute(batch).to(reply_dtype))


class _Peer:
    """One worker's endpoint at a listener: requests are received on the progress thread, replies
    posted by the thread that completes each request's future."""

    def __init__(self, server: "UcxServer", endpoint) -> None:
        self.server = server
        self.runtime = runtime = server.runtime
        self.endpoint = endpoint
        self.link = 0
        self.inline_limit = wire.DEVICE_INLINE_LIMIT   # the worker's hello names the link's limit
        endpoint.set_close_callback(runtime.call, (partial(self.drop, "endpoint closed or failed"),))
        hello = np.zeros(2, dtype="<u8")
        runtime.watch(endpoint.stream_recv(runtime.Array(hello)), partial(self._on_hello, hello), keep=hello)

    # ---- where progress runs (the progress thread or a driving caller) ----------------------
    def _on_hello(self, hello: np.ndarray, request) -> None:
        try:
            request.check_error()
            self.link, limit = int(hello[0]), int(hello[1])
            if not 0 <= limit <= wire.INLINE_LIMIT:
                raise wire.FrameError(f"hello names an inline limit of {limit} bytes (at most {wire.INLINE_LIMIT})")
            self.inline_limit = limit
        except Exception as err:  # noqa: BLE001
            self.drop(f"{type(err).__name__}: {err}")
            return
        self.runtime.route_heads(self.link, self._on_probed)

    def _on_probed(self, probed) -> None:
        """A request head is here (probed.length bytes): receive it whole."""
        if self.endpoint is None:
            return
        head = np.empty(probed.length, dtype=np.uint8)
        try:
            request = self.runtime.receive_probed(self.endpoint, head, probed)
        except Exception as err:  # noqa: BLE001 - the worker went away (closed, killed, reset)
            self.drop(f"{type(err).__name__}: {err}")
            return
        if request.completed:
            self._on_head(head, request)
        else:
            self.runtime.watch(request, partial(self._on_head, head), keep=head)

    def _on_head(self, head: np.ndarray, request) -> None:
        if self.endpoint is None:
            return
        try:
            request.check_error()
            header = wire.parse_header(head, wire.KIND_REQUEST)
            tensors, sections = wire.split_inline(head, header, wire.request_sections(header), self.inline_limit)
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
        """Submit the request once every tail of it is in `tensors`."""
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
        # before sleeping, outside `ucx`: a compute thread posting a reply meanwhile does not wait
        self.runtime.wake_later(partial(self._submit, header, tensors))

    def _submit(self, header: wire.Header, tensors: list[torch.Tensor]) -> None:
        ids, weights, *rest = tensors
        batch = ExpertBatch(header.layer, rest[-1], ids, weights, rest[0] if len(rest) == 2 else None)
        try:
            future = self.server.submit(batch, header.reply_dtype)
        except Exception as err:  # noqa: BLE001 - bad input or draining: the reply says which
            self._send(header.sequence, _error_frame(header, err))
            return
        future.add_done_callback(partial(self._answer, header))

    def drop(self, reason: str) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is None:
            return
        event(log, "ucx peer disconnected", level=logging.DEBUG, reason=reason)
        self.server.peers.discard(self)
        self.runtime.unroute_heads(self.link)
        self.runtime.close_endpoint(endpoint)

    # ---- on the thread that completed the future (or where progress runs) ------------------
    def _answer(self, header: wire.Header, future: concurrent.futures.Future) -> None:
        try:
            frame = wire.encode_reply(header.sequence, future.result().to(header.reply_dtype), self.inline_limit)
        except Exception as err:  # noqa: BLE001 - reported to the caller, never fatal to the listener
            frame = _error_frame(header, err)
        self._send(header.sequence, frame)

    def _send(self, sequence: int, frame: wire.Frame) -> None:
        with self.runtime.ucx:   # drop() runs under it too: the endpoint stays open meanwhile
            if self.endpoint is None:
                return
            try:
                self.runtime.send_frame(self.endpoint, self.link, wire.KIND_REPLY, sequence, frame, ignore)
            except Exception:  # noqa: BLE001 - the receive side sees the same endpoint error and drops it
                return


def _error_frame(header: wire.Header, err: Exception) -> wire.Frame:
    code, message = replica_status(err, transport="ucx", layer=header.layer, sequence=header.sequence)
    return wire.encode_error(header.sequence, wire.status_byte(code.name), message)


class UcxServer:
    """A UCX listener that answers request frames with `submit(batch, reply_dtype)`; see serve_ucx."""

    def __init__(self, port: int, submit: Submit, device: str | torch.device = "cpu") -> None:
        self.runtime = UcxRuntime.get()
        self.submit = submit
        self.device = torch.device(device)
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


def serve_ucx(port: int, submit: Submit, device: str | torch.device = "cpu") -> UcxServer:
    """Listen for expert frames on `port` (0: any free port, see .port); tails of incoming
    frames are received on `device`. Raises UcxUnavailable when ucxx cannot be imported."""
    server = UcxServer(port, submit, device)
    ok, version = ucx_available()
    event(log, "ucx listener started", port=server.port, ucx=version, progress=server.runtime.progress_mode)
    return server
