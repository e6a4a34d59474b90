"""moe.v1.Inference and moe.v1.InferenceSession on an attention worker (grpc.aio): protobuf <->
scheduler calls through the `StreamHub` (services/attention/streams.py), nothing more.

A Generate call's sink is a queue its handler awaits; an InferenceSession (the gateway's) is the
sink of all of its streams, and their events of one step leave as one message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import grpc

from model.generate import GenerationRequest, SamplingParams
from moe.v1 import inference_pb2, inference_pb2_grpc
from services.attention.scheduler import RequestHandle
from services.attention.streams import StreamHub
from services.attention.worker import AttentionWorker
from services.common.errors import InvalidArgument, reported_status
from services.common.logging import event, get_logger

log = get_logger("attention")

FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}


def to_request(msg: inference_pb2.GenerateRequest, worker: AttentionWorker) -> GenerationRequest:
    which = msg.WhichOneof("prompt")
    if which == "text":
        if worker.codec is None:
            raise InvalidArgument("text prompts need the checkpoint's tokenizer.json; send prompt_ids")
        prompt = worker.codec.encode(msg.text)
    elif which == "prompt_ids":
        prompt = list(msg.prompt_ids.ids)
    else:
        raise InvalidArgument("request has no prompt (set prompt_ids or text)")
    stops = tuple(msg.stop_token_ids) + (() if msg.ignore_eos else worker.cfg.eos_token_ids)
    sampling = msg.sampling
    return GenerationRequest(
        prompt=tuple(prompt),
        max_new_tokens=msg.max_new_tokens,
        sampling=SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
            top_k=sampling.top_k,
            seed=sampling.seed if sampling.HasField("seed") else None,
        ),
        stop_token_ids=stops,
        request_id=msg.request_id or uuid.uuid4().hex,
    )


class Responses:
    """One request's events as GenerateResponse messages: text deltas, usage, errors."""

    def __init__(self, gen: GenerationRequest, worker: AttentionWorker, started: float):
        self.gen, self.codec, self.started = gen, worker.codec, started
        self.ids: list[int] = []

    def token(self, payload) -> inference_pb2.GenerateResponse:
        text = self.codec.delta(self.ids, payload.token) if self.codec is not None else ""
        self.ids.append(payload.token)
        return inference_pb2.GenerateResponse(
            request_id=self.gen.request_id,
            token=inference_pb2.TokenChunk(id=payload.token, logprob=payload.logprob, text=text, index=len(self.ids) - 1),
        )

    def final(self, seq) -> inference_pb2.GenerateResponse:
        ttft = (seq.first_token_at - seq.submitted_at) * 1000 if seq.first_token_at else 0.0
        usage = inference_pb2.Usage(
            prompt_tokens=len(self.gen.prompt), generated_tokens=len(seq.tokens),
            time_to_first_token_ms=ttft, total_time_ms=(time.monotonic() - self.started) * 1000,
        )
        event(log, "generate finished", request_id=self.gen.request_id, tokens=len(seq.tokens), reason=seq.finish_reason)
        return inference_pb2.GenerateResponse(
            request_id=self.gen.request_id,
            final=inference_pb2.Final(finish_reason=FINISH.get(seq.finish_reason, 0), usage=usage),
        )


def error_response(request_id: str, err: Exception, method: str) -> inference_pb2.GenerateResponse:
    code, message = reported_status(err, method)
    return inference_pb2.GenerateResponse(request_id=request_id,
                                          error=inference_pb2.Error(code=code.name, message=message))


class _CallSink:
    """A Generate call's events, awaited by its handler."""

    def __init__(self) -> None:
        self.events: asyncio.Queue = asyncio.Queue()

    def deliver(self, handle: RequestHandle, kind: str, payload: object) -> None:
        self.events.put_nowait((kind, payload))

    def flush(self) -> None:
        pass


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, hub: StreamHub, replica_id: str, plane: int):
        self.hub = hub
        self.worker = hub.worker
        self.replica_id = replica_id
        self.plane = plane

    async def Generate(self, request, context):
        started = time.monotonic()
        gen = to_request(request, self.worker)
        remaining = context.time_remaining()
        deadline = started + remaining if remaining is not None and remaining < 1e8 else None
        sink = _CallSink()
        handle = self.hub.submit(gen, deadline, sink)
        responses = Responses(gen, self.worker, started)
        try:
            while True:
                kind, payload = await sink.events.get()
                if kind == "error":
                    raise payload
                if kind == "token":
                    yield responses.token(payload)
                    continue
                yield responses.final(payload)
                return
        finally:
            # a client that cancels or whose deadline passes ends the call here: free its cache now
            self.hub.drop(handle)

    async def GetLoad(self, request, context):
        load = self.worker.scheduler.load()
        plan = self.worker.plans.get()
        return inference_pb2.WorkerLoad(
            replica_id=self.replica_id, plane=self.plane, active_sequences=load["active"],
            queued_sequences=load["queued"], max_batch=self.worker.engine.max_batch,
            kv_cache_used_tokens=load["kv_used"], kv_cache_total_tokens=load["kv_total"], accepting=True,
            plan_version=plan.version if plan is not None else 0,
        )


class _Session:
    """One InferenceSession call: its open streams, and the events of a step as one message."""

    def __init__(self, hub: StreamHub):
        self.hub = hub
        self.by_stream: dict[int, RequestHandle] = {}
        self.streams: dict[RequestHandle, tuple[int, Responses]] = {}
        self.pending: list[inference_pb2.SessionEvent] = []
        self.out: asyncio.Queue = asyncio.Queue()  # lists of SessionEvent; None ends the call
        self.reading = True

    def start(self, msg: inference_pb2.SessionRequest) -> None:
        started = time.monotonic()
        request_id = msg.start.request_id
        try:
            if msg.stream in self.by_stream:
                raise InvalidArgument(f"stream {msg.stream} is already open in this session")
            if not request_id:
                raise InvalidArgument("a session's requests must carry a request_id")
            gen = to_request(msg.start, self.hub.worker)
            deadline = started + msg.timeout_s if msg.timeout_s > 0 else None
            handle = self.hub.submit(gen, deadline, self)
        except Exception as err:  # noqa: BLE001 - becomes this stream's error event, as Generate's status
            self._add(msg.stream, error_response(request_id, err, "InferenceSession.Open"))
            self.flush()
            return
        self.by_stream[msg.stream] = handle
        self.streams[handle] = (msg.stream, Responses(gen, self.hub.worker, started))

    def cancel(self, stream: int) -> None:
        handle = self.by_stream.pop(stream, None)
        if handle is not None:
            del self.streams[handle]
            self.hub.drop(handle)
            self._end_if_done()

    def deliver(self, handle: RequestHandle, kind: str, payload: object) -> None:
        stream, responses = self.streams[handle]
        if kind == "token":
            self._add(stream, responses.token(payload))
            return
        del self.streams[handle], self.by_stream[stream]
        if kind == "final":
            self._add(stream, responses.final(payload))
        else:
            self._add(stream, error_response(responses.gen.request_id, payload, "InferenceSession.Open"))

    def _add(self, stream: int, response: inference_pb2.GenerateResponse) -> None:
        self.pending.append(inference_pb2.SessionEvent(stream=stream, response=response))

    def flush(self) -> None:
        if self.pending:
            self.out.put_nowait(self.pending)
            self.pending = []
        self._end_if_done()

    def _end_if_done(self) -> None:
        if not self.reading and not self.streams:
            self.out.put_nowait(None)

    async def read(self, requests) -> None:
        try:
            async for msg in requests:
                action = msg.WhichOneof("action")
                if action == "start":
                    self.start(msg)
                elif action == "cancel":
                    self.cancel(msg.stream)
        except grpc.RpcError:
            pass  # the call is ending; Open's handler is cancelled with it
        self.reading = False  # the caller sends no more: end once its streams have
        self._end_if_done()

    def close(self) -> None:
        for handle in list(self.streams):
            self.hub.drop(handle)
        self.streams.clear()
        self.by_stream.clear()


class InferenceSessionServicer(inference_pb2_grpc.InferenceSessionServicer):
    def __init__(self, hub: StreamHub):
        self.hub = hub

    async def Open(self, request_iterator, context):
        session = _Session(self.hub)
        reader = asyncio.create_task(session.read(request_iterator))
        try:
            while True:
                batch = await session.out.get()
                if batch is None:
                    return
                yield inference_pb2.SessionEvents(events=batch)
        finally:
            reader.cancel()
            session.close()  # the call ended with streams open (gateway gone): free their caches now
