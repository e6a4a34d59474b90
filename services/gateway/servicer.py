"""The gateway's moe.v1.Inference (grpc.aio): proxy each Generate stream to the least-loaded attention worker.

Each request becomes a numbered stream of the chosen worker's session (`Upstreams.session`), the
worker sending each decode step's events for all of its streams as one message.
`GatewayServicer.Generate` starts the request with the client's request id and remaining
deadline (`timeout_s`), streams every token and the final message back, cancels the stream
upstream when the client goes away, retries once on another worker when the first fails
UNAVAILABLE before sending anything, and otherwise ends with the worker's status and message
unchanged (`WorkerStatus`, which the error interceptor turns into that status).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator

import grpc
from prometheus_client import Counter, Gauge, Histogram

from moe.v1 import inference_pb2, inference_pb2_grpc
from services.common.errors import ResourceExhausted, ServiceError, Unavailable
from services.common.logging import event, get_logger
from services.gateway.balancer import Lease
from services.gateway.sessions import SessionFailed
from services.gateway.upstreams import Upstreams

log = get_logger("gateway")

REQUESTS = Counter("moe_gateway_requests_total", "Generate calls by final status code", ["code"])
TOKENS = Counter("moe_gateway_tokens_streamed_total", "Generated tokens streamed to clients")
RETRIES = Counter("moe_gateway_retries_total", "Generate calls retried on another worker (UNAVAILABLE before any token)")
TTFT = Histogram("moe_gateway_time_to_first_token_seconds", "Request arrival at the gateway to its first token",
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TOKEN_LATENCY = Histogram("moe_gateway_inter_token_seconds", "Time between consecutive tokens of one stream",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
IN_FLIGHT = Gauge("moe_gateway_streams_in_flight", "Generate streams open through the gateway")

NO_DEADLINE_S = 10 ** 6  # time_remaining() beyond this means the client set no deadline


class WorkerStatus(ServiceError):
    """A worker's failure, passed on to the client with its status and message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _NothingSent(WorkerStatus):
    """An attempt failed before its first message: Generate retries it elsewhere or passes it on."""


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
                    nothing_sent = failed
                if nothing_sent.code == grpc.StatusCode.UNAVAILABLE and len(tried) <= self.retries \
                        and not context.done():
                    last_failure = f"attention worker {lease.worker.id}: {nothing_sent.details}"
                    RETRIES.inc()
                    self.upstreams.balancer.mark_failed(lease.worker.id)
                    event(log, "worker unavailable before any token, retrying elsewhere", request_id=rid,
                          level=logging.WARNING, worker=lease.worker.id, detail=nothing_sent.details)
                    continue
                REQUESTS.labels(nothing_sent.code.name).inc()
                raise nothing_sent
        finally:
            self.streams -= 1
            IN_FLIGHT.dec()

    async def _forward(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                       lease: Lease, arrived: float) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Stream one attempt as a stream of the worker's session. Ends when the final message was
        sent (or the client went away); raises _NothingSent with the worker's status when it
        failed before any message was sent, WorkerStatus after that."""
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
                raise WorkerStatus(code, details)
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
