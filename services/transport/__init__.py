"""Dispatch/combine between attention workers and expert shards: one interface (base.py), one
implementation per wire (grpc_transport.py; ucx_transport.py and its listener ucx_server.py,
imported only when asked for), and `make_transport` to pick one by name. They move bytes; what
the bytes mean is services/wire/."""

from __future__ import annotations

from typing import Any

from services.transport.base import ExpertClient, Transport
from services.wire.dtypes import check_dispatch_dtype

TRANSPORTS = ("grpc", "ucx")
# "auto": UCX to every replica that offers it where ucxx works, gRPC to the rest
TRANSPORT_CHOICES = ("auto",) + TRANSPORTS


def make_transport(name: str, dispatch_dtype: str, **options: Any) -> Transport:
    """The transport called `name` ("auto", "grpc" or "ucx"); UCX is imported only here, on demand."""
    check_dispatch_dtype(dispatch_dtype)
    if name == "auto":
        from services.transport.auto import AutoTransport

        return AutoTransport(dispatch_dtype)
    if name == "grpc":
        from services.transport.grpc_transport import GrpcTransport

        return GrpcTransport(dispatch_dtype, **options)
    if name == "ucx":
        from services.transport.auto import ucx_transport

        return ucx_transport(dispatch_dtype, **options)
    raise ValueError(f"transport '{name}' is not one of {', '.join(TRANSPORT_CHOICES)}")


__all__ = ["ExpertClient", "Transport", "TRANSPORTS", "TRANSPORT_CHOICES", "make_transport"]
