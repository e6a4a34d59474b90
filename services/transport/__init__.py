"""Dispatch/combine between attention workers and expert shards: one interface (base.py), one
implementation per wire (grpc_transport.py; ucx_transport.py and its listener ucx_server.py,
imported only when asked for)."""

from services.transport.base import (
    ExpertBatch,
    ExpertClient,
    ReplicaUnavailable,
    Transport,
    make_transport,
)

__all__ = ["ExpertBatch", "ExpertClient", "ReplicaUnavailable", "Transport", "make_transport"]
