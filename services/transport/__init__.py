"""Dispatch/combine between attention workers and expert shards: one interface (base.py), one
implementation per wire (grpc_transport.py; ucx_transport.py and its listener ucx_server.py,
imported only when asked for). They move bytes; what the bytes mean is services/wire/."""

from services.transport.base import ExpertClient, Transport, make_transport

__all__ = ["ExpertClient", "Transport", "make_transport"]
