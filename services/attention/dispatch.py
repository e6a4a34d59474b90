"""Routed-expert dispatch from an attention worker to expert-shard replicas.

`RemoteExperts` takes the place of a MoE block's local `ExpertBank`: `dispatch` splits the
layer's (token, expert) slots by the replica the routing plan names for each expert and sends
one batch per replica; `combine` waits, sums the weighted partial outputs, and re-sends the
work of a replica that failed to another replica of the same experts.

A worker may also hold some experts itself (`LocalExperts`, `--local-experts`): their slots never
leave the process, and `combine` computes them after the batches are sent, while the shards
work on theirs, instead of sleeping through that time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from prometheus_client import Counter, Histogram
from torch import nn

from services.common.errors import ServiceError, Unavailable
from services.common.logging import event, get_logger
from services.common.plan import Plan, PlanReplica, format_pairs
from services.common.redis_store import LoadRecorder
from services.transport.base import Transport
from services.wire.batch import ExpertBatch
from services.wire.dtypes import hidden_bytes_per_token
from services.wire.failures import ReplicaUnavailable

log = get_logger("attention.dispatch")

LOCAL_TOKENS = Counter("moe_attention_local_expert_tokens_total",
                       "Token slots computed by the worker's own copy of its local experts (--local-experts)")
COMBINE_WAIT = Histogram("moe_attention_combine_wait_seconds", "Time a MoE layer waits for its expert replies")
PLANE_BYTES = Counter("moe_dispatch_plane_bytes_total",
                      "Hidden-state bytes dispatched (in the dispatch dtype), by whether they cross network planes",
                      ["crossing"])
DEAD_REPLICA_S = 10.0  # how long a replica that failed is avoided, unless a new plan says otherwise


@dataclass
class _Part:
    replica: PlanReplica
    rows: np.ndarray | None  # [n] token rows of the layer input carried by this part; None: all of them
    slots: np.ndarray  # [n, K] bool: which (row, k) slots this replica serves
    future: object


@dataclass
class Pending:
    """One layer's dispatched work. The routing lives on the host as NumPy arrays: splitting a
    decode batch by replica takes a few dozen operations on [T, K] arrays, each ~1 us in NumPy
    against ~5 us for a torch operator (~0.1 ms a layer saved at batch 16)."""

    layer: int
    x: torch.Tensor  # [T, D] on the model's device; held until combine, as parts may send it as is
    ids: np.ndarray  # [T, K] int64
    weights: np.ndarray  # [T, K] float32
    parts: list[_Part] = field(default_factory=list)
    local: np.ndarray | None = None  # [T, K] bool: slots of the worker's local experts, once sent


class LocalExperts:
    """Routed experts an attention worker serves from its own copy of their weights, on every
    MoE layer: one `ExpertBank` per layer, all holding the same experts. Their tokens are counted
    into the cluster's load statistics like a shard's, so placement and autoscaling see them."""

    def __init__(self, banks: dict[int, nn.Module], n_routed_experts: int, recorder: LoadRecorder | None = None):
        if not banks:
            raise ValueError("local experts need at least one MoE layer")
        self.banks = banks
        self.expert_ids = np.array(next(iter(banks.values())).expert_ids)
        self.n_routed_experts = n_routed_experts
        self.recorder = recorder

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """ids [T, K] -> [T, K] bool: the slots these experts serve."""
        return np.isin(ids, self.expert_ids)

    def compute(self, pending: Pending) -> torch.Tensor:
        """The weighted sum of the local slots' expert outputs, [T, D] float32."""
        ids = np.where(pending.local, pending.ids, -1)
        weights = np.where(pending.local, pending.weights, np.float32(0.0))
        device = pending.x.device
        out = self.banks[pending.layer](pending.x, torch.from_numpy(ids).to(device), torch.from_numpy(weights).to(device))
        return out.float()

    def record(self, pending: Pending) -> None:
        """Count the local slots' tokens per expert (after the layer is combined, as a shard
        records its load after answering)."""
        counts = np.bincount(pending.ids[pending.local], minlength=self.n_routed_experts)
        LOCAL_TOKENS.inc(int(counts.sum()))
        if self.recorder is not None:
            self.recorder.add(pending.layer, counts)


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


class LayerRoutes:
    """One layer's expert -> replica tables, for one plan and one set of failed replicas.

    `owners(turn)` is a [n_experts] array of indices into `replicas` (MISSING where no replica
    is listed). Experts with several equally good replicas (live, on the best plane) rotate over
    them from one dispatch to the next, so redundant replicas share the load.
    """

    MISSING = -2

    def __init__(self, plan: Plan, layer: int, dead: dict[str, float]):
        self.replicas: list[PlanReplica] = []
        position: dict[str, int] = {}
        choices: list[list[int]] = []
        for expert in range(plan.n_routed_experts):
            listed = plan.replicas_for(layer, expert)
            candidates = [r for r in listed if r.id not in dead]
            if listed and not candidates:  # all failed recently: the one that failed longest ago may be back
                candidates = [min(listed, key=lambda r: dead[r.id])]
            best = [r for r in candidates if r.plane == candidates[0].plane]
            for replica in best:
                if replica.id not in position:
                    position[replica.id] = len(self.replicas)
                    self.replicas.append(replica)
            choices.append([position[r.id] for r in best])
        self.missing = [e for e, c in enumerate(choices) if not c]
        period = math.lcm(*(len(c) for c in choices if c)) if len(choices) > len(self.missing) else 1
        self._tables = [
            np.array([c[(turn + e) % len(c)] if c else self.MISSING for e, c in enumerate(choices)])
            for turn in range(period)
        ]

    def owners(self, turn: int) -> np.ndarray:
        return self._tables[turn % len(self._tables)]


class Dispatcher:
    def __init__(self, transport: Transport, plans: PlanHolder, timeout_s: float = 10.0, attempts: int = 3,
                 local: LocalExperts | None = None):
        self.transport = transport
        self.plans = plans
        self.local = local
        self.timeout_s = timeout_s
        self.attempts = attempts
        self._clients: dict[str, object] = {}
        self._dead: dict[str, float] = {}  # replica id -> monotonic time it failed
        self._dead_plan_version = 0  # the plan version those failures were seen under
        self._routes: dict[int, LayerRoutes] = {}  # layer -> tables for `_routes_key`
        self._routes_key: tuple = ()
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._parked: dict[int, Pending] = {}  # layer -> work a compiled graph dispatched (`dispatch_experts`)
        self._rehearsing = False
        self._failure: ServiceError | None = None  # the last one raised inside `park` or `redeem`
        self.wait_seconds = 0.0  # accumulated combine wait, read by the scheduler for step splits
        self.id = next(_dispatcher_ids)  # how the `dispatch_experts` and `combine_experts` operators name it
        _dispatchers[self.id] = self

    # ---- replica choice --------------------------------------------------------------------
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

    def _layer_routes(self, plan: Plan, layer: int) -> LayerRoutes:
        """The tables for this plan and the replicas that failed within DEAD_REPLICA_S, built
        again only when either changes."""
        if plan.version != self._dead_plan_version:  # membership changed: judge replicas afresh
            self._dead.clear()
            self._dead_plan_version = plan.version
        now = time.monotonic()
        dead = {rid: at for rid, at in self._dead.items() if now - at <= DEAD_REPLICA_S}
        key = (plan.version, tuple(sorted(dead)))
        if key != self._routes_key:
            self._routes, self._routes_key = {}, key
        routes = self._routes.get(layer)
        if routes is None:
            routes = self._routes[layer] = LayerRoutes(plan, layer, dead)
        return routes

    # ---- dispatch / combine ----------------------------------------------------------------
    def _send(self, pending: Pending, slots: np.ndarray | None) -> None:
        """Split the (row, k) slots [T, K] (None: all of them) by replica and submit one batch
        to each. A replica that serves a slot of every row gets the layer input itself, uncopied."""
        plan = self.plans.get()
        if plan is None:
            raise Unavailable("no routing plan yet: is the router running?")
        routes = self._layer_routes(plan, pending.layer)
        owner = routes.owners(next(self._turn))[pending.ids]  # [T, K] index into routes.replicas
        if slots is not None:
            owner = np.where(slots, owner, -1)
        elif self.local is not None:
            pending.local = self.local.slots(pending.ids)
            owner = np.where(pending.local, -1, owner)
        if routes.missing and (owner == LayerRoutes.MISSING).any():
            experts = np.unique(pending.ids[owner == LayerRoutes.MISSING]).tolist()
            raise Unavailable(f"no live replica serves {format_pairs([(pending.layer, e) for e in experts])}")
        for index in np.unique(owner).tolist():
            if index < 0:
                continue
            replica = routes.replicas[index]
            mask = owner == index  # [T, K]
            serves = mask.any(axis=1)
            if serves.all():
                rows, part_slots, ids, weights = None, mask, pending.ids, pending.weights
                hidden = pending.x
            else:
                rows = np.flatnonzero(serves)
                part_slots, ids, weights = mask[rows], pending.ids[rows], pending.weights[rows]
                hidden = pending.x.index_select(0, torch.from_numpy(rows).to(pending.x.device, non_blocking=True))
            batch = ExpertBatch(
                layer=pending.layer,
                hidden=hidden,
                expert_ids=torch.from_numpy(np.where(part_slots, ids, -1).astype(np.int32)),
                weights=torch.from_numpy(np.where(part_slots, weights, np.float32(0.0))),
            )
            crossing = "cross_plane" if replica.plane != self.plans.plane else "same_plane"
            tokens, hidden_size = batch.hidden.shape
            PLANE_BYTES.labels(crossing).inc(
                tokens * hidden_bytes_per_token(hidden_size, self.transport.dispatch_dtype, with_scales=False))
            try:
                future = self._client(replica).submit(batch, self.timeout_s)
            except ReplicaUnavailable as err:
                future = _failed(err)
            pending.parts.append(_Part(replica, rows, part_slots, future))

    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Pending:
        """Route on the host: on a GPU the routing is copied once per layer (one synchronisation),
        where splitting it there would synchronise once per replica (nonzero, unique) and the
        transport once more per small section it copies into a message. The hidden states stay
        on their device; each replica's rows are gathered there."""
        weights = weights.float()
        if ids.is_cuda:
            ids, weights = ids.to("cpu", non_blocking=True), weights.to("cpu", non_blocking=True)
            torch.cuda.current_stream(x.device).synchronize()
        pending = Pending(layer, x, ids.numpy(), weights.numpy())
        if not self._rehearsing:
            self._send(pending, None)
        return pending

    @contextlib.contextmanager
    def rehearsal(self):
        """Dispatches send nothing and combine to zeros: decode steps that compile graphs
        before a plan or any shard exists."""
        self._rehearsing = True
        try:
            yield
        finally:
            self._rehearsing = False

    def combine(self, pending: Pending) -> torch.Tensor:
        has_local = pending.local is not None and pending.local.any()
        if has_local:
            out = self.local.compute(pending)  # while the shards compute theirs
        else:
            out = torch.zeros(pending.x.shape, dtype=torch.float32, device=pending.x.device)
        started = time.perf_counter()
        for attempt in range(self.attempts):
            parts, pending.parts = pending.parts, []
            retry = np.zeros(pending.ids.shape, dtype=bool)
            for part in parts:
                try:
                    result = part.future.result(timeout=self.timeout_s + 1.0)
                except (ReplicaUnavailable, TimeoutError) as err:
                    self.mark_dead(part.replica, str(err) or type(err).__name__)
                    if part.rows is None:
                        retry |= part.slots
                    else:
                        retry[part.rows] |= part.slots
                    continue
                result = result.to(out.device, torch.float32)
                if part.rows is None:
                    out.add_(result)
                else:
                    out.index_add_(0, torch.from_numpy(part.rows).to(out.device, non_blocking=True), result)
            if not retry.any():
                break
            if attempt + 1 == self.attempts:
                raise Unavailable(f"layer {pending.layer}: expert replicas kept failing after {self.attempts} attempts")
            self._send(pending, retry)
        waited = time.perf_counter() - started
        self.wait_seconds += waited
        COMBINE_WAIT.observe(waited)
        if has_local:
            self.local.record(pending)
        return out.to(pending.x.dtype)

    def park(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> int:
        """`dispatch` for a compiled graph, whose operators pass tensors and numbers only: the
        pending work is kept for `redeem(layer)`. One engine steps one batch at a time, so a
        layer has at most one dispatch in flight; a step that failed between the two leaves its
        pending work to be replaced by the next one's."""
        try:
            self._parked[layer] = self.dispatch(layer, x, ids, weights)
        except ServiceError as err:
            self._failure = err
            raise
        return layer

    def redeem(self, layer: int) -> torch.Tensor:
        try:
            return self.combine(self._parked.pop(layer))
        except ServiceError as err:
            self._failure = err
            raise

    @contextlib.contextmanager
    def failures_surfaced(self):
        """Around an engine step: a dispatch failure that reached the caller through a compiled
        graph's C++ wrapper (as a RuntimeError naming the operator) is raised again as itself,
        so the step fails with the failure's own status and message."""
        self._failure = None
        try:
            yield
        except RuntimeError as err:
            if self._failure is None:
                raise
            raise self._failure from err
        finally:
            self._failure = None

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


# Dispatchers by id, for the custom ops below (compiled graphs only): an op's arguments are
# tensors and numbers only.
_dispatchers: weakref.WeakValueDictionary[int, Dispatcher] = weakref.WeakValueDictionary()
_dispatcher_ids = itertools.count()


@torch.library.custom_op("moe_runtime::dispatch_experts", mutates_args=())
def dispatch_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, dispatcher: int, layer: int) -> torch.Tensor:
    """`Dispatcher.dispatch` as an operator that torch.compile keeps opaque: -> a ticket [1]
    int64 on the host (the layer) that `combine_experts` redeems; the combine's data dependency
    on it keeps the two in order inside a graph."""
    return torch.tensor([_dispatchers[dispatcher].park(layer, x, ids, weights)])


@dispatch_experts.register_fake
def _(x, ids, weights, dispatcher, layer):
    return torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("moe_runtime::combine_experts", mutates_args=())
def combine_experts(ticket: torch.Tensor, x: torch.Tensor, dispatcher: int) -> torch.Tensor:
    """`Dispatcher.combine` of a ticket from `dispatch_experts` -> [T, D] like x (which only
    gives the output its shape and dtype)."""
    return _dispatchers[dispatcher].redeem(int(ticket))


@combine_experts.register_fake
def _(ticket, x, dispatcher):
    return torch.empty_like(x)


class RemoteExperts(nn.Module):
    """Drop-in for a MoE block's `ExpertBank`: the same dispatch/combine, served remotely. An
    eager step calls the dispatcher; a graph being compiled (`CompiledDecoder`) calls it through
    the custom operators above, which torch.compile keeps as calls into Python."""

    traceable = True

    def __init__(self, layer: int, dispatcher: Dispatcher):
        super().__init__()
        self.layer = layer
        self.dispatcher = dispatcher
        self.dispatcher_id = dispatcher.id

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> object:
        if torch.compiler.is_compiling():
            return dispatch_experts(x, ids, weights, self.dispatcher_id, self.layer), x
        return self.dispatcher.dispatch(self.layer, x, ids, weights)

    def combine(self, handle: object) -> torch.Tensor:
        if torch.compiler.is_compiling():
            ticket, x = handle
            return combine_experts(ticket, x, self.dispatcher_id)
        return self.dispatcher.combine(handle)
