"""API keys at the front door: with a key file, every call to the gateway's moe.v1 services must
carry `authorization: Bearer <key>` naming one of its keys, or it ends UNAUTHENTICATED.

The file holds one key per line (blank lines and lines starting with `#` are skipped). Keys are
compared in constant time, and the refusal says the same thing whether the header was missing,
malformed or held a wrong key. Health checks and server reflection stay open, so that probes and
tools need no key. No key is ever logged.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Callable

import grpc

# services reachable without a key: Kubernetes probes and grpcurl-style discovery
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REFUSAL = "missing or invalid API key (send 'authorization: Bearer <key>')"


class ApiKeyError(ValueError):
    """The key file cannot be used (missing, unreadable, or without a key)."""


def read_keys(path: str | Path) -> list[bytes]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ApiKeyError(f"cannot read the API key file {path}: {err.strerror or err}") from None
    keys = [line.strip().encode() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ApiKeyError(f"the API key file {path} holds no key")
    return keys


def bearer_key(metadata) -> bytes | None:
    """The key of an `authorization: Bearer <key>` header, None without one."""
    for name, value in metadata or ():
        if name == "authorization":
            scheme, _, key = (value if isinstance(value, str) else value.decode()).partition(" ")
            return key.strip().encode() if scheme.lower() == "bearer" and key.strip() else None
    return None


def key_matches(key: bytes | None, keys: list[bytes]) -> bool:
    """Constant time in the key's bytes; every configured key is compared, a match or not."""
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(key or b"", candidate)
    return matched and key is not None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key before they reach a servicer."""

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        if key_matches(bearer_key(handler_call_details.invocation_metadata), self.keys):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends every call UNAUTHENTICATED."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def refuse_stream(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        yield  # an async generator, as a streaming handler must be

    serdes = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **serdes)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **serdes)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **serdes)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **serdes)
