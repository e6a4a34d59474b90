"""The attention worker's dispatcher: how a layer's (token, expert) slots are split over replicas.

The transport here is an in-process one whose replicas compute a known function of the slots
they receive, so the tests can check both where each slot went and what `combine` sums; the
real transports are exercised end to end in test_cluster.py and test_ucx_transport.py.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter

import pytest
import torch
from torch.torch_version import TorchVersion

from model.moe import ExpertBank
from services.attention.dispatch import DEAD_REPLICA_S, Dispatcher, LayerRoutes, LocalExperts, PlanHolder, RemoteExperts
from services.attention.worker import COMPILED_REMOTE_EXPERTS_TORCH
from services.common.errors import Unavailable
from services.common.plan import Plan, PlanReplica
from services.wire.batch import ExpertBatch
from services.wire.failures import ReplicaUnavailable

LAYER = 1
N_EXPERTS = 8


def plan_of(owners: list[list[str]], planes: dict[str, int] | None = None, version: int = 1) -> Plan:
    """owners[e]: replica ids serving expert e (on LAYER), in the router's order."""
    planes = planes or {}
    ids = sorted({r for listed in owners for r in listed})
    replicas = {r: PlanReplica(r, f"{r}:1", plane=planes.get(r, 0)) for r in ids}
    return Plan(version, N_EXPERTS, {LAYER: owners}, replicas)


class ScaledSum:
    """A replica that answers sum_k weight[t, k] * (expert_id[t, k] + 1) * hidden[t] over its
    slots, and records what it was sent; `fail` makes it answer ReplicaUnavailable."""

    def __init__(self, replica_id: str):
        self.replica_id = replica_id
        self.batches: list[ExpertBatch] = []
        self.fail = False

    def submit(self, batch: ExpertBatch, timeout: float) -> concurrent.futures.Future:
        self.batches.append(batch)
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.fail:
            future.set_exception(ReplicaUnavailable(self.replica_id, "down"))
        else:
            scale = (batch.weights * (batch.expert_ids + 1).float() * (batch.expert_ids >= 0)).sum(dim=1)
            future.set_result(batch.hidden * scale[:, None])
        return future

    def close(self) -> None:
        pass


class InProcess:
    dispatch_dtype = "fp32"

    def __init__(self):
        self.replicas: dict[str, ScaledSum] = {}

    def connect(self, replica: PlanReplica) -> ScaledSum:
        return self.replicas.setdefault(replica.id, ScaledSum(replica.id))


def expected(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return x * (weights * (ids + 1).float()).sum(dim=1)[:, None]


def routing(T: int = 12, K: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N_EXPERTS, generator=g)[:K] for _ in range(T)])
    return torch.randn(T, 16, generator=g), ids, torch.rand(T, K, generator=g)


def dispatcher(plan: Plan, plane: int = 0) -> tuple[Dispatcher, InProcess]:
    holder = PlanHolder(plane)
    holder.set(plan)
    transport = InProcess()
    return Dispatcher(transport, holder, timeout_s=1.0), transport


def test_each_replica_gets_only_the_rows_and_slots_of_its_experts_and_combine_sums_them():
    plan = plan_of([["a"] if e < 4 else ["b"] for e in range(N_EXPERTS)])
    d, transport = dispatcher(plan)
    x, ids, weights = routing()
    out = d.combine(d.dispatch(LAYER, x, ids, weights))
    torch.testing.assert_close(out, expected(x, ids, weights))
    for name, held in (("a", range(4)), ("b", range(4, N_EXPERTS))):
        (batch,) = transport.replicas[name].batches
        sent = batch.expert_ids[batch.expert_ids >= 0]
        assert set(sent.tolist()) <= set(held)
        assert int((batch.expert_ids >= 0).sum()) == sum(int(e) in held for e in ids.flatten())
        assert bool((batch.weights[batch.expert_ids < 0] == 0).all())
        rows_with_own = [t for t in range(ids.shape[0]) if any(int(e) in held for e in ids[t])]
        assert batch.hidden.shape[0] == len(rows_with_own)


def test_redundant_replicas_share_the_experts_and_alternate_between_dispatches():
    d, transport = dispatcher(plan_of([["a", "b"]] * N_EXPERTS))
    x, ids, weights = routing()
    served: Counter = Counter()
    for _ in range(4):
        torch.testing.assert_close(d.combine(d.dispatch(LAYER, x, ids, weights)), expected(x, ids, weights))
    for name, replica in transport.replicas.items():
        served[name] = sum(int((b.expert_ids >= 0).sum()) for b in replica.batches)
        assert len(replica.batches) == 4  # both replicas take part in every dispatch
    assert served["a"] == served["b"] == 2 * ids.numel()  # over two turns each expert went to both


def test_replicas_on_the_workers_plane_are_preferred():
    plan = plan_of([["far", "near"]] * N_EXPERTS, planes={"far": 0, "near": 1})
    d, transport = dispatcher(plan, plane=1)
    x, ids, weights = routing()
    d.combine(d.dispatch(LAYER, x, ids, weights))
    assert list(transport.replicas) == ["near"]


def test_a_failed_replica_is_retried_elsewhere_and_avoided_until_the_plan_changes():
    d, transport = dispatcher(plan_of([["a", "b"]] * N_EXPERTS))
    transport.connect(PlanReplica("a", "a:1")).fail = True
    x, ids, weights = routing()
    torch.testing.assert_close(d.combine(d.dispatch(LAYER, x, ids, weights)), expected(x, ids, weights))
    sent_to_a = len(transport.replicas["a"].batches)
    for _ in range(3):
        torch.testing.assert_close(d.combine(d.dispatch(LAYER, x, ids, weights)), expected(x, ids, weights))
    assert len(transport.replicas["a"].batches) == sent_to_a  # avoided while recently failed
    d.plans.set(plan_of([["a", "b"]] * N_EXPERTS, version=2))
    transport.replicas["a"].fail = False
    d.combine(d.dispatch(LAYER, x, ids, weights))
    assert len(transport.replicas["a"].batches) > sent_to_a  # a new plan judges it afresh


def test_when_every_replica_failed_recently_the_one_that_failed_longest_ago_is_tried():
    plan = plan_of([["a", "b"]] * N_EXPERTS)
    now = time.monotonic()
    routes = LayerRoutes(plan, LAYER, dead={"a": now - 1.0, "b": now - 0.5})
    assert [routes.replicas[i].id for i in routes.owners(0).tolist()] == ["a"] * N_EXPERTS
    assert DEAD_REPLICA_S > 1.0


def test_an_expert_without_replica_fails_only_the_dispatches_that_touch_it():
    owners = [["a"]] * N_EXPERTS
    owners[5] = []
    d, _ = dispatcher(plan_of(owners))
    x, ids, weights = routing()
    with pytest.raises(Unavailable, match=f"layer {LAYER} expert 5"):
        d.dispatch(LAYER, x, ids, weights)
    clear = torch.stack([torch.tensor([e for e in range(N_EXPERTS) if e != 5][:3])] * ids.shape[0])
    torch.testing.assert_close(d.combine(d.dispatch(LAYER, x, clear, weights)), expected(x, clear, weights))


def test_remote_experts_in_an_eager_step_call_the_dispatcher_and_raise_its_failures_as_they_are(monkeypatch):
    """Outside a compiled graph no custom operator (and no registry of dispatchers) is involved:
    a step's failure is the dispatcher's own exception, without `failures_surfaced`."""
    monkeypatch.setattr("services.attention.dispatch._dispatchers", {})  # an operator would find none
    plan = plan_of([["a"] if e < 4 else ["b"] for e in range(N_EXPERTS)])
    d, transport = dispatcher(plan)
    experts = RemoteExperts(LAYER, d)
    x, ids, weights = routing()
    torch.testing.assert_close(experts.combine(experts.dispatch(x, ids, weights)), expected(x, ids, weights))
    transport.replicas["b"].fail = True
    with pytest.raises(Unavailable, match="kept failing after 3 attempts"):
        experts.combine(experts.dispatch(x, ids, weights))


@pytest.mark.slow
@pytest.mark.skipif(TorchVersion(torch.__version__) < COMPILED_REMOTE_EXPERTS_TORCH,
                    reason="torch < 2.13's C++ wrapper crashes when an operator raises (workers refuse --compile-decode there)")
def test_remote_experts_in_a_compiled_graph_dispatch_and_combine_like_the_dispatcher():
    """The custom operators that let a compiled decode step call the dispatcher, compiled as
    an attention worker compiles them (inductor, C++ wrapper, fullgraph: a graph break fails):
    each replica gets its slots, the graph gets what `combine` sums, and a dispatch failure
    inside the graph reaches the caller of a step as itself, with its message."""
    plan = plan_of([["a"] if e < 4 else ["b"] for e in range(N_EXPERTS)])
    d, transport = dispatcher(plan)
    experts = RemoteExperts(LAYER, d)
    compiled = torch.compile(lambda x, ids, w: experts.combine(experts.dispatch(x * 2, ids, w)) + 1,
                             fullgraph=True, options={"cpp_wrapper": True})
    x, ids, weights = routing()
    torch.testing.assert_close(compiled(x, ids, weights), expected(x * 2, ids, weights) + 1)
    assert len(transport.replicas["a"].batches) == len(transport.replicas["b"].batches) == 1
    transport.replicas["b"].fail = True  # b's work is retried on b (the only replica) until it gives up
    with pytest.raises(Unavailable, match="kept failing after 3 attempts"), d.failures_surfaced():
        compiled(x, ids, weights)
    d.plans.set(plan_of([["a"]] * 4 + [[]] * (N_EXPERTS - 4), version=2))
    with pytest.raises(Unavailable, match="no live replica serves layer 1 expert"), d.failures_surfaced():
        compiled(x, ids, weights)


def test_a_rehearsal_sends_nothing_and_combines_to_zeros():
    """What an attention worker compiles its decode graphs under before any shard is up."""
    d, transport = dispatcher(plan_of([["a"]] * N_EXPERTS))
    d.plans = PlanHolder(0)  # no plan yet: a real dispatch would fail
    x, ids, weights = routing()
    with d.rehearsal():
        out = d.combine(d.dispatch(LAYER, x, ids, weights))
    assert torch.equal(out, torch.zeros_like(x)) and not transport.replicas
    with pytest.raises(Unavailable, match="no routing plan"):
        d.dispatch(LAYER, x, ids, weights)


def local_bank(experts: list[int]) -> ExpertBank:
    bank = ExpertBank(experts, N_EXPERTS, dim=16, inter_dim=8)
    with torch.no_grad():
        torch.nn.init.normal_(bank.w13, generator=torch.Generator().manual_seed(1))
        torch.nn.init.normal_(bank.w2, generator=torch.Generator().manual_seed(2))
    return bank


class Counts:
    """LoadRecorder's `add`, kept in memory: {expert: tokens}, or tokens indexed by expert id."""

    def __init__(self):
        self.tokens: Counter = Counter()

    def add(self, layer: int, counts) -> None:
        items = counts.items() if isinstance(counts, dict) else enumerate(counts)
        self.tokens.update({(layer, int(e)): int(n) for e, n in items if n})


@torch.no_grad()
def test_local_experts_are_computed_in_process_never_sent_and_counted_as_load():
    """A worker's own experts (--local-experts): their slots never reach a replica, combine adds
    their bank's output to what the replicas answer, and their tokens go to the load statistics."""
    d, transport = dispatcher(plan_of([["a"]] * N_EXPERTS))
    bank, counts = local_bank([0, 1, 2]), Counts()
    d.local = LocalExperts({LAYER: bank}, N_EXPERTS, counts)
    x, ids, weights = routing()
    out = d.combine(d.dispatch(LAYER, x, ids, weights))
    local = ids <= 2
    (batch,) = transport.replicas["a"].batches
    assert not bool(((batch.expert_ids >= 0) & (batch.expert_ids <= 2)).any())
    assert int((batch.expert_ids >= 0).sum()) == int((~local).sum())
    want = (bank(x, ids.masked_fill(~local, -1), weights.masked_fill(~local, 0.0))
            + expected(x, ids.masked_fill(local, -1), weights.masked_fill(local, 0.0)))
    torch.testing.assert_close(out, want)
    assert counts.tokens == Counter({(LAYER, int(e)): int((ids == e).sum()) for e in (0, 1, 2) if (ids == e).any()})


@torch.no_grad()
def test_a_layer_whose_experts_are_all_local_needs_no_replica_at_all():
    d, transport = dispatcher(plan_of([[]] * N_EXPERTS))  # no live replica serves any expert
    bank = local_bank(list(range(N_EXPERTS)))
    d.local = LocalExperts({LAYER: bank}, N_EXPERTS)
    x, ids, weights = routing()
    torch.testing.assert_close(d.combine(d.dispatch(LAYER, x, ids, weights)), bank(x, ids, weights))
    assert not transport.replicas


@pytest.mark.slow
@pytest.mark.skipif(TorchVersion(torch.__version__) < COMPILED_REMOTE_EXPERTS_TORCH,
                    reason=f"compiled remote experts need torch >= {COMPILED_REMOTE_EXPERTS_TORCH}")
@torch.no_grad()
def test_local_experts_inside_a_compiled_graph_add_their_output_to_the_replicas():
    d, transport = dispatcher(plan_of([["a"]] * N_EXPERTS))
    bank = local_bank([5, 6, 7])
    d.local = LocalExperts({LAYER: bank}, N_EXPERTS)
    experts = RemoteExperts(LAYER, d)
    compiled = torch.compile(lambda x, ids, w: experts.combine(experts.dispatch(x, ids, w)),
                             fullgraph=True, options={"cpp_wrapper": True})
    x, ids, weights = routing()
    local = ids >= 5
    want = (bank(x, ids.masked_fill(~local, -1), weights.masked_fill(~local, 0.0))
            + expected(x, ids.masked_fill(local, -1), weights.masked_fill(local, 0.0)))
    torch.testing.assert_close(compiled(x, ids, weights), want)
    (batch,) = transport.replicas["a"].batches
    assert not bool((batch.expert_ids >= 5).any())
