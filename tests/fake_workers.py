"""Fake attention workers speaking InferenceSession, and the gateway served in front of them as in
production (grpc.aio, a free loopback port, no Redis): for the gateway's and the client's tests."""

from __future__ import annotations

import argparse
import queue
import threading
import time
from concurrent import futures

import grpc
import pytest

from moe.v1 import inference_pb2, inference_pb2_grpc
from services.client import Client
from services.common.server import Service
from services.gateway.__main__ import SERVICE_NAME
from services.gateway.api_keys import ApiKeyInterceptor
from services.gateway.balancer import WorkerInfo
from services.gateway.servicer import GatewayServicer
from services.gateway.sessions import DEFAULT_MAX_UNREAD
from services.gateway.upstreams import Upstreams


class FakeWorker(inference_pb2_grpc.InferenceServicer, inference_pb2_grpc.InferenceSessionServicer):
    """A sync worker serving InferenceSession.Open as a step loop: each step sends ONE SessionEvents
    with the next event of every running stream of the session.

    mode: "ok"; "unavailable" / "invalid": every start is refused at once with an error event;
    "die-mid-stream": an UNAVAILABLE error event right after a stream's first token.
    `hold`: after its first token each stream waits until `gate` is set. `prompt_tokens`: token
    ids are prompt_ids[0] * 100 + i instead of 10 + i. Setting `kill` ends the Open call at its
    next step: `kill_how` "abort" (UNAVAILABLE "worker died") or "return" (OK, streams still open).
    """

    def __init__(self, mode: str = "ok", tokens: int = 3, delay: float = 0.0, hold: bool = False,
                 prompt_tokens: bool = False):
        self.mode, self.tokens, self.delay, self.prompt_tokens = mode, tokens, delay, prompt_tokens
        self.opens = 0   # Open calls
        self.calls = 0   # streams started
        self.seen: list[tuple[str, float]] = []  # (request_id, timeout_s) of each start
        self.cancels: list[int] = []             # stream numbers the gateway cancelled
        self.batches: list[int] = []             # streams with an event in each SessionEvents sent
        self.cancelled = threading.Event()  # a running stream was cancelled, or its Open call ended under it
        self.ended = threading.Event()      # an Open call ended
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.kill = threading.Event()
        self.kill_how = "abort"

    def GetLoad(self, request, context):
        return inference_pb2.WorkerLoad(replica_id="fake", accepting=True, max_batch=8)

    def _token(self, request, i):
        first = request.prompt_ids.ids[0] * 100 if self.prompt_tokens else 10
        return inference_pb2.GenerateResponse(request_id=request.request_id,
                                              token=inference_pb2.TokenChunk(id=first + i, logprob=-1.0, index=i))

    @staticmethod
    def _error(request, code, message):
        return inference_pb2.GenerateResponse(request_id=request.request_id,
                                              error=inference_pb2.Error(code=code, message=message))

    def Open(self, request_iterator, context):
        self.opens += 1
        incoming: queue.Queue = queue.Queue()

        def read():
            try:
                for request in request_iterator:
                    incoming.put(request)
            except Exception:  # noqa: BLE001 - the call ended
                pass
            incoming.put(None)

        threading.Thread(target=read, daemon=True).start()
        running: dict[int, list] = {}  # stream -> [GenerateRequest, next token index]
        context.add_callback(lambda: self.cancelled.set() if running else None)
        context.add_callback(self.ended.set)
        while context.is_active():
            if self.kill.is_set():
                self.kill.clear()
                if self.kill_how == "abort":
                    context.abort(grpc.StatusCode.UNAVAILABLE, "worker died")
                return
            events = []
            gate = self.gate.is_set()
            block = not any(gate or index == 0 for _, index in running.values())
            while True:  # take what the gateway sent; wait a little when nothing can step
                try:
                    message = incoming.get(timeout=0.05) if block else incoming.get_nowait()
                except queue.Empty:
                    break
                block = False
                if message is None:
                    return
                if message.WhichOneof("action") == "cancel":
                    self.cancels.append(message.stream)
                    if running.pop(message.stream, None) is not None:
                        self.cancelled.set()
                    continue
                request = message.start
                self.calls += 1
                self.seen.append((request.request_id, message.timeout_s))
                if self.mode == "unavailable":
                    events.append((message.stream, self._error(request, "UNAVAILABLE", "worker is down")))
                elif self.mode == "invalid":
                    events.append((message.stream, self._error(
                        request, "INVALID_ARGUMENT", "prompt_ids: token 999 is outside the vocabulary")))
                else:
                    running[message.stream] = [request, 0]
            if self.delay and running:
                time.sleep(self.delay)
            for stream, state in list(running.items()):
                request, index = state
                if not (gate or index == 0):
                    continue
                if index < self.tokens:
                    events.append((stream, self._token(request, index)))
                    state[1] += 1
                    if self.mode == "die-mid-stream":
                        events.append((stream, self._error(request, "UNAVAILABLE", "worker died")))
                        del running[stream]
                else:
                    events.append((stream, inference_pb2.GenerateResponse(
                        request_id=request.request_id, final=inference_pb2.Final(
                            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
                            usage=inference_pb2.Usage(prompt_tokens=len(request.prompt_ids.ids),
                                                      generated_tokens=self.tokens)))))
                    del running[stream]
            if events:
                self.batches.append(len({stream for stream, _ in events}))
                yield inference_pb2.SessionEvents(events=[inference_pb2.SessionEvent(stream=stream, response=response)
                                                          for stream, response in events])


def serve(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(8))
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    inference_pb2_grpc.add_InferenceSessionServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def gateway():
    """make(*fakes, max_streams=16, max_unread=..., api_keys=None) -> (client, upstreams): sync fake
    workers, and the gateway served as in production (grpc.aio Service on a free loopback port,
    requiring one of `api_keys` when given; the client sends none); no Redis."""
    servers, made, services = [], [], []

    def make(*fakes, max_streams=16, max_unread=DEFAULT_MAX_UNREAD, api_keys=None):
        workers = []
        for i, fake in enumerate(fakes):
            server, endpoint = serve(fake)
            servers.append(server)
            workers.append(WorkerInfo(f"w{i}", endpoint))
        upstreams = Upstreams(None, None, max_unread=max_unread)
        upstreams.set_workers(workers)
        args = argparse.Namespace(host="127.0.0.1", port=0, metrics_port=0)
        interceptors = [ApiKeyInterceptor(api_keys)] if api_keys else []
        service = Service("gateway", args, [SERVICE_NAME], grace_s=1.0, interceptors=interceptors, asynchronous=True)
        inference_pb2_grpc.add_InferenceServicer_to_server(GatewayServicer(upstreams, max_streams=max_streams),
                                                           service.server)
        services.append(service)
        client = Client(f"127.0.0.1:{service.start()}", timeout=10, api_key="")
        made.append((client, upstreams))
        return client, upstreams

    yield make
    for client, upstreams in made:
        client.close()
        upstreams.close()
    for service in services:
        service.shutdown()
    for server in servers:
        server.stop(0)
