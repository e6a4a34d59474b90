"""The routing plan as a Python value, and its moe.v1.Plan wire/JSON forms.

The router builds it (services/router/placement.py) and writes it to Redis; workers read it from
there (`redis_store.read_plan` -> `Plan.from_json`) and look replicas up per (layer, logical expert):

    version, payload = redis_store.read_plan(client, keys)
    plan = Plan.from_json(payload).ordered_for_plane(my_plane)
    for replica in plan.replicas_for(layer, expert):    # preference order
        dial(replica.grpc or replica.ucx)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from google.protobuf import json_format

from moe.v1 import router_pb2


@dataclass(frozen=True)
class PlanReplica:
    id: str
    grpc: str          # "host:port"
    ucx: str = ""      # "host:port"; empty when the replica has no UCX listener
    plane: int = 0
    shard: str = ""

    @property
    def endpoints(self) -> dict[str, str]:
        """The registry-record shape transports connect to."""
        return {"grpc": self.grpc, "ucx": self.ucx} if self.ucx else {"grpc": self.grpc}


@dataclass
class Plan:
    version: int
    n_routed_experts: int
    # layer -> [expert e] -> replica ids in preference order (empty list: no live replica)
    layers: dict[int, list[list[str]]]
    replicas: dict[str, PlanReplica]
    missing: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert), ascending
    created_unix_ms: int = 0

    def replicas_for(self, layer: int, expert: int) -> list[PlanReplica]:
        """Replicas serving (layer, expert), best first; [] when it is missing or unknown."""
        try:
            ids = self.layers[layer][expert]
        except (KeyError, IndexError):
            return []
        return [self.replicas[i] for i in ids]

    def missing_among(self, pairs: list[tuple[int, int]] | set[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (layer, expert) pairs of `pairs` that have no live replica, sorted."""
        return sorted(p for p in set(pairs) if not self.replicas_for(*p))

    def ordered_for_plane(self, plane: int | None) -> "Plan":
        """A copy whose replica lists put replicas on `plane` first (stable: keeps load order)."""
        if plane is None:
            return self
        def key(rid: str) -> int:
            return 0 if self.replicas[rid].plane == plane else 1
        layers = {layer: [sorted(ids, key=key) for ids in experts] for layer, experts in self.layers.items()}
        return replace(self, layers=layers)

    def same_placement(self, other: "Plan | None") -> bool:
        """True when routing is identical (version and timestamp ignored)."""
        return (other is not None and self.n_routed_experts == other.n_routed_experts
                and self.layers == other.layers and self.replicas == other.replicas
                and self.missing == other.missing)

    # ---- wire forms -----------------------------------------------------------------------
    def to_proto(self) -> router_pb2.Plan:
        msg = router_pb2.Plan(version=self.version, n_routed_experts=self.n_routed_experts,
                              created_unix_ms=self.created_unix_ms)
        for layer in sorted(self.layers):
            lp = msg.layers.add(layer=layer)
            for ids in self.layers[layer]:
                lp.experts.add(replica_ids=ids)
        for rid, r in self.replicas.items():
            msg.replicas[rid].CopyFrom(router_pb2.PlanReplica(
                id=r.id, endpoints=router_pb2.Endpoints(grpc=r.grpc, ucx=r.ucx), plane=r.plane, shard=r.shard))
        for layer, expert in self.missing:
            msg.missing.add(layer=layer, expert=expert)
        return msg

    @classmethod
    def from_proto(cls, msg: router_pb2.Plan) -> "Plan":
        return cls(
            version=msg.version,
            n_routed_experts=msg.n_routed_experts,
            layers={lp.layer: [list(er.replica_ids) for er in lp.experts] for lp in msg.layers},
            replicas={rid: PlanReplica(id=r.id or rid, grpc=r.endpoints.grpc, ucx=r.endpoints.ucx,
                                       plane=r.plane, shard=r.shard) for rid, r in msg.replicas.items()},
            missing=[(m.layer, m.expert) for m in msg.missing],
            created_unix_ms=msg.created_unix_ms,
        )

    def to_json(self) -> str:
        """moe.v1.Plan in protobuf's JSON mapping (what Redis stores under plan:<version>)."""
        return json_format.MessageToJson(self.to_proto(), indent=None, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        return cls.from_proto(json_format.Parse(text, router_pb2.Plan()))


def format_pairs(pairs: list[tuple[int, int]], limit: int = 8) -> str:
    """'layer 1 expert 3, layer 2 expert 3, ... (+5 more)' for error messages."""
    text = ", ".join(f"layer {layer} expert {expert}" for layer, expert in pairs[:limit])
    return text + (f" (+{len(pairs) - limit} more)" if len(pairs) > limit else "")
