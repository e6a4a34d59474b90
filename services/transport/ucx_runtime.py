"""The process's UCX progress engine (`UcxRuntime`), shared by every client (ucx_transport.py)
and listener (ucx_server.py) of the process.

    runtime = UcxRuntime.get()                # UcxUnavailable (a RuntimeError) without ucxx
    with runtime.ucx:                         # around every UCXX call, on any thread
        runtime.send_frame(endpoint, link, kind, sequence, frame, on_error)
        runtime.watch(request, on_complete)   # on_complete(request) where progress runs
    future = runtime.future()                 # future.result() drives progress while it waits

Threads: one progress thread per process owns a UCXX worker of the low-level API (no asyncio, no
UCXX progress or notifier thread). Any thread may post requests itself under the runtime's `ucx`
lock (a small send completes inside that call, so the progress thread is not woken for it) and
hands the rest to the progress thread: `watch` a request until it completes, `call` a function
there, `call_at` a time, or `run` a function there and wait for its result. Handlers run where
progress runs; one that wakes another thread (completes a future, starts a compute) goes through
`wake_later`.

Progress: the thread progresses the worker until it has nothing left, handles the requests that
completed, arms the worker and sleeps in epoll on the worker's event fd, plus an eventfd that other
threads write when they leave it something to do (a send that did not complete at once, a new
connection, a timer earlier than the one it sleeps until). It holds the GIL only while it handles
a completion, and wakes the threads it completed work for only once it is about to sleep (woken
earlier, they took turns with it at the GIL). An idle client or listener costs no CPU. This
replaced UCXX's asyncio API, where a reply went UCXX progress thread -> notifier thread -> event
loop -> caller, and whose re-polling modes spin a core while holding the GIL.

A caller waiting on a `runtime.future()` takes the worker's fd over while it waits (`wait`): the
reply wakes that caller, which runs the handlers and completes its future itself, instead of
waking the progress thread, which then woke the caller. One caller drives at a time; the
progress thread keeps its eventfd and timers meanwhile, and the worker's fd when the caller
returns.

UCXPY_PROGRESS_MODE=polling makes the thread spin on progress instead of sleeping (for nodes with
cores to spare; the chart sets it on GPU nodes), and callers then simply wait; any other value
sleeps. UCX_* variables (UCX_TLS, UCX_RNDV_THRESH, ...) apply as usual and override UCX_DEFAULTS.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import heapq
import itertools
import logging
import math
import os
import select
import threading
import time
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from services.common.logging import event, get_logger
from services.transport import ucx_framing as wire

log = get_logger("transport.ucx")

CLOSE_TIMEOUT_S = 5.0
# UCX settings this runtime changes from UCX's (and UCXX's) defaults; a UCX_<NAME> variable set
# before the process imports ucxx wins. TCP moves 8 KiB segments by default, so a 1 MiB tail was
# 128 messages; 512 KiB segments cut loopback round trips from 1 MiB up by about half (TCP only:
# other transports ignore these).
UCX_DEFAULTS = {"TCP_TX_SEG_SIZE": "512K", "TCP_RX_SEG_SIZE": "512K"}
# On hosts with neither CUDA nor an RDMA device (TCP is all UCX has), every message goes eager.
# Rendezvous (UCX's choice from 8 KiB) has the receiver answer the sender before any data moves:
# over TCP that is two more wake-ups per tail, which made 16 to 256 KiB round trips about 1.5x
# slower. GPU buffers (cuda_ipc) and RDMA zero-copy need rendezvous, so there UCX's threshold stays.
UCX_TCP_ONLY_DEFAULTS = {"RNDV_THRESH": "inf"}
RDMA_DEVICES = "/sys/class/infiniband"
# A sleeping progress thread may serve a timer this late. Answered requests leave their timers in
# the heap; the slack lets the thread discard them in batches instead of waking for each one.
TIMER_SLACK_S = 0.05


class UcxUnavailable(RuntimeError):
    """UCXX cannot be used in this process; `--transport ucx` must stop here, not fall back."""


_import_result: tuple[bool, str] | None = None
_user_settings: frozenset[str] = frozenset()   # UCX_* variables set before ucxx added its own


def ucx_available() -> tuple[bool, str]:
    """(True, "ucxx <version> / UCX <version>") or (False, why it cannot be imported)."""
    global _import_result, _user_settings
    if _import_result is None:
        _user_settings = frozenset(name for name in os.environ if name.startswith("UCX_"))
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


def _wire_buffer(tensor: torch.Tensor):
    """What UCXX accepts for a uint8 torch tensor: numpy on the host, the tensor on a GPU
    (torch exposes __cuda_array_interface__); neither copies."""
    return tensor if tensor.is_cuda else tensor.numpy()


class UcxRuntime:
    """The process's UCX worker and the thread that progresses it (see Progress above)."""

    _instance: "UcxRuntime | None" = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        ok, reason = ucx_available()
        if not ok:
            raise UcxUnavailable(f"transport 'ucx': {reason}")
        from ucxx._lib import libucxx as api
        from ucxx._lib.arr import Array

        self.api, self.Array = api, Array
        cuda = torch.cuda.is_available()
        tcp_only = not cuda and not (os.path.isdir(RDMA_DEVICES) and os.listdir(RDMA_DEVICES))
        defaults = {**UCX_DEFAULTS, **UCX_TCP_ONLY_DEFAULTS} if tcp_only else UCX_DEFAULTS
        # the inline limit of the links this process opens (ucx_framing: GPU tensors go as tails)
        self.inline_limit = wire.INLINE_LIMIT if tcp_only else wire.DEVICE_INLINE_LIMIT
        # importing ucxx set UCX_RNDV_THRESH=8192 (and more) in os.environ: only the user's win
        config = {name: value for name, value in defaults.items() if f"UCX_{name}" not in _user_settings}
        context = api.UCXContext(config, feature_flags=(api.Feature.TAG, api.Feature.STREAM, api.Feature.WAKEUP))
        # no delayed submission and no Python futures: requests are posted by the calling thread
        # and completion is read from the request itself
        self.worker = api.UCXWorker(context)
        self.worker.init_blocking_progress_mode()
        self.polling = os.environ.get("UCXPY_PROGRESS_MODE") == "polling"
        self.progress_mode = "polling" if self.polling else "epoll"
        self._worker_fd = self.worker.epoll_file_descriptor
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._worker_fd, select.EPOLLIN)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        # a caller waiting for its reply drives progress itself (see wait): one at a time, in its
        # own epoll set, while the progress thread leaves the worker's fd to it
        self._driving = threading.Lock()
        self._driver: int | None = None                            # that caller's thread ident
        self._driver_wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._driver_epoll = select.epoll()
        self._driver_epoll.register(self._worker_fd, select.EPOLLIN)
        self._driver_epoll.register(self._driver_wakeup, select.EPOLLIN)
        self._incoming: collections.deque = collections.deque()  # from other threads: calls and watches
        # request heads are probed for (their length varies) and handed to their link's handler
        self._head_routes: dict[int, Callable[[Any], None]] = {}   # link -> on_head(probe result)
        self._head_tag, self._head_mask = api.UCXXTag(0), api.UCXXTagMask(wire.HEAD_MASK)
        self._watched: list[tuple[Any, Callable, Any]] = []       # (request, on_complete, keep-alive)
        self._wakers: list[Callable[[], None]] = []                # run just before sleeping
        self._posted = 0                                           # sends and receives posted so far
        # Every UCXX call (and the release of a UCXX object) happens under this lock: posting from
        # a caller while the progress thread is inside progress() deadlocked in UCXX (its endpoint
        # mutex against the UCP worker lock). The progress thread holds it except while it sleeps
        # or wakes other threads, so a caller rarely waits, and then for one iteration.
        self.ucx = threading.RLock()
        self._lock = threading.Lock()                              # guards the two below
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._sleeping_until = 0.0                                 # 0: awake, reads the timers itself
        self._order = itertools.count()
        self._stopping = False
        # UCX's CUDA transports progress rendezvous transfers on this thread: give it the device
        # the process uses (UCXX's own progress thread did the same for device 0)
        self._cuda_device = torch.cuda.current_device() if cuda else None
        self.thread = threading.Thread(target=self._run, name="ucx-progress", daemon=True)
        self.thread.start()
        # a daemon thread inside UCX while the interpreter tears down its objects would crash it
        atexit.register(self.stop)

    @classmethod
    def get(cls) -> "UcxRuntime":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = UcxRuntime()
            return cls._instance

    # ---- for any thread ---------------------------------------------------------------------
    def on_thread(self) -> bool:
        """Whether this thread progresses the worker now: the progress thread, or a driving caller."""
        ident = threading.get_ident()
        return ident == self.thread.ident or ident == self._driver

    def future(self) -> "DrivenFuture":
        """A future for a reply: waiting on it drives progress on the waiting thread (see wait)."""
        return DrivenFuture(self)

    def wait(self, future: concurrent.futures.Future, timeout: float | None) -> None:
        """Progress the worker on this thread until `future` is done or `timeout` seconds pass.

        The reply then wakes the thread that waits for it, and that thread completes the future
        itself, instead of waking the progress thread, which would complete it and wake this one:
        one thread wake-up per reply instead of two. One caller drives at a time (the others find
        their futures completed by it); the progress thread meanwhile sleeps on its eventfd and
        timers only, and gets the worker's fd back when the driver returns. Returns at once, not
        driving, when another caller drives, in polling mode, or on the progress thread."""
        if future.done() or self.polling or self.on_thread() or not self.thread.is_alive() \
                or not self._driving.acquire(blocking=False):
            return
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        self._driver = threading.get_ident()
        self._epoll.unregister(self._worker_fd)
        future.add_done_callback(self._wake_driver)   # when another thread completes it
        try:
            self._drive(future, deadline)
        finally:
            self._driver = None
            self._epoll.register(self._worker_fd, select.EPOLLIN)
            self._driving.release()

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the progress thread (soon; in order with other calls)."""
        self._incoming.append((None, fn, None))
        if not self.on_thread():
            os.eventfd_write(self._wakeup, 1)

    def run(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run `fn` on the progress thread and return its result (inline once it has stopped)."""
        if self.on_thread():
            return fn()
        if not self.thread.is_alive():
            with self.ucx:
                return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run_it() -> None:
            try:
                future.set_result(fn())
            except Exception as err:  # noqa: BLE001 - re-raised in the caller
                future.set_exception(err)
        self.call(run_it)
        return future.result(timeout)

    def watch(self, request, on_complete: Callable[[Any], None], keep: Any = None, wake: bool = True) -> None:
        """Call on_complete(request) where progress runs once `request` completes; `keep` (the
        buffer UCX reads or writes) stays referenced until then. Hold `ucx`. wake=False: leave
        the progress thread asleep, for a receive whose message is yet to arrive (its arrival
        wakes whichever thread progresses, and that one takes the watch over)."""
        if self.on_thread():
            self._watched.append((request, on_complete, keep))
        else:
            self._incoming.append((request, on_complete, keep))
            if wake or request.completed:
                os.eventfd_write(self._wakeup, 1)

    def route_heads(self, link: int, on_head: Callable[[Any], None]) -> None:
        """Hand every request head tagged with `link` to on_head(probe result) where progress
        runs; on_head receives it with receive_probed. Progress thread."""
        self._head_routes[link] = on_head

    def unroute_heads(self, link: int) -> None:
        self._head_routes.pop(link, None)

    def wake_later(self, fn: Callable[[], None]) -> None:
        """Run `fn`, which wakes another thread (completes a future, starts a compute), on the
        thread that progresses right before it sleeps, or at once on any other thread. Woken earlier, that
        thread would take turns at the GIL with this one at every UCXX call still to come."""
        if self.on_thread():
            self._wakers.append(fn)
        else:
            fn()

    def call_at(self, deadline: float, fn: Callable[[], None]) -> None:
        """Run `fn` on the progress thread at time.monotonic() `deadline` (up to TIMER_SLACK_S late)."""
        with self._lock:
            heapq.heappush(self._timers, (deadline, next(self._order), fn))
            wake = deadline + TIMER_SLACK_S < self._sleeping_until
        if wake:
            os.eventfd_write(self._wakeup, 1)

    def send_frame(self, endpoint, link: int, kind: int, sequence: int, frame: wire.Frame,
                   on_error: Callable[[str], None]) -> None:
        """Post every message of `frame`; raises the UCXX error of a send that failed at once.
        A send still in flight is watched; on_error(reason) runs if it fails later. Hold `ucx`."""
        self._send(endpoint, frame.head, wire.tag(link, kind, 0, sequence), on_error)
        for part, tail in enumerate(frame.tails, start=1):
            self._send(endpoint, _wire_buffer(tail), wire.tag(link, kind, part, sequence), on_error)

    def _send(self, endpoint, buffer, tag: int, on_error: Callable[[str], None]) -> None:
        self._posted += 1
        request = endpoint.tag_send(self.Array(buffer), self.api.UCXXTag(tag))
        if request.completed:
            request.check_error()
        else:
            self.watch(request, partial(_check_send, on_error), keep=buffer)
        del request   # released under `ucx`, not when the caller's frame ends

    def receive(self, endpoint, buffer: torch.Tensor | np.ndarray, tag: int, mask: int | None = None):
        """Post a tag receive into `buffer` (uint8) on `endpoint`'s worker; returns the request.
        Hold `ucx`."""
        self._posted += 1
        args = (self.api.UCXXTagMask(mask),) if mask is not None else ()
        array = buffer if isinstance(buffer, np.ndarray) else _wire_buffer(buffer)
        return endpoint.tag_recv(self.Array(array), self.api.UCXXTag(tag), *args)

    def receive_probed(self, endpoint, buffer: np.ndarray, probed):
        """Receive the probed message into `buffer` (uint8, probed.length bytes); returns the
        request. Hold `ucx`."""
        self._posted += 1
        return endpoint.tag_recv_with_handle(self.Array(buffer), probed)

    def close_endpoint(self, endpoint) -> None:
        """Close `endpoint` (progress thread). One that already failed is only dropped: UCXX
        crashes progressing the close of an endpoint in error."""
        if endpoint.alive:
            self._watched.append((endpoint.close(), ignore, endpoint))

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wakeup, 1)
        self.thread.join(CLOSE_TIMEOUT_S)

    # ---- on the thread that progresses (the progress thread or a driving caller) -------------
    def _drive(self, future: concurrent.futures.Future, deadline: float) -> None:
        while True:
            with self.ucx:
                busy = self._iterate()
            busy = self._run_wakers() or busy
            if future.done():
                # the progress thread gets the worker back armed; no second round for it first
                with self.ucx:
                    if self.worker.arm():
                        return
                continue
            if busy:
                continue
            with self.ucx:
                armed = self.worker.arm()
            if not armed:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._driver_epoll.poll(-1 if left == math.inf else left):
                try:
                    os.eventfd_read(self._driver_wakeup)
                except BlockingIOError:
                    pass

    def _wake_driver(self, _future) -> None:
        if threading.get_ident() != self._driver:
            os.eventfd_write(self._driver_wakeup, 1)

    def _run(self) -> None:
        if self._cuda_device is not None:
            torch.cuda.set_device(self._cuda_device)
        while not self._stopping:
            with self.ucx:
                # a handler may have posted requests that completed at once: look again first
                if self._iterate() or not (self.polling or self.worker.arm()):
                    continue
            if self._run_wakers():
                continue
            if self._incoming:  # posted since _take_incoming, maybe complete already
                continue
            self._sleep()

    def _iterate(self) -> bool:
        """One round of progress and handlers (hold `ucx`); True when anything was done."""
        self.worker.progress()
        busy = self._take_incoming()
        busy = self._complete() or busy   # first: a peer's hello names its link before its heads come
        if self._head_routes:
            busy = self._take_heads() or busy
        return self._fire_timers() or busy

    def _run_wakers(self) -> bool:
        """Run what wake_later queued; True when one posted a request (a reply) after arm(): the
        caller then progresses and arms again before it sleeps."""
        if not self._wakers:
            return False
        wakers, self._wakers = self._wakers, []
        posted = self._posted
        for fn in wakers:
            _guarded(fn)
        return self._posted != posted

    def _take_incoming(self) -> bool:
        taken = False
        while self._incoming:
            request, fn, keep = self._incoming.popleft()
            taken = True
            if request is None:
                _guarded(fn)
            else:
                self._watched.append((request, fn, keep))
        return taken

    def _take_heads(self) -> bool:
        taken = False
        while True:
            probed = self.worker.tag_probe(self._head_tag, self._head_mask, True)
            if not probed.matched:
                return taken
            taken = True
            on_head = self._head_routes.get(wire.link_of(probed.sender_tag.value))
            if on_head is not None:
                _guarded(on_head, probed)
                continue
            # no peer with that link (it went away): the probed message must still be consumed
            discard = np.empty(probed.length, dtype=np.uint8)
            self._watched.append((self.worker.tag_recv_with_handle(self.Array(discard), probed), ignore, discard))

    def _complete(self) -> bool:
        done = [item for item in self._watched if item[0].completed]
        if not done:
            return False
        self._watched = [item for item in self._watched if not item[0].completed]   # handlers may add
        for request, on_complete, _ in done:
            _guarded(on_complete, request)
        return True

    def _fire_timers(self) -> bool:
        now, due = time.monotonic(), []
        timers = self._timers
        if not timers or timers[0][0] > now:   # C heappush holds the GIL: no torn read without the lock
            return False
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for fn in due:
            _guarded(fn)
        return bool(due)

    def _sleep(self) -> None:
        with self._lock:
            deadline = self._timers[0][0] + TIMER_SLACK_S if self._timers else math.inf
            self._sleeping_until = deadline
        # polling: only a syscall without the GIL or `ucx`, in which a waiting caller gets them
        timeout = 0.0 if self.polling else -1 if deadline == math.inf else max(0.0, deadline - time.monotonic())
        self._epoll.poll(timeout)
        with self._lock:
            self._sleeping_until = 0.0
        try:
            os.eventfd_read(self._wakeup)
        except BlockingIOError:
            pass


class DrivenFuture(concurrent.futures.Future):
    """A reply's future: result() drives the runtime's progress while it waits (UcxRuntime.wait)."""

    def __init__(self, runtime: UcxRuntime) -> None:
        super().__init__()
        self._runtime = runtime

    def result(self, timeout: float | None = None):
        started = time.monotonic()
        self._runtime.wait(self, timeout)
        return super().result(None if timeout is None else max(0.0, timeout - (time.monotonic() - started)))


def _guarded(fn: Callable, *args) -> None:
    """Run a handler where progress runs; a bug in one must not stop that thread."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001
        event(log, "ucx progress handler failed", level=logging.ERROR, error=f"{type(err).__name__}: {err}",
              exc_info=True)


def ignore(_result) -> None:
    """A completion or error handler for what needs none."""


def _check_send(on_error: Callable[[str], None], request) -> None:
    try:
        request.check_error()
    except Exception as err:  # noqa: BLE001 - endpoint errors surface here as UCXX exceptions
        on_error(f"send failed: {type(err).__name__}: {err}")
