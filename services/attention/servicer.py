"""moe.v1.Inference on an attention worker (grpc.aio): protobuf <-> scheduler calls, nothing more.

The scheduler's step thread publishes each step's events in one call; `publish` hands them to
the server's event loop with one wake-up, where each lands on its request's queue.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from model.generate import GenerationRequest, SamplingParams
from moe.v1 import inference_pb2, inference_pb2_grpc
from services.attention.scheduler import REQUESTS, Event, RequestHandle
from services.attention.worker import AttentionWorker
from services.common.errors import InvalidArgument, ResourceExhausted
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


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, worker: AttentionWorker, replica_id: str, plane: int, loop: asyncio.AbstractEventLoop,
                 max_streams: int):
        """loop: the event loop the server runs its calls on; max_streams: Generate calls served
        at once, queued ones included (past it, RESOURCE_EXHAUSTED)."""
        self.worker = worker
        self.replica_id = replica_id
        self.plane = plane
        self.loop = loop
        self.max_streams = max_streams
        self._streams: dict[RequestHandle, asyncio.Queue] = {}

    def publish(self, events: list[Event]) -> None:
        """Called by the scheduler's step thread."""
        self.loop.call_soon_threadsafe(self._fan_out, events)

    def _fan_out(self, events: list[Event]) -> None:
        for handle, kind, payload in events:
            stream = self._streams.get(handle)
            if stream is not None:  # None: the call already ended (cancelled by its client)
                stream.put_nowait((kind, payload))

    async def Generate(self, request, context):
        started = time.monotonic()
        gen = to_request(request, self.worker)
        if len(self._streams) >= self.max_streams:
            REQUESTS.labels("resource_exhausted").inc()
            raise ResourceExhausted(f"worker is serving its limit of {self.max_streams} streams (--max-streams); "
                                    "retry later or on another worker")
        remaining = context.time_remaining()
        deadline = started + remaining if remaining is not None and remaining < 1e8 else None
        handle = self.worker.scheduler.submit(gen, deadline)
        events = self._streams[handle] = asyncio.Queue()
        finished = False
        event(log, "generate started", request_id=gen.request_id, prompt_tokens=len(gen.prompt),
              max_new_tokens=gen.max_new_tokens)
        try:
            codec, ids = self.worker.codec, []
            while True:
                kind, payload = await events.get()
                if kind == "error":
                    finished = True
                    raise payload
                if kind == "token":
                    text = codec.delta(ids, payload.token) if codec is not None else ""
                    ids.append(payload.token)
                    yield inference_pb2.GenerateResponse(
                        request_id=gen.request_id,
                        token=inference_pb2.TokenChunk(id=payload.token, logprob=payload.logprob, text=text,
                                                       index=len(ids) - 1),
                    )
                    continue
                finished = True
                seq = payload
                ttft = (seq.first_token_at - seq.submitted_at) * 1000 if seq.first_token_at else 0.0
                usage = inference_pb2.Usage(
                    prompt_tokens=len(gen.prompt), generated_tokens=len(seq.tokens),
                    time_to_first_token_ms=ttft, total_time_ms=(time.monotonic() - started) * 1000,
                )
                event(log, "generate finished", request_id=gen.request_id, tokens=len(seq.tokens),
                      reason=seq.finish_reason)
                yield inference_pb2.GenerateResponse(
                    request_id=gen.request_id,
                    final=inference_pb2.Final(finish_reason=FINISH.get(seq.finish_reason, 0), usage=usage),
                )
                return
        finally:
            # a client that cancels or whose deadline passes ends the call here: free its cache now
            del self._streams[handle]
            if not finished:
                self.worker.scheduler.cancel(handle)

    async def GetLoad(self, request, context):
        load = self.worker.scheduler.load()
        return inference_pb2.WorkerLoad(
            replica_id=self.replica_id, plane=self.plane, active_sequences=load["active"],
            queued_sequences=load["queued"], max_batch=self.worker.engine.max_batch,
            kv_cache_used_tokens=load["kv_used"], kv_cache_total_tokens=load["kv_total"], accepting=True,
        )
