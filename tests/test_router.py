"""Gating router: placement (pure) and the router process over real Redis and gRPC."""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest

from moe.v1 import router_pb2, router_pb2_grpc
from services.common import healthcheck, redis_store
from services.common.plan import Plan
from services.common.ports import free_port
from services.common.redis_server import RedisServer
from services.common.redis_store import DRAINING, ReplicaRecord
from services.router import placement
from support import start_service, stop_process, wait_until

LAYERS = [1, 2]
N = 8


def rec(rid, experts, plane=0, kind="expert", state="serving", capacity=1, shard=""):
    return ReplicaRecord(kind=kind, id=rid, endpoints={"grpc": f"{rid}:50053", "ucx": f"{rid}:50054"},
                         plane=plane, experts=list(experts), state=state, capacity=capacity,
                         shard=shard or f"shard-{min(experts)}-{max(experts)}" if experts else "")


def build(records, **kw):
    return placement.build_plan(records, moe_layers=LAYERS, n_routed_experts=N, **kw)


def ids(plan: Plan, layer: int, expert: int) -> list[str]:
    return [r.id for r in plan.replicas_for(layer, expert)]


# ---- placement ----------------------------------------------------------------------------

def test_every_moe_layer_and_expert_maps_to_the_replicas_holding_it():
    plan = build([rec("a", range(4)), rec("b", range(4, 8))])
    assert sorted(plan.layers) == LAYERS and plan.missing == []
    assert all(ids(plan, layer, e) == (["a"] if e < 4 else ["b"]) for layer in LAYERS for e in range(N))
    assert (plan.replicas["b"].grpc, plan.replicas["b"].ucx) == ("b:50053", "b:50054")


def test_experts_without_live_replica_are_listed_missing():
    plan = build([rec("a", [0, 1, 2, 3, 4, 5])])
    assert plan.missing == [(1, 6), (1, 7), (2, 6), (2, 7)]
    assert ids(plan, 1, 6) == [] and plan.missing_among({(1, 0), (2, 7)}) == [(2, 7)]


def test_drained_and_draining_replicas_are_excluded():
    records = [rec("a", range(8)), rec("b", range(8)), rec("c", range(8), state=DRAINING)]
    plan = build(records, drained={"b"})
    assert ids(plan, 1, 0) == ["a"] and set(plan.replicas) == {"a"}
    assert build(records, drained={"a", "b"}).missing == [(layer, e) for layer in LAYERS for e in range(N)]


def test_callers_plane_comes_first_then_other_planes():
    records = [rec("p0", range(8), plane=0), rec("p1", range(8), plane=1), rec("p2", range(8), plane=2)]
    plan = build(records)
    assert ids(plan, 1, 3) == ["p0", "p1", "p2"]
    assert ids(plan.ordered_for_plane(2), 1, 3) == ["p2", "p0", "p1"]
    read_back = Plan.from_json(plan.to_json())  # as a worker on plane 1 reads it from Redis
    assert ids(read_back.ordered_for_plane(1), 1, 3) == ["p1", "p0", "p2"]


def test_redundant_replicas_of_hot_experts_are_all_listed_least_loaded_first():
    records = [rec("a", [0, 1]), rec("b", [0]), rec("c", [0], capacity=4), rec("d", range(2, 8))]
    tokens = {(1, 0): 300, (1, 1): 600}
    load = placement.replica_load(records, tokens)
    assert load == {"a": 700, "b": 100, "c": 25, "d": 0}
    plan = build(records, load=load)
    assert ids(plan, 1, 0) == ["c", "b", "a"] and ids(plan, 2, 1) == ["a"]


def test_version_bumps_only_when_routing_changes():
    records = [rec("a", range(8))]
    first = build(records, now_ms=1)
    assert first.version == 1
    assert build(list(records), previous=first, now_ms=2) is first
    second = build(records + [rec("b", [3])], previous=first, now_ms=3)
    assert second.version == 2 and ids(second, 2, 3) == ["a", "b"]
    moved = [rec("a", range(8))]
    moved[0].endpoints = {"grpc": "elsewhere:1"}
    assert build(moved, previous=first).version == 2  # same id on a new address is a change


def test_non_expert_kinds_and_out_of_range_experts_are_ignored():
    plan = build([rec("w", [], kind="attention"), rec("a", [0, 99])])
    assert set(plan.replicas) == {"a"} and ids(plan, 1, 0) == ["a"]
    assert len(plan.missing) == 2 * (N - 1)


def test_shards_group_replicas_by_name():
    groups = placement.shards([rec("a", range(4), shard="s0"), rec("b", range(4), shard="s0"),
                               rec("c", range(4, 8), shard="s1"), rec("w", [], kind="attention")])
    assert [(s.name, s.experts, s.replica_ids) for s in groups] == [
        ("s0", [0, 1, 2, 3], ["a", "b"]), ("s1", [4, 5, 6, 7], ["c"])]


# ---- router process ---------------------------------------------------------------------

TINY_CONFIG = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=320, hidden_size=64,
    intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2, num_experts_per_tok=3,
    first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16,
    v_head_dim=24, max_position_embeddings=256, rope_theta=10000.0,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-config")
    (model_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    log_path = model_dir / "router.log"
    with RedisServer() as redis_server:
        port = free_port()
        proc = start_service("services.router", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0", "--cluster", "rt", "--poll-interval", "0.1", "--grace", "1",
                             log=log_path, env={"MOE_REDIS_URL": redis_server.url})
        try:
            def up():
                if proc.poll() is not None:
                    raise AssertionError(f"router exited {proc.returncode}: {log_path.read_text()}")
                return healthcheck.check("127.0.0.1", port, "moe.v1.Router", timeout=0.5)[0]
            wait_until(up, 10, "router SERVING")
            client = redis_store.connect(redis_server.url)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            yield dict(proc=proc, port=port, client=client, keys=redis_store.Keys("rt"),
                       stub=router_pb2_grpc.RouterStub(channel), log=log_path)
            channel.close()
            client.close()
        finally:
            stop_process(proc)


def register(cluster, record) -> redis_store.Registry:
    return redis_store.Registry(cluster["client"], cluster["keys"], record, ttl_s=3, interval_s=0.2).start()


def stored_plan(cluster) -> Plan | None:
    """The current plan as attention workers read it: from Redis."""
    stored = redis_store.read_plan(cluster["client"], cluster["keys"])
    return Plan.from_json(stored[1]) if stored is not None else None


def test_router_process_publishes_plans_drains_and_reports_status(cluster):
    stub, client, keys = cluster["stub"], cluster["client"], cluster["keys"]
    assert stored_plan(cluster) is None  # no expert replica yet: nothing published
    before = stub.ClusterStatus(router_pb2.ClusterStatusRequest(), timeout=5)
    assert before.plan_version == 0 and len(before.missing) == 16

    registries = [register(cluster, rec("e-low", range(4), plane=0, shard="lo")),
                  register(cluster, rec("e-high-p1", range(4, 8), plane=1, shard="hi")),
                  register(cluster, rec("e-high-p0", range(4, 8), plane=0, shard="hi"))]
    try:
        full = wait_until(lambda: (p := stored_plan(cluster)) is not None and len(p.replicas) == 3 and p,
                          10, "plan with 3 replicas")
        assert full.missing == [] and full.version >= 1
        assert full.n_routed_experts == 8 and sorted(full.layers) == [1, 2]
        on_plane_1 = full.ordered_for_plane(1)
        assert ids(on_plane_1, 2, 5) == ["e-high-p1", "e-high-p0"] and ids(on_plane_1, 1, 2) == ["e-low"]
        assert full.replicas["e-high-p1"].ucx == "e-high-p1:50054"

        # A drain publishes the version without the replica before it returns.
        drained = stub.DrainReplica(router_pb2.DrainRequest(replica_id="e-low"), timeout=5)
        assert drained.plan_version == full.version + 1
        assert [(m.layer, m.expert) for m in drained.missing] == [(l, e) for l in (1, 2) for e in range(4)]
        after = stored_plan(cluster)
        assert after.version == drained.plan_version and "e-low" not in after.replicas
        record = json.loads(client.get(keys.replica("expert", "e-low")))
        assert record["state"] == DRAINING

        # The drained replica keeps heart-beating but is not re-added.
        time.sleep(0.5)  # several router polls and heartbeats
        assert stored_plan(cluster).version == drained.plan_version

        with pytest.raises(grpc.RpcError) as info:
            stub.DrainReplica(router_pb2.DrainRequest(replica_id="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()

        # Load of the last complete window shows up in ClusterStatus.
        recorder = redis_store.LoadRecorder(client, keys)
        recorder.add(1, {5: 40, 6: 2}, now=time.time() - 10)
        assert recorder.flush()
        status = stub.ClusterStatus(router_pb2.ClusterStatusRequest(), timeout=5)
        assert status.plan_version == drained.plan_version
        assert [(s.name, list(s.experts), list(s.replica_ids)) for s in status.shards] == [
            ("hi", [4, 5, 6, 7], ["e-high-p0", "e-high-p1"]), ("lo", [0, 1, 2, 3], ["e-low"])]
        kinds = {r.id: (r.kind, r.state) for r in status.replicas}
        assert kinds["e-low"] == ("expert", DRAINING) and kinds["e-high-p0"] == ("expert", "serving")
        assert any(kind == "router" for kind, _ in kinds.values())
        assert {(l.layer, l.expert): l.tokens for l in status.expert_load} == {(1, 5): 40, (1, 6): 2}
        assert len(status.missing) == 8

        # A replica that dies (deregisters) leaves the plan.
        registries[2].deregister()
        dead = wait_until(lambda: (p := stored_plan(cluster)) is not None and "e-high-p0" not in p.replicas and p,
                          10, "dead replica removed")
        assert ids(dead, 1, 7) == ["e-high-p1"]
    finally:
        for registry in registries:
            registry.deregister()


def test_router_exits_zero_on_sigterm_and_deregisters(cluster):
    proc, client, keys = cluster["proc"], cluster["client"], cluster["keys"]
    assert redis_store.list_replicas(client, keys, "router")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, cluster["log"].read_text()
    assert redis_store.list_replicas(client, keys, "router") == []
    assert "signal received, draining" in cluster["log"].read_text()
