"""The gateway's moe.v1.Inference (grpc.aio): proxy each Generate stream to the least-loaded attention worker.

`Upstreams` keeps the worker list (Redis registry, kind "attention", polled every second on a
thread of its own with the sync Redis client; the last list survives a Redis outage) and their
GetLoad figures, polled on that thread through one sync channel per worker. Generate streams go
to a worker over ONE long-lived multiplexed moe.v1.InferenceSession.Open call per worker
(`services.gateway.sessions.WorkerSession`, on a grpc.aio channel made on the server's event
loop at first use): each request is a numbered stream within it, and the worker sends each
decode step's events for all of its streams as one message, instead of one message on each of
their own calls. A session that ends or fails fails its open streams and is replaced by a fresh
one at the next request; it is closed with its channel when the worker leaves.
`GatewayServicer.Generate` starts the request with the client's request id and remaining
deadline (`timeout_s`), streams every token and the final message back, cancels the stream
upstream when the client goes away, retries once on another worker when the first fails
UNAVAILABLE before sending anything, and otherwise ends with the worker's status and message
unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Callable

import grpc
import redis
from prometheus_client import Counter, Gauge, Histogram

from moe.v1 import inference_pb2, inference_pb2_grpc
from services.common import redis_store
from services.common.errors import ResourceExhausted, Unavailable
from services.common.logging import event, get_logger
from services.common.redis_store import Keys
from services.gateway.balancer import Balancer, Lease, WorkerInfo
from services.gateway.sessions import DEFAULT_MAX_UNREAD, SessionFailed, WorkerSession

log = get_logger("gateway")

REQUESTS = Counter("moe_gateway_requests_total", "Generate calls by final status code", ["code"])
TOKENS = Counter("moe_gateway_tokens_streamed_total", "Generated tokens streamed to clients")
RETRIES = Counter("moe_gateway_retries_total", "Generate calls retried on another worker (UNAVAILABLE before any token)")
TTFT = Histogram("moe_gateway_time_to_first_token_seconds", "Request arrival at the gateway to its first token",
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TOKEN_LATENCY = Histogram("moe_gateway_inter_token_seconds", "Time between consecutive tokens of one stream",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
WORKERS = Gauge("moe_gateway_workers", "Attention workers known to the gateway")
IN_FLIGHT = Gauge("moe_gateway_streams_in_flight", "Generate streams open through the gateway")

LOAD_TIMEOUT_S = 0.5
NO_DEADLINE_S = 10 ** 6  # time_remaining() beyond this means the client set no deadline
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
        self.poll_s = poll_s
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._empty_since: float | None = None
        self.outage = False

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
            try:
                records = redis_store.list_replicas(self.client, self.keys, "attention")
            except redis.RedisError as err:
                if not self.outage:
                    event(log, "redis unreachable, keeping the last worker list", level=logging.WARNING,
                          workers=len(self.balancer.registered()), error=str(err))
                self.outage = True
            else:
                if self.outage:
                    event(log, "redis reachable again")
                self.outage = False
                workers = [WorkerInfo(r.id, r.endpoints["grpc"], r.plane) for r in records
                           if r.endpoints.get("grpc") and r.state == redis_store.SERVING]
                self._apply(workers)
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
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="gateway-discovery", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - discovery must outlive one bad poll
                event(log, "worker poll failed", level=logging.ERROR, error=repr(err), exc_info=True)

    def close(self) -> None:
        """Stop discovery and close every channel (the aio ones only while their loop runs)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.poll_s + LOAD_TIMEOUT_S + 1.0)
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
            for endpoint in set(self._session_channels) | set(self._sessions):
                self._close_on_loop(self._session_channels.pop(endpoint, None), self._sessions.pop(endpoint, None))


class _NothingSent(Exception):
    """An attempt failed before its first message: the worker's status, for Generate to retry or pass on."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _upstream_timeout(context: grpc.aio.ServicerContext) -> float:
    """The client's remaining deadline in seconds for the worker (`timeout_s`); 0 when it set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_S:
        return 0.0
    return max(remaining, 0.001)


def _status(name: str) -> grpc.StatusCode:
    """The grpc.StatusCode an error event names ("UNAVAILABLE"); UNKNOWN for anything else."""
    code = grpc.StatusCode.__members__.get(name or "UNKNOWN", grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN if code == grpc.StatusCode.OK else code


class GatewayServicer(inference_pb2_grpc.InferenceServicer):
    """moe.v1.Inference in front of the attention workers; served by a grpc.aio server."""

    def __init__(self, upstreams: Upstreams, replica_id: str = "gateway", *, retries: int = 1,
                 max_streams: int = 256) -> None:
        """max_streams: Generate streams served at once; past it, RESOURCE_EXHAUSTED."""
        self.upstreams = upstreams
        self.replica_id = replica_id
        self.retries = retries
        self.max_streams = max_streams
        self.streams = 0
        self.accepting = True

    async def GetLoad(self, request: inference_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> inference_pb2.WorkerLoad:
        workers = self.upstreams.balancer.workers()
        return inference_pb2.WorkerLoad(
            replica_id=self.replica_id, active_sequences=self.upstreams.balancer.in_flight(),
            max_batch=sum(w.max_batch for w in workers if w.registered), accepting=self.accepting)

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateResponse]:
        if not self.accepting:
            REQUESTS.labels("UNAVAILABLE").inc()
            raise Unavailable("gateway is shutting down; retry on another gateway")
        if self.streams >= self.max_streams:
            REQUESTS.labels("RESOURCE_EXHAUSTED").inc()
            raise ResourceExhausted(f"gateway is serving its limit of {self.max_streams} streams (--max-streams); "
                                    "retry later or on another gateway")
        if not request.request_id:
            forwarded = inference_pb2.GenerateRequest()
            forwarded.CopyFrom(request)
            forwarded.request_id = uuid.uuid4().hex
            request = forwarded
        rid = request.request_id
        arrived = time.monotonic()
        tried: set[str] = set()
        last_failure = ""  # the worker and message of the attempt before, for the final message
        self.streams += 1  # on the server's one event loop: no lock needed
        IN_FLIGHT.inc()
        try:
            while True:
                lease = self.upstreams.balancer.acquire(exclude=tried)
                if lease is None:
                    REQUESTS.labels("UNAVAILABLE").inc()
                    if last_failure:
                        raise Unavailable(f"{last_failure}; no other attention worker to retry on")
                    raise Unavailable("no attention worker available")
                tried.add(lease.worker.id)
                try:
                    async with aclosing(self._forward(request, context, lease, arrived)) as messages:
                        async for message in messages:
                            yield message
                    return
                except _NothingSent as failed:
                    code, details = failed.code, failed.details
                if code == grpc.StatusCode.UNAVAILABLE and len(tried) <= self.retries and not context.done():
                    last_failure = f"attention worker {lease.worker.id}: {details}"
                    RETRIES.inc()
                    self.upstreams.balancer.mark_failed(lease.worker.id)
                    event(log, "worker unavailable before any token, retrying elsewhere", request_id=rid,
                          level=logging.WARNING, worker=lease.worker.id, detail=details)
                    continue
                REQUESTS.labels(code.name).inc()
                await context.abort(code, details)
        finally:
            self.streams -= 1
            IN_FLIGHT.dec()

    async def _forward(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                       lease: Lease, arrived: float) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Stream one attempt as a stream of the worker's session. Ends when the final message was
        sent (or the client went away); raises _NothingSent with the worker's status when it
        failed before any message was sent; aborts the call with it after that."""
        rid = request.request_id
        sent = 0
        last_token = None
        session = number = None
        try:
            session = self.upstreams.session(lease.worker.endpoint)
            number, events = session.start(request, _upstream_timeout(context))
            # client cancel / deadline -> cancel upstream at once, wherever this generator waits
            # (a no-op for a stream that has ended)
            context.add_done_callback(
                lambda _context, session=session, number=number: session.cancel(number, details="client went away"))
            while True:
                item = await events.get()
                if isinstance(item, SessionFailed):
                    code, details = item.code, item.details
                else:
                    kind = item.WhichOneof("event")
                    if kind == "token":
                        now = time.monotonic()
                        if last_token is None:
                            TTFT.observe(now - arrived)
                        else:
                            TOKEN_LATENCY.observe(now - last_token)
                        last_token = now
                        TOKENS.inc()
                        sent += 1
                        yield item
                        continue
                    if kind == "final":
                        REQUESTS.labels("OK").inc()
                        sent += 1
                        yield item
                        return
                    if kind != "error":
                        continue  # an event this gateway does not know: not for the client
                    code, details = _status(item.error.code), item.error.message
                if context.cancelled():
                    REQUESTS.labels("CANCELLED").inc()
                    return  # the client cancelled or its deadline passed; nobody to tell
                if sent == 0:
                    raise _NothingSent(code, details)
                REQUESTS.labels(code.name).inc()
                event(log, "stream failed mid-generation", request_id=rid, level=logging.WARNING,
                      worker=lease.worker.id, code=code.name, detail=details, sent=sent)
                await context.abort(code, details)
        except (asyncio.CancelledError, GeneratorExit):
            # the client cancelled or its deadline passed (the server cancels this handler)
            REQUESTS.labels("CANCELLED").inc()
            if session is not None and number is not None:
                session.cancel(number, details="client went away")  # a no-op once broken or ended
            raise
        finally:
            if session is not None and number is not None:
                session.drop(number)
            self.upstreams.release(lease)
