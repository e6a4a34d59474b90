"""gRPC server bootstrap shared by every service.

    service = Service("router", args, service_names=[router_pb2.DESCRIPTOR.services_by_name["Router"].full_name])
    router_pb2_grpc.add_RouterServicer_to_server(servicer, service.server)
    service.on_shutdown(registry.deregister)      # runs after NOT_SERVING, before server.stop
    port = service.start()
    return service.wait()                        # blocks until SIGTERM/SIGINT, returns 0

`start` binds `--host:--port` (port 0 picks a free one), serves grpc.health.v1 for "" and every
named service, server reflection, and Prometheus /metrics on `--metrics-port` (0 disables).
On SIGTERM/SIGINT: health goes NOT_SERVING, the shutdown callbacks run (deregister, drain),
`server.stop(grace)` lets in-flight calls finish, and `wait` returns 0. A second signal stops
at once.

`Service(..., asynchronous=True)` serves through grpc.aio instead, for services that stream to
many clients at once (gateway, attention workers): a server-streaming call is then a coroutine
on one event loop, not a thread of a pool, so the streams a process serves are not capped by
its thread count, and a step's tokens reach all of them with one wake-up of that loop. The loop
runs on a thread of its own (`Service.loop`); the rest of the API is the same. Such a server
takes any number of calls: each servicer caps its own streams.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from concurrent import futures
from typing import Awaitable, Callable, Sequence, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import AsyncErrorInterceptor, ErrorInterceptor
from services.common.logging import event, get_logger

log = get_logger("server")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_GRACE_S = 10.0
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.so_reuseport", 0),
    # accept the keepalive pings our clients send every 10 s (services.transport.grpc_transport),
    # also between calls: by default a server answers them with GOAWAY "too_many_pings"
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
]
T = TypeVar("T")


def build_server(max_workers: int = 16, interceptors: Sequence[grpc.ServerInterceptor] = (),
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Server:
    """A grpc.server with a thread pool and the error interceptor first in the chain."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[ErrorInterceptor(), *interceptors],
        options=[*SERVER_OPTIONS, *options],
    )


def build_async_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """A grpc.aio server with `interceptors` (an API-key check refuses a call before anything else
    runs), then the error interceptor; call it on the loop that will run it. It
    serves any number of calls at once: a servicer caps its own streams (health checks and load
    polls must still be answered when the streams are at their cap)."""
    return grpc.aio.server(interceptors=[*interceptors, AsyncErrorInterceptor()], options=SERVER_OPTIONS)


class Service:
    """One gRPC service process: server, health, reflection, metrics, graceful shutdown."""

    def __init__(self, name: str, args: argparse.Namespace, service_names: Sequence[str],
                 *, max_workers: int = 16, grace_s: float = DEFAULT_GRACE_S,
                 interceptors: Sequence[grpc.ServerInterceptor] = (), asynchronous: bool = False) -> None:
        """max_workers: the thread pool's size (unused by an asynchronous Service)."""
        self.name = name
        self.host: str = args.host
        self.requested_port: int = args.port
        self.metrics_port: int = getattr(args, "metrics_port", 0)
        self.service_names = list(service_names)
        self.grace_s = grace_s
        self.loop: asyncio.AbstractEventLoop | None = None
        if asynchronous:
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name=f"{name}-aio", daemon=True).start()
            self.server, self.health = self.run_in_loop(self._build_async(interceptors))
        else:
            self.server = build_server(max_workers, interceptors)
            self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self._shutdown_callbacks: list[Callable[[], None]] = []
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    @staticmethod
    async def _build_async(
            interceptors: Sequence[grpc.aio.ServerInterceptor]) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
        return build_async_server(interceptors), health.aio.HealthServicer()

    def run_in_loop(self, coroutine: Awaitable[T]) -> T:
        """Run a coroutine on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def on_shutdown(self, callback: Callable[[], None]) -> None:
        """Run `callback` during shutdown, after NOT_SERVING and before the server stops."""
        self._shutdown_callbacks.append(callback)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ["", *self.service_names]:
            if self.loop is None:
                self.health.set(svc, status)
            else:
                self.run_in_loop(self.health.set(svc, status))

    def start(self) -> int:
        """Bind, start serving, mark SERVING; returns the bound gRPC port."""
        names = [*self.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        address = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as err:
            raise SystemExit(f"{self.name}: cannot bind {address}: {err}") from None
        if self.port == 0:
            raise SystemExit(f"{self.name}: cannot bind {address} (in use?)")
        if self.metrics_port:
            start_metrics_server(self.metrics_port, self.host)
        if self.loop is None:
            self.server.start()
        else:
            self.run_in_loop(self.server.start())
        self.set_serving(True)
        event(log, "serving", service=self.name, address=f"{self.host}:{self.port}",
              metrics_port=self.metrics_port or None)
        return self.port

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT request a graceful stop; a second one stops at once (main thread only)."""
        def handler(signum: int, _frame: object) -> None:
            if self._stop_requested.is_set():
                event(log, "second signal, stopping now", signal=signal.Signals(signum).name)
                if self.loop is None:
                    self.server.stop(0)
                else:
                    asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop)
                self._stopped.set()
                return
            event(log, "signal received, draining", signal=signal.Signals(signum).name, grace_s=self.grace_s)
            self._stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def request_stop(self) -> None:
        self._stop_requested.set()

    def wait(self) -> int:
        """Block until a signal (or request_stop), shut down gracefully, return exit status 0."""
        if threading.current_thread() is threading.main_thread():
            self.install_signal_handlers()
        while not self._stop_requested.wait(0.5):
            pass
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """NOT_SERVING, shutdown callbacks, server.stop(grace). Safe to call twice."""
        with self._lock:
            if self._stopped.is_set():
                return
            if self.loop is None:
                self.health.enter_graceful_shutdown()
            else:
                self.run_in_loop(self.health.enter_graceful_shutdown())
            for callback in self._shutdown_callbacks:
                try:
                    callback()
                except Exception as err:  # noqa: BLE001 - shutdown keeps going
                    event(log, "shutdown step failed", level=logging.WARNING,
                          step=getattr(callback, "__qualname__", repr(callback)), error=str(err))
            if self.loop is None:
                self.server.stop(self.grace_s).wait(self.grace_s + 1.0)
            else:
                self.run_in_loop(self.server.stop(self.grace_s))
                self.loop.call_soon_threadsafe(self.loop.stop)
            self._stopped.set()
            event(log, "stopped", service=self.name)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    """Prometheus /metrics over HTTP; a port already in use is logged, not fatal."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host if host not in ("", "::") else "0.0.0.0")
    except OSError as err:
        event(log, "metrics server not started", level=logging.WARNING, port=port, error=str(err))
