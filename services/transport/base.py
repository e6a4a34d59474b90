"""The dispatch/combine interface every transport implements, and the metrics they share. What
the bytes mean (batch, dtypes, validation, failures) is the wire contract's, services/wire/.

    transport = make_transport("grpc", dispatch_dtype="bf16")
    client = transport.connect(replica)          # one per (worker, replica) pair, thread-safe
    future = client.submit(ExpertBatch(layer, hidden, ids, weights), timeout=5.0)   # dispatch
    out = future.result()                        # combine: [T, H]; ReplicaUnavailable -> retry elsewhere

A future never outlives its timeout: it resolves with the output, with ReplicaUnavailable
(endpoint error, broken stream, timeout, replica draining), or with InvalidArgument (the batch
itself is wrong; another replica would reject it too).
"""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
from typing import Protocol

from prometheus_client import Counter, Histogram

from services.wire.batch import ExpertBatch

# Shared by every transport (a metric can be registered once per process). Labels:
# transport = "grpc" | "ucx"; direction = "dispatch" (worker -> shard) | "combine" (shard -> worker).
DISPATCH_BYTES = Counter("moe_dispatch_bytes_total", "Bytes of expert traffic put on or taken off the wire",
                         ["transport", "direction"])
DISPATCH_WAIT = Histogram("moe_dispatch_wait_seconds",
                          "Seconds from submitting an expert batch to its output (or failure) arriving",
                          ["transport"],
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
DISPATCH_FAILURES = Counter("moe_dispatch_failures_total", "Expert batches that failed, by reason",
                            ["transport", "reason"])


class ReplicaLike(Protocol):
    """What connect() needs of a registry record (services.common.redis_store.ReplicaRecord)."""

    id: str
    endpoints: dict[str, str]


class ExpertClient(ABC):
    """The link from one worker to one replica; thread-safe, reconnects lazily after a failure."""

    replica_id: str

    @abstractmethod
    def submit(self, batch: ExpertBatch, timeout: float) -> concurrent.futures.Future:
        """Send `batch`; the future's result is the [T, H] output in the batch's hidden dtype
        (float32 when hidden was float8), or it raises ReplicaUnavailable / InvalidArgument no
        later than `timeout` seconds from now."""

    @abstractmethod
    def close(self) -> None:
        """Fail pending futures with ReplicaUnavailable and release the connection."""


class Transport(ABC):
    name: str
    dispatch_dtype: str  # "fp32" | "bf16" | "fp8": how hidden states travel

    @abstractmethod
    def connect(self, replica: ReplicaLike) -> ExpertClient:
        """A client for `replica` (cheap: the connection is opened on first submit)."""

    def close(self) -> None:
        """Release what the transport itself holds (clients are closed by their owners)."""
