"""Routed-expert dispatch from an attention worker to expert-shard replicas.

`RemoteExperts` takes the place of a MoE block's local `ExpertBank`: `dispatch` splits the
layer's (token, expert) slots by the replica the routing plan names for each expert and sends
one batch per replica; `combine` waits, sums the weighted partial outputs, and re-sends the
work of a replica that failed to another replica of the same experts.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from prometheus_client import Counter, Histogram
from torch import nn

from services.common.errors import Unavailable
from services.common.logging import event, get_logger
from services.common.plan import Plan, PlanReplica, format_pairs
from services.transport.base import ExpertBatch, ReplicaUnavailable, Transport

log = get_logger("attention.dispatch")

COMBINE_WAIT = Histogram("moe_attention_combine_wait_seconds", "Time a MoE layer waits for its expert replies")
PLANE_BYTES = Counter("moe_dispatch_plane_bytes_total",
                      "Hidden-state bytes dispatched (in the dispatch dtype), by whether they cross network planes",
                      ["crossing"])
WIRE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}  # per hidden value; fp8 scales are 1/128 of that more
DEAD_REPLICA_S = 10.0  # how long a replica that failed is avoided, unless a new plan says otherwise


@dataclass
class _Part:
    replica: PlanReplica
    rows: torch.Tensor  # [n] token rows of the layer input carried by this part
    slots: torch.Tensor  # [n, K] bool: which (row, k) slots this replica serves
    future: object


@dataclass
class Pending:
    layer: int
    x: torch.Tensor  # [T, D]
    ids: torch.Tensor  # [T, K]
    weights: torch.Tensor  # [T, K]
    parts: list[_Part] = field(default_factory=list)


class PlanHolder:
    """The routing plan this worker dispatches by; swapped atomically when a new one arrives."""

    def __init__(self, plane: int):
        self.plane = plane
        self._plan: Plan | None = None
        self._lock = threading.Lock()
        self.updated = threading.Event()

    def set(self, plan: Plan) -> None:
        with self._lock:
            self._plan = plan.ordered_for_plane(self.plane)
        self.updated.set()

    def get(self) -> Plan | None:
        with self._lock:
            return self._plan


class Dispatcher:
    def __init__(self, transport: Transport, plans: PlanHolder, timeout_s: float = 10.0, attempts: int = 3):
        self.transport = transport
        self.plans = plans
        self.timeout_s = timeout_s
        self.attempts = attempts
        self._clients: dict[str, object] = {}
        self._dead: dict[str, float] = {}  # replica id -> monotonic time it failed
        self._dead_plan_version = 0  # the plan version those failures were seen under
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self.wait_seconds = 0.0  # accumulated combine wait, read by the scheduler for step splits

    # ---- replica choice --------------------------------------------------------------------
    def _alive(self, replica: PlanReplica) -> bool:
        failed = self._dead.get(replica.id)
        return failed is None or time.monotonic() - failed > DEAD_REPLICA_S

    def mark_dead(self, replica: PlanReplica, reason: str) -> None:
        with self._lock:
            self._dead[replica.id] = time.monotonic()
            client = self._clients.pop(replica.id, None)
        if client is not None:
            client.close()
        event(log, "replica failed, avoiding it", level=logging.WARNING, replica=replica.id, reason=reason)

    def _client(self, replica: PlanReplica):
        with self._lock:
            client = self._clients.get(replica.id)
            if client is None:
                client = self._clients[replica.id] = self.transport.connect(replica)
            return client

    def _choose(self, plan: Plan, layer: int, expert: int) -> PlanReplica | None:
        """A replica for (layer, expert): live ones first, spread over the best plane's; when
        every listed replica failed recently, the one that failed longest ago (it may be back)."""
        listed = plan.replicas_for(layer, expert)
        if not listed:
            return None
        candidates = [r for r in listed if self._alive(r)]
        if not candidates:
            return min(listed, key=lambda r: self._dead.get(r.id, 0.0))
        best_plane = [r for r in candidates if r.plane == candidates[0].plane]
        return best_plane[next(self._turn) % len(best_plane)]  # spread over redundant replicas

    # ---- dispatch / combine ----------------------------------------------------------------
    def _send(self, pending: Pending, slots: torch.Tensor) -> None:
        """Split the selected (row, k) slots [T, K] by replica and submit one batch to each."""
        plan = self.plans.get()
        if plan is None:
            raise Unavailable("no routing plan yet: is the router running?")
        if plan.version != self._dead_plan_version:  # membership changed: judge replicas afresh
            self._dead.clear()
            self._dead_plan_version = plan.version
        # The routing tables are tiny ([T, K] with K <= 8): Python lists beat a few dozen
        # small tensor ops per replica here, and leave two gathers per replica on tensors.
        ids, selected = pending.ids.tolist(), slots.tolist()
        owner: dict[int, int] = {}  # expert -> index in `chosen`
        chosen: list[PlanReplica] = []
        missing = []
        for expert in sorted({e for row, sel in zip(ids, selected) for e, s in zip(row, sel) if s}):
            replica = self._choose(plan, pending.layer, expert)
            if replica is None:
                missing.append((pending.layer, expert))
                continue
            index = next((i for i, r in enumerate(chosen) if r.id == replica.id), len(chosen))
            if index == len(chosen):
                chosen.append(replica)
            owner[expert] = index
        if missing:
            raise Unavailable(f"no live replica serves {format_pairs(missing)}")
        rows_of: list[list[int]] = [[] for _ in chosen]
        slots_of: list[list[list[bool]]] = [[] for _ in chosen]
        for t, (row, sel) in enumerate(zip(ids, selected)):
            for index in {owner[e] for e, s in zip(row, sel) if s}:
                rows_of[index].append(t)
                slots_of[index].append([s and owner[e] == index for e, s in zip(row, sel)])
        device = pending.ids.device
        for replica, rows_list, slots_list in zip(chosen, rows_of, slots_of):
            rows = torch.tensor(rows_list, device=device)
            part_slots = torch.tensor(slots_list, device=device)  # [n, K]
            batch = ExpertBatch(
                layer=pending.layer,
                hidden=pending.x.index_select(0, rows),
                expert_ids=torch.where(part_slots, pending.ids.index_select(0, rows), -1).to(torch.int32),
                weights=torch.where(part_slots, pending.weights.index_select(0, rows), 0.0).float(),
            )
            crossing = "cross_plane" if replica.plane != self.plans.plane else "same_plane"
            PLANE_BYTES.labels(crossing).inc(batch.hidden.numel() * WIRE_BYTES[self.transport.dispatch_dtype])
            try:
                future = self._client(replica).submit(batch, self.timeout_s)
            except ReplicaUnavailable as err:
                future = _failed(err)
            pending.parts.append(_Part(replica, rows, part_slots, future))

    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Pending:
        pending = Pending(layer, x, ids, weights)
        self._send(pending, torch.ones_like(ids, dtype=torch.bool))
        return pending

    def combine(self, pending: Pending) -> torch.Tensor:
        out = torch.zeros(pending.x.shape, dtype=torch.float32, device=pending.x.device)
        started = time.perf_counter()
        for attempt in range(self.attempts):
            parts, pending.parts = pending.parts, []
            retry = torch.zeros_like(pending.ids, dtype=torch.bool)
            for part in parts:
                try:
                    result = part.future.result(timeout=self.timeout_s + 1.0)
                except (ReplicaUnavailable, TimeoutError) as err:
                    self.mark_dead(part.replica, str(err) or type(err).__name__)
                    retry[part.rows] |= part.slots
                    continue
                out.index_add_(0, part.rows, result.to(out.device, torch.float32))
            if not retry.any():
                break
            if attempt + 1 == self.attempts:
                raise Unavailable(f"layer {pending.layer}: expert replicas kept failing after {self.attempts} attempts")
            self._send(pending, retry)
        waited = time.perf_counter() - started
        self.wait_seconds += waited
        COMBINE_WAIT.observe(waited)
        return out.to(pending.x.dtype)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def _failed(err: Exception):
    from concurrent.futures import Future

    future: Future = Future()
    future.set_exception(err)
    return future


class RemoteExperts(nn.Module):
    """Drop-in for a MoE block's `ExpertBank`: the same dispatch/combine, served remotely."""

    def __init__(self, layer: int, dispatcher: Dispatcher):
        super().__init__()
        self.layer = layer
        self.dispatcher = dispatcher

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Pending:
        return self.dispatcher.dispatch(self.layer, x, ids, weights)

    def combine(self, pending: Pending) -> torch.Tensor:
        return self.dispatcher.combine(pending)
