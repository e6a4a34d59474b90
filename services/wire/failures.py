"""How a failed expert batch is answered on every wire, and raised again at the caller.

On the replica, `replica_status(err)` gives the (status, message) of the reply, by the services'
table (services.common.errors.status_for) or INTERNAL for a bug, logged with its traceback.
gRPC carries the status by name (ExpertError.code), UCX as a status byte (ucx_framing). At the
caller, `caller_error(replica_id, status, message)` raises the reply again:

| status on the reply                  | raised at the caller | the dispatcher                        |
|--------------------------------------|----------------------|---------------------------------------|
| INVALID_ARGUMENT (bad batch)         | InvalidArgument      | fails the step: any replica refuses it |
| anything else (draining, bug, ...)   | ReplicaUnavailable   | retries on another replica            |

A replica that cannot answer at all (endpoint error, broken stream, timeout) is a
ReplicaUnavailable raised by the transport itself.
"""

from __future__ import annotations

import logging

import grpc

from services.common.errors import InvalidArgument, ServiceError, Unavailable, status_for
from services.common.logging import event, get_logger

log = get_logger("expert")


class ReplicaUnavailable(Unavailable):
    """The replica could not answer (endpoint error, stream broken, timeout, draining): the caller
    retries on another replica of the same experts. Maps to UNAVAILABLE if it escapes a servicer."""

    def __init__(self, replica_id: str, reason: str) -> None:
        super().__init__(f"expert replica {replica_id}: {reason}")
        self.replica_id = replica_id
        self.reason = reason


def replica_status(err: BaseException, **context) -> tuple[grpc.StatusCode, str]:
    """The (status, message) a replica answers a failed batch with; a bug is logged with
    `context` (layer, sequence, ...) and becomes INTERNAL."""
    mapped = status_for(err)
    if mapped is not None:
        return mapped
    event(log, "expert batch failed", level=logging.ERROR, error=f"{type(err).__name__}: {err}", exc_info=err,
          **context)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


def caller_error(replica_id: str, status: str, message: str) -> ServiceError:
    """The exception a failed reply raises at the caller; `status` is a grpc.StatusCode name."""
    if status == grpc.StatusCode.INVALID_ARGUMENT.name:
        return InvalidArgument(message)
    return ReplicaUnavailable(replica_id, f"{status or 'UNKNOWN'}: {message}")
