"""Domain errors and the one interceptor that turns them into gRPC status codes.

Servicers raise these (or let `model.errors.ModelError` through); they never call
`context.abort` for domain failures. The interceptor maps, KServe-style:

| raised                                   | status              |
|------------------------------------------|---------------------|
| InvalidArgument, model.errors.ModelError | INVALID_ARGUMENT    |
| NotFound                                 | NOT_FOUND           |
| FailedPrecondition                       | FAILED_PRECONDITION |
| Unavailable                              | UNAVAILABLE         |
| ResourceExhausted                        | RESOURCE_EXHAUSTED  |
| DeadlineExceeded                         | DEADLINE_EXCEEDED   |
| grpc.RpcError from a downstream call     | its code when UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED, else INTERNAL |
| anything else                            | INTERNAL, with a log line and traceback |

It wraps unary-unary, unary-stream, stream-unary and stream-stream handlers; for streaming
responses an error raised after some messages were sent still ends the call with its status.
`AsyncErrorInterceptor` does the same for grpc.aio servers.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, AsyncIterator, Callable, Iterator

import grpc

from model.errors import ModelError
from services.common.logging import event, get_logger

log = get_logger("errors")


class ServiceError(Exception):
    """Base of errors a caller can act on; `code` is the gRPC status it becomes."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_PASSED_THROUGH = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def status_for(err: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) for a known error; None for a bug (becomes INTERNAL)."""
    if isinstance(err, ServiceError):
        return err.code, str(err) or err.code.name.lower()
    if isinstance(err, ModelError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        code = err.code()
        if code in _PASSED_THROUGH:
            details = err.details() if hasattr(err, "details") else ""
            return code, f"downstream call failed: {details}"
    return None


def _already_aborted(context: grpc.ServicerContext) -> bool:
    """True when the handler itself called context.abort / set a non-OK code."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return False
    return code is not None and code != grpc.StatusCode.OK


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain exceptions to status codes for every handler kind (see the module table)."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except Exception as err:  # noqa: BLE001 - mapped or reported as INTERNAL
                self._abort(err, context, method)

        return wrapped

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as err:  # noqa: BLE001 - mapped or reported as INTERNAL
                self._abort(err, context, method)

        return wrapped

    @staticmethod
    def _abort(err: Exception, context: grpc.ServicerContext, method: str) -> None:
        if _already_aborted(context):
            raise err
        context.abort(*reported_status(err, method))


class AsyncErrorInterceptor(grpc.aio.ServerInterceptor):
    """`ErrorInterceptor` for grpc.aio servers, whose handlers are coroutines and async generators."""

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, self._wrap_unary),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, self._wrap_stream),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, self._wrap_unary),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, self._wrap_stream),
        )
        for kind, make_handler, wrap in kinds:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
                return handler  # a handler written with context.write: it maps nothing, so neither do we
            return make_handler(wrap(behavior, method), request_deserializer=handler.request_deserializer,
                                response_serializer=handler.response_serializer)
        return handler

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except Exception as err:  # noqa: BLE001 - mapped or reported as INTERNAL
                await self._abort(err, context, method)

        return wrapped

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for message in behavior(request, context):
                    yield message
            except Exception as err:  # noqa: BLE001 - mapped or reported as INTERNAL
                await self._abort(err, context, method)

        return wrapped

    @staticmethod
    async def _abort(err: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
        if isinstance(err, grpc.aio.AbortError) or _already_aborted(context):
            raise err
        await context.abort(*reported_status(err, method))


def reported_status(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status a failed call ends with, logged: a bug with its traceback, a domain error in one line."""
    mapped = status_for(err)
    if mapped is None:
        event(log, "unhandled error", level=logging.ERROR, method=method,
              error=f"{type(err).__name__}: {err}", exc_info=True)
        return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"
    code, message = mapped
    event(log, "request failed", level=logging.DEBUG, method=method, code=code.name, detail=message)
    return code, message
