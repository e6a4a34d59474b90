"""The thin moe.v1.Router servicer: protobuf <-> `RouterState`. Domain errors (NotFound,
InvalidArgument) become status codes in the server's error interceptor."""

from __future__ import annotations

import grpc

from moe.v1 import router_pb2, router_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.redis_store import DRAINING
from services.router import placement
from services.router.state import RouterState


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Translates moe.v1.Router calls to RouterState."""

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def DrainReplica(self, request: router_pb2.DrainRequest, context: grpc.ServicerContext) -> router_pb2.DrainResponse:
        if not request.replica_id:
            raise InvalidArgument("replica_id is required")
        plan = self.state.drain(request.replica_id)
        response = router_pb2.DrainResponse(plan_version=plan.version)
        for layer, expert in plan.missing:
            response.missing.add(layer=layer, expert=expert)
        return response

    def ClusterStatus(self, request: router_pb2.ClusterStatusRequest,
                      context: grpc.ServicerContext) -> router_pb2.ClusterStatusResponse:
        state = self.state
        records, plan = list(state.records), state.plan
        window = state.last_window()
        out = router_pb2.ClusterStatusResponse(plan_version=plan.version, load_window_start_unix_s=window,
                                               load_window_s=state.load_window_s)
        for shard in placement.shards(records):
            out.shards.add(name=shard.name, experts=shard.experts, replica_ids=shard.replica_ids)
        for r in records:
            out.replicas.add(
                id=r.id, kind=r.kind, plane=r.plane, experts=r.experts, shard=r.shard, pid=r.pid, host=r.host,
                state=DRAINING if r.id in state.drained else r.state, capacity=r.capacity,
                started_unix_ms=int(r.started_at * 1000),
                endpoints=router_pb2.Endpoints(grpc=r.endpoints.get("grpc", ""), ucx=r.endpoints.get("ucx", "")))
        for layer, expert in plan.missing:
            out.missing.add(layer=layer, expert=expert)
        for (layer, expert), n in sorted(state.load_in(window).items()):
            out.expert_load.add(layer=layer, expert=expert, tokens=n)
        return out
