"""The default data path: UCX to every replica that advertises a UCX endpoint, gRPC to the rest.

The design's split (UCX carries expert traffic, gRPC is the fallback) per replica, so a worker
serves a cluster whose shards were started with and without `--ucx-port` alike. UCX starts on the
first replica that offers it; when it cannot start in this process (ucxx missing or broken), the
worker logs why once and keeps to gRPC.
"""

from __future__ import annotations

import importlib.util
import logging
import threading

from services.common.logging import event, get_logger
from services.transport.base import ExpertClient, ReplicaLike, Transport, make_transport
from services.transport.grpc_transport import GrpcTransport
from services.wire.dtypes import check_dispatch_dtype

log = get_logger("transport.auto")


def ucx_installed() -> bool:
    """Whether ucxx can be found, without importing it (importing it starts UCX)."""
    return importlib.util.find_spec("ucxx") is not None


class AutoTransport(Transport):
    name = "auto"

    def __init__(self, dispatch_dtype: str) -> None:
        self.dispatch_dtype = check_dispatch_dtype(dispatch_dtype)
        self.grpc = GrpcTransport(dispatch_dtype)
        self._ucx: Transport | None = None
        self._ucx_failed = not ucx_installed()
        self._lock = threading.Lock()

    def _ucx_transport(self) -> Transport | None:
        with self._lock:
            if self._ucx is None and not self._ucx_failed:
                try:
                    self._ucx = make_transport("ucx", self.dispatch_dtype)
                except Exception as err:  # noqa: BLE001 - ucxx missing, broken, or UCX failing to start
                    self._ucx_failed = True
                    event(log, "UCX unavailable here; expert traffic stays on gRPC", level=logging.WARNING,
                          error=str(err))
            return self._ucx

    def connect(self, replica: ReplicaLike) -> ExpertClient:
        if (replica.endpoints or {}).get("ucx"):
            ucx = self._ucx_transport()
            if ucx is not None:
                return ucx.connect(replica)
        return self.grpc.connect(replica)

    def close(self) -> None:
        self.grpc.close()
        if self._ucx is not None:
            self._ucx.close()
