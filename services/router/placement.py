"""Registry records -> placement plan. Pure: no Redis, no gRPC, no clock.

For every MoE layer and logical expert the plan lists the live, non-draining expert replicas that
hold it (redundant replicas of a hot expert are all listed), ordered by plane, then by estimated
load (when known), then by id; `Plan.ordered_for_plane` later moves the caller's plane to the
front. Pairs with no replica are listed in `missing` so workers fail fast naming them. A new
version is made only when the routing differs from the previous plan.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from services.common.plan import Plan, PlanReplica
from services.common.redis_store import DRAINING, ReplicaRecord


def eligible(record: ReplicaRecord, drained: Iterable[str] = ()) -> bool:
    """An expert replica that may receive traffic."""
    return record.kind == "expert" and record.state != DRAINING and record.id not in set(drained)


def replica_load(records: Iterable[ReplicaRecord], tokens: Mapping[tuple[int, int], int]) -> dict[str, float]:
    """Estimated tokens per replica: each (layer, expert)'s tokens split evenly over its holders,
    divided by the replica's capacity. Used only to order replicas."""
    records = [r for r in records if r.kind == "expert"]
    holders: dict[int, int] = defaultdict(int)
    for r in records:
        for e in r.experts:
            holders[e] += 1
    per_expert: dict[int, int] = defaultdict(int)
    for (_layer, expert), n in tokens.items():
        per_expert[expert] += n
    return {r.id: sum(per_expert.get(e, 0) / holders[e] for e in r.experts) / max(1, r.capacity)
            for r in records}


def build_plan(records: Iterable[ReplicaRecord], *, moe_layers: Iterable[int], n_routed_experts: int,
               drained: Iterable[str] = (), load: Mapping[str, float] | None = None,
               previous: Plan | None = None, now_ms: int = 0) -> Plan:
    """The plan for `records`; `previous` itself when routing is unchanged, else version + 1."""
    drained = set(drained)
    load = load or {}
    live = sorted((r for r in records if eligible(r, drained)),
                  key=lambda r: (r.plane, load.get(r.id, 0.0), r.id))
    holders: dict[int, list[str]] = defaultdict(list)
    used: dict[str, PlanReplica] = {}
    for r in live:
        for e in r.experts:
            if 0 <= e < n_routed_experts:
                holders[e].append(r.id)
                used[r.id] = PlanReplica(id=r.id, grpc=r.endpoints.get("grpc", ""), ucx=r.endpoints.get("ucx", ""),
                                         plane=r.plane, shard=r.shard)
    layers = {layer: [list(holders.get(e, [])) for e in range(n_routed_experts)] for layer in sorted(moe_layers)}
    missing = [(layer, e) for layer in sorted(layers) for e in range(n_routed_experts) if not holders.get(e)]
    plan = Plan(version=(previous.version if previous else 0) + 1, n_routed_experts=n_routed_experts,
                layers=layers, replicas=used, missing=missing, created_unix_ms=now_ms)
    if plan.same_placement(previous):
        return previous  # type: ignore[return-value]
    return plan


@dataclass
class Shard:
    name: str
    experts: list[int] = field(default_factory=list)
    replica_ids: list[str] = field(default_factory=list)


def shards(records: Iterable[ReplicaRecord]) -> list[Shard]:
    """Expert replicas grouped by shard name (a replica without one is its own shard)."""
    out: dict[str, Shard] = {}
    for r in sorted(records, key=lambda r: r.id):
        if r.kind != "expert":
            continue
        name = r.shard or r.id
        shard = out.setdefault(name, Shard(name))
        shard.experts = sorted(set(shard.experts) | set(r.experts))
        shard.replica_ids.append(r.id)
    return [out[name] for name in sorted(out)]
