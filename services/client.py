"""Python client for applications: Generate through a cluster's gateway, status from its router.

    from services.client import Client, ClientError
    with Client("127.0.0.1:50050", timeout=60) as client:
        result = client.generate(prompt_ids=[1, 2, 3], max_new_tokens=16)
        print(result.tokens, result.finish_reason, result.usage["time_to_first_token_ms"])
        for item in client.stream(prompt_ids=[1, 2, 3], max_new_tokens=4):
            ...  # Token(id, logprob, text, index) per token, then the GenerationResult

    RouterClient("127.0.0.1:50051").status()   # moe.v1.Router.ClusterStatus as a dict

    async with AsyncClient("127.0.0.1:50050") as client:   # asyncio: the same calls as coroutines
        results = await asyncio.gather(*(client.generate(prompt_ids=p, max_new_tokens=16) for p in prompts))

Every failure is a `ClientError(code, message)`: the gRPC status name (or the stream's error
event code) and the server's message. Needs only grpcio and the generated protos (no torch).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import grpc
from google.protobuf import json_format

from moe.v1 import inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc

INT32_MAX = 2 ** 31 - 1
UINT32_MAX = 2 ** 32 - 1
UINT64_MAX = 2 ** 64 - 1
FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
    inference_pb2.FINISH_REASON_UNSPECIFIED: "unspecified",
}


class ClientError(Exception):
    """A failed call: `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `message` the cause."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "ClientError":
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code.name if code is not None else "UNKNOWN", details or "")


@dataclass(frozen=True)
class Token:
    """One streamed token."""

    id: int
    logprob: float      # natural log, temperature-1 distribution
    text: str           # text it adds ("" without a tokenizer)
    index: int          # 0-based position among the generated tokens


@dataclass
class GenerationResult:
    tokens: list[int]
    logprobs: list[float]
    text: str | None                  # None when the server streamed no text
    finish_reason: str                # "stop" | "length" | "cancelled"
    usage: dict = field(default_factory=dict)   # prompt_tokens, generated_tokens, time_to_first_token_ms, total_time_ms
    request_id: str = ""

    def to_dict(self) -> dict:
        """The `moe generate --json` shape."""
        out = {
            "tokens": self.tokens,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
            "usage": {k: self.usage[k] for k in ("prompt_tokens", "generated_tokens", "time_to_first_token_ms")
                      if k in self.usage},
        }
        if self.text is not None:
            out["text"] = self.text
        return out


def _check_ids(ids: Sequence[int], what: str) -> list[int]:
    out = []
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise ClientError("INVALID_ARGUMENT", f"{what} must be integers, got {token!r}")
        if not 0 <= token <= INT32_MAX:
            raise ClientError("INVALID_ARGUMENT", f"{what} must be in 0..{INT32_MAX}, got {token}")
        out.append(token)
    return out


def build_request(*, prompt_ids: Sequence[int] | None = None, text: str | None = None, max_new_tokens: int = 32,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                  request_id: str | None = None) -> inference_pb2.GenerateRequest:
    """A GenerateRequest, with the checks the wire types cannot express raised as ClientError.

    Values the proto can carry (temperature, top_p, top_k, an empty prompt) are left to the
    server, which answers INVALID_ARGUMENT with its own message.
    """
    if (prompt_ids is None) == (text is None):
        raise ClientError("INVALID_ARGUMENT", "give exactly one of prompt_ids or text")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ClientError("INVALID_ARGUMENT", f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if not 1 <= max_new_tokens <= UINT32_MAX:
        raise ClientError("INVALID_ARGUMENT", f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed is not None and not 0 <= seed <= UINT64_MAX:
        raise ClientError("INVALID_ARGUMENT", f"seed must be in 0..2**64-1, got {seed}")
    if not -INT32_MAX <= top_k <= INT32_MAX:
        raise ClientError("INVALID_ARGUMENT", f"top_k is out of range: {top_k}")
    sampling = inference_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        sampling.seed = seed
    request = inference_pb2.GenerateRequest(
        request_id=request_id or "", sampling=sampling, max_new_tokens=max_new_tokens,
        stop_token_ids=_check_ids(stop_token_ids, "stop_token_ids"), ignore_eos=ignore_eos)
    if text is not None:
        request.text = text
    else:
        request.prompt_ids.ids.extend(_check_ids(prompt_ids, "prompt_ids"))
    return request


class _Stream:
    """Reads one Generate call's messages into Tokens and, last, the GenerationResult."""

    def __init__(self, request: inference_pb2.GenerateRequest) -> None:
        self.request = request
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.pieces: list[str] = []

    def read(self, message: inference_pb2.GenerateResponse) -> Token | GenerationResult | None:
        """The item a message carries; raises ClientError for an error event."""
        kind = message.WhichOneof("event")
        if kind == "token":
            chunk = message.token
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.tokens.append(chunk.id)
            self.logprobs.append(chunk.logprob)
            self.pieces.append(chunk.text)
            return Token(chunk.id, chunk.logprob, chunk.text, chunk.index)
        if kind == "error":
            raise ClientError(message.error.code or "UNKNOWN", message.error.message)
        if kind == "final":
            usage = message.final.usage
            ttft_ms = (self.first_at - self.started) * 1000 if self.first_at is not None else 0.0
            has_text = self.request.WhichOneof("prompt") == "text" or any(self.pieces)
            return GenerationResult(
                tokens=self.tokens, logprobs=self.logprobs, text="".join(self.pieces) if has_text else None,
                finish_reason=FINISH_REASONS.get(message.final.finish_reason, "unspecified"),
                usage={"prompt_tokens": usage.prompt_tokens, "generated_tokens": usage.generated_tokens,
                       "time_to_first_token_ms": round(ttft_ms, 3),
                       "server_time_to_first_token_ms": round(usage.time_to_first_token_ms, 3),
                       "total_time_ms": round(usage.total_time_ms, 3)},
                request_id=message.request_id or self.request.request_id)
        return None

    def unfinished(self) -> ClientError:
        return ClientError("INTERNAL", f"stream of request {self.request.request_id} ended without a final message")


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying `api_key` (MOE_API_KEY when None); empty without a key."""
    key = api_key if api_key is not None else os.environ.get("MOE_API_KEY")
    return (("authorization", f"Bearer {key}"),) if key else ()


class Client:
    """Generate through a gateway (or any moe.v1.Inference endpoint)."""

    def __init__(self, endpoint: str, timeout: float | None = 600.0, api_key: str | None = None) -> None:
        """api_key: sent as `authorization: Bearer <key>` on every call (a gateway started with
        --api-key-file requires it); MOE_API_KEY when None."""
        self.endpoint = endpoint
        self.timeout = timeout
        self._metadata = auth_metadata(api_key)
        self._channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def stream(self, prompt_ids: Sequence[int] | None = None, text: str | None = None, *,
               max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
               request_id: str | None = None, timeout: float | None = None) -> Iterator[Token | GenerationResult]:
        """Yield a Token per generated token, then the GenerationResult; raises ClientError.

        Closing the generator early (break) cancels the call on the server.
        """
        stream = _Stream(build_request(prompt_ids=prompt_ids, text=text, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                       stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                       request_id=request_id or uuid.uuid4().hex))
        call = self._stub.Generate(stream.request, timeout=timeout if timeout is not None else self.timeout,
                                   metadata=self._metadata)
        try:
            for message in call:
                item = stream.read(message)
                if item is not None:
                    yield item
                    if isinstance(item, GenerationResult):
                        return
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None
        finally:
            call.cancel()  # no-op once the call has ended; frees the server's KV cache otherwise
        raise stream.unfinished()

    def generate(self, prompt_ids: Sequence[int] | None = None, text: str | None = None, **kwargs) -> GenerationResult:
        """Run one request to completion (same arguments as `stream`)."""
        for item in self.stream(prompt_ids, text, **kwargs):
            if isinstance(item, GenerationResult):
                return item
        raise ClientError("INTERNAL", "stream ended without a result")  # stream() raises first

    def load(self, timeout: float = 2.0) -> inference_pb2.WorkerLoad:
        try:
            return self._stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """`Client` for asyncio applications: the same calls as coroutines and async generators.

    Many concurrent streams share its one channel and the event loop's thread, with no thread per
    stream. Create it inside the event loop that uses it (a grpc.aio channel belongs to one loop),
    and keep to one event loop per process: grpc.aio's poller stays bound to the first loop, and
    channels made on a later loop after that one closed work but log "Event loop is closed".
    """

    def __init__(self, endpoint: str, timeout: float | None = 600.0, api_key: str | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._metadata = auth_metadata(api_key)
        self._channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    async def stream(self, prompt_ids: Sequence[int] | None = None, text: str | None = None, *,
                     max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None, stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                     request_id: str | None = None,
                     timeout: float | None = None) -> AsyncIterator[Token | GenerationResult]:
        """Yield a Token per generated token, then the GenerationResult; raises ClientError.

        Leaving the loop early (break, then the generator's aclose) cancels the call on the server.
        """
        stream = _Stream(build_request(prompt_ids=prompt_ids, text=text, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                       stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                       request_id=request_id or uuid.uuid4().hex))
        call = self._stub.Generate(stream.request, timeout=timeout if timeout is not None else self.timeout,
                                   metadata=self._metadata)
        try:
            async for message in call:
                item = stream.read(message)
                if item is not None:
                    yield item
                    if isinstance(item, GenerationResult):
                        return
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None
        finally:
            call.cancel()
        raise stream.unfinished()

    async def generate(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                       **kwargs) -> GenerationResult:
        """Run one request to completion (same arguments as `stream`)."""
        items = self.stream(prompt_ids, text, **kwargs)
        try:
            async for item in items:
                if isinstance(item, GenerationResult):
                    return item
        finally:
            await items.aclose()
        raise ClientError("INTERNAL", "stream ended without a result")  # stream() raises first

    async def load(self, timeout: float = 2.0) -> inference_pb2.WorkerLoad:
        try:
            return await self._stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RouterClient:
    """Read-only view of a cluster through its router (moe.v1.Router)."""

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._channel = grpc.insecure_channel(endpoint)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def cluster_status(self) -> router_pb2.ClusterStatusResponse:
        try:
            return self._stub.ClusterStatus(router_pb2.ClusterStatusRequest(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None

    def status(self) -> dict:
        """ClusterStatus as a dict (protobuf JSON names, defaults included)."""
        return json_format.MessageToDict(self.cluster_status(), preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RouterClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
