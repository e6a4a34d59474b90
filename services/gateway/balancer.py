"""Which attention worker gets the next request: pure bookkeeping, no I/O.

Each worker's score is the streams this gateway has open to it plus what the worker reported
(GetLoad) beyond those streams at the last poll: other gateways' and direct clients' sequences.
The lowest score wins; ties go round-robin so equal workers share a burst evenly. Workers that
are draining (`accepting` false) get nothing; workers whose last GetLoad failed are used only
when no answering worker is left.

    balancer.update_workers([WorkerInfo("attention-0", "127.0.0.1:50052", plane=0), ...])
    lease = balancer.acquire(exclude={"attention-1"})   # None: no worker to send to
    try: ... finally: balancer.release(lease)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as found in the registry."""

    id: str
    endpoint: str          # "host:port" of its moe.v1.Inference
    plane: int = 0


@dataclass
class WorkerState:
    info: WorkerInfo
    in_flight: int = 0         # streams from this gateway now open to it
    external: int = 0          # sequences it reported beyond ours at the last poll
    max_batch: int = 0         # from GetLoad; 0 while unknown
    accepting: bool = True     # False while it drains
    reachable: bool = True     # False when the last GetLoad failed
    registered: bool = True    # False once gone from the registry (kept while streams are open)
    served: int = 0            # requests ever sent to it (for tests and metrics)

    @property
    def score(self) -> int:
        return self.in_flight + self.external


@dataclass(frozen=True)
class Lease:
    """One request's hold on a worker; give it back with Balancer.release."""

    worker: WorkerInfo


class Balancer:
    """Least-loaded choice over the registered workers (thread-safe)."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerState] = {}
        self._rr = 0
        self._lock = threading.Lock()

    # ---- membership -------------------------------------------------------------------------
    def update_workers(self, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        """Replace the registered set; returns workers dropped now (no stream open to them).

        A worker that left the registry while streams are open stays known (unregistered, never
        picked) until its last stream ends; `release` then reports it as dropped.
        """
        dropped = []
        with self._lock:
            current = {w.id: w for w in workers}
            for wid, state in list(self._workers.items()):
                if wid not in current or current[wid].endpoint != state.info.endpoint:
                    if state.in_flight == 0:
                        dropped.append(state.info)
                        del self._workers[wid]
                    else:
                        state.registered = False
            for wid, info in current.items():
                state = self._workers.get(wid)
                if state is None or state.info.endpoint != info.endpoint:
                    if state is not None and state.in_flight:
                        # same id, new address (restarted elsewhere): the old streams keep the
                        # old entry's count; start the new one from zero
                        state = None
                    self._workers[wid] = WorkerState(info)
                else:
                    state.registered = True
                    state.info = info
        return dropped

    def workers(self) -> list[WorkerState]:
        """A snapshot of every known worker, sorted by id."""
        with self._lock:
            return [WorkerState(**vars(s)) for _, s in sorted(self._workers.items())]

    def registered(self) -> list[WorkerInfo]:
        with self._lock:
            return [s.info for _, s in sorted(self._workers.items()) if s.registered]

    # ---- load reports -----------------------------------------------------------------------
    def report_load(self, worker_id: str, *, active: int, queued: int, max_batch: int = 0,
                    accepting: bool = True) -> None:
        """Record a GetLoad answer: the worker's sequences beyond our own open streams."""
        with self._lock:
            state = self._workers.get(worker_id)
            if state is None:
                return
            state.external = max(0, active + queued - state.in_flight)
            state.max_batch = max_batch
            state.accepting = accepting
            state.reachable = True

    def report_unreachable(self, worker_id: str) -> None:
        """The worker did not answer GetLoad: use it only when nothing else answers."""
        with self._lock:
            state = self._workers.get(worker_id)
            if state is not None:
                state.reachable = False

    # ---- choice -----------------------------------------------------------------------------
    def acquire(self, exclude: set[str] | frozenset[str] = frozenset()) -> Lease | None:
        """Pick the least-loaded worker not in `exclude` and count a stream on it; None if none."""
        with self._lock:
            candidates = [s for wid, s in sorted(self._workers.items())
                          if s.registered and s.accepting and wid not in exclude]
            answering = [s for s in candidates if s.reachable]
            pool = answering or candidates
            if not pool:
                return None
            best = min(s.score for s in pool)
            tied = [s for s in pool if s.score == best]
            chosen = tied[self._rr % len(tied)]
            self._rr += 1
            chosen.in_flight += 1
            chosen.served += 1
            return Lease(chosen.info)

    def release(self, lease: Lease) -> WorkerInfo | None:
        """End a stream; returns the worker when it has left the registry and is now idle."""
        with self._lock:
            state = self._workers.get(lease.worker.id)
            if state is None or state.info.endpoint != lease.worker.endpoint:
                return None
            state.in_flight = max(0, state.in_flight - 1)
            if not state.registered and state.in_flight == 0:
                del self._workers[lease.worker.id]
                return state.info
            return None

    def mark_failed(self, worker_id: str) -> None:
        """A call to the worker failed with UNAVAILABLE: avoid it until its next good GetLoad."""
        self.report_unreachable(worker_id)

    def in_flight(self) -> int:
        with self._lock:
            return sum(s.in_flight for s in self._workers.values())
