"""Which attention workers the gateway sends to, and the connections to them.

`Upstreams` keeps the worker list (Redis registry, kind "attention", polled every second by a
`RedisPoller` with the sync Redis client; the last list survives a Redis outage) and their
GetLoad figures, polled on that thread through one sync channel per worker, for the `Balancer`.
Generate streams go to a worker over ONE long-lived multiplexed moe.v1.InferenceSession.Open
call per worker (`services.gateway.sessions.WorkerSession`, on a grpc.aio channel made on the
server's event loop at first use); a session that ends or fails is replaced by a fresh one at
the next request, and closed with its channel when the worker leaves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

import grpc
import redis
from prometheus_client import Gauge

from moe.v1 import inference_pb2, inference_pb2_grpc
from services.common import redis_store
from services.common.logging import event, get_logger
from services.common.redis_poller import RedisPoller
from services.common.redis_store import Keys
from services.gateway.balancer import Balancer, Lease, WorkerInfo
from services.gateway.sessions import DEFAULT_MAX_UNREAD, WorkerSession

log = get_logger("gateway")

WORKERS = Gauge("moe_gateway_workers", "Attention workers known to the gateway")

LOAD_TIMEOUT_S = 0.5
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.enable_retries", 0)]
# the sessions' channels: a session lives long and may sit idle, so notice a silently dead worker
# (the workers' servers accept these pings: services.common.server.SERVER_OPTIONS)
SESSION_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                           ("grpc.keepalive_permit_without_calls", 1)]


class Upstreams:
    """Worker discovery (Redis), channels per worker and the load poll feeding the Balancer."""

    def __init__(self, client: redis.Redis | None, keys: Keys | None, *, poll_s: float = 1.0,
                 empty_grace_s: float = redis_store.REPLICA_TTL_S,
                 on_workers: Callable[[int], None] | None = None, max_unread: int = DEFAULT_MAX_UNREAD) -> None:
        """max_unread: messages a stream may leave waiting for a slow client (`WorkerSession`)."""
        self.client = client
        self.max_unread = max_unread
        self.keys = keys
        self.empty_grace_s = empty_grace_s
        self.on_workers = on_workers
        self.balancer = Balancer()
        # endpoint -> sync channel and stub for the discovery thread's GetLoad; endpoint -> grpc.aio
        # channel and its current session (both bound to `_loop`, the server's event loop) for Generate
        self._channels: dict[str, tuple[grpc.Channel, inference_pb2_grpc.InferenceStub]] = {}
        self._session_channels: dict[str, grpc.aio.Channel] = {}
        self._sessions: dict[str, WorkerSession] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task] = set()  # channel.close() tasks on the loop, kept until done
        self._lock = threading.Lock()
        self._empty_since: float | None = None
        self.poller = RedisPoller("gateway-discovery", self.refresh, interval_s=poll_s,
                                  while_down="keeping the last worker list")

    # ---- channels ---------------------------------------------------------------------------
    def stub(self, endpoint: str) -> inference_pb2_grpc.InferenceStub:
        """The sync stub for `endpoint` (GetLoad polls)."""
        with self._lock:
            entry = self._channels.get(endpoint)
            if entry is None:
                channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
                entry = (channel, inference_pb2_grpc.InferenceStub(channel))
                self._channels[endpoint] = entry
            return entry[1]

    def session(self, endpoint: str) -> WorkerSession:
        """The open session with `endpoint` (Generate), opened now when there is none (first use,
        or the last one ended); call it on the server's event loop."""
        with self._lock:
            self._loop = self._loop or asyncio.get_running_loop()
            session = self._sessions.get(endpoint)
            if session is None or session.broken is not None:
                channel = self._session_channels.get(endpoint)
                if channel is None:
                    channel = grpc.aio.insecure_channel(endpoint, options=SESSION_CHANNEL_OPTIONS)
                    self._session_channels[endpoint] = channel
                session = WorkerSession(endpoint, channel, on_end=self._session_ended, max_unread=self.max_unread)
                self._sessions[endpoint] = session
            return session

    def _session_ended(self, session: WorkerSession) -> None:
        with self._lock:
            if self._sessions.get(session.endpoint) is session:
                del self._sessions[session.endpoint]
        if session.broken is not None:
            event(log, "worker session closed" if session.closed else "worker session ended",
                  level=logging.INFO if session.closed else logging.WARNING, endpoint=session.endpoint,
                  code=session.broken.code.name, detail=session.broken.details)

    def _close_unused(self, gone: list[WorkerInfo]) -> None:
        in_use = {w.endpoint for w in self.balancer.registered()}
        with self._lock:
            for info in gone:
                if info.endpoint in in_use:
                    continue
                if info.endpoint in self._channels:
                    self._channels.pop(info.endpoint)[0].close()
                if info.endpoint in self._session_channels or info.endpoint in self._sessions:
                    self._close_on_loop(self._session_channels.pop(info.endpoint, None),
                                        self._sessions.pop(info.endpoint, None))

    def _close_on_loop(self, channel: grpc.aio.Channel | None, session: WorkerSession | None = None) -> None:
        """End a session and close its aio channel on their loop, from any thread. A loop that no
        longer runs (process exit) gets nothing: the dropped channel closes itself when collected."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return

        def spawn() -> None:  # on the loop; nothing is created if the loop stops first
            if session is not None:
                session.close(f"worker {session.endpoint} left; its session was closed")
            if channel is not None:
                task = loop.create_task(channel.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

        loop.call_soon_threadsafe(spawn)

    def release(self, lease: Lease) -> None:
        gone = self.balancer.release(lease)
        if gone is not None:
            self._close_unused([gone])

    # ---- discovery --------------------------------------------------------------------------
    def set_workers(self, workers: list[WorkerInfo]) -> None:
        self._close_unused(self.balancer.update_workers(workers))
        WORKERS.set(len(workers))
        if self.on_workers is not None:
            self.on_workers(len(workers))

    def refresh(self) -> None:
        """Re-read the registry (keeping the last list when Redis is down), then poll loads."""
        if self.client is not None and self.keys is not None:
            with self.poller.attempt():
                records = redis_store.list_replicas(self.client, self.keys, "attention")
            if not self.poller.outage:
                self._apply([WorkerInfo(r.id, r.endpoints["grpc"], r.plane) for r in records
                             if r.endpoints.get("grpc") and r.state == redis_store.SERVING])
        self.poll_loads()

    def _apply(self, workers: list[WorkerInfo]) -> None:
        # An empty registry while we knew workers is most often a Redis that restarted empty (the
        # workers re-register within a heartbeat): keep the last list for a record's lifetime.
        if not workers and self.balancer.registered():
            now = time.monotonic()
            self._empty_since = self._empty_since or now
            if now - self._empty_since < self.empty_grace_s:
                return
        else:
            self._empty_since = None
        before = {w.id for w in self.balancer.registered()}
        self.set_workers(workers)
        after = {w.id for w in workers}
        if before != after:
            event(log, "attention workers", count=len(after), added=",".join(sorted(after - before)) or None,
                  removed=",".join(sorted(before - after)) or None)

    def poll_loads(self) -> None:
        """GetLoad on every worker in parallel; a worker that does not answer is avoided."""
        pending = []
        for info in self.balancer.registered():
            future = self.stub(info.endpoint).GetLoad.future(inference_pb2.GetLoadRequest(), timeout=LOAD_TIMEOUT_S)
            pending.append((info, future))
        for info, future in pending:
            try:
                load = future.result()
            except grpc.RpcError:
                self.balancer.report_unreachable(info.id)
                continue
            self.balancer.report_load(info.id, active=load.active_sequences, queued=load.queued_sequences,
                                      max_batch=load.max_batch, accepting=load.accepting)

    def start(self) -> "Upstreams":
        """Discover now, then every `poll_s` on the poller's thread."""
        self.refresh()
        self.poller.start()
        return self

    def close(self) -> None:
        """Stop discovery and close every channel (the aio ones only while their loop runs)."""
        self.poller.close()
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
            for endpoint in set(self._session_channels) | set(self._sessions):
                self._close_on_loop(self._session_channels.pop(endpoint, None), self._sessions.pop(endpoint, None))
