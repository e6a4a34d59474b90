"""Router state (registry watch -> plan) and the thin moe.v1.Router servicer over it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterator

import grpc
import redis
from prometheus_client import Gauge

from moe.v1 import router_pb2, router_pb2_grpc
from services.common import redis_store
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.logging import event, get_logger
from services.common.plan import Plan, format_pairs
from services.common.redis_store import DRAINING, Keys, ReplicaRecord
from services.router import placement

log = get_logger("router")

PLAN_VERSION = Gauge("moe_router_plan_version", "Version of the current placement plan")
MISSING_EXPERTS = Gauge("moe_router_missing_experts", "(layer, expert) pairs with no live replica")
LIVE_REPLICAS = Gauge("moe_router_live_replicas", "Live registered replicas", ["kind"])


class RouterState:
    """Polls the registry, rebuilds the plan on membership change, publishes it to Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, *, moe_layers: list[int], n_routed_experts: int,
                 poll_s: float = 1.0, load_window_s: int = redis_store.LOAD_WINDOW_S) -> None:
        self.client = client
        self.keys = keys
        self.moe_layers = list(moe_layers)
        self.n_routed_experts = n_routed_experts
        self.poll_s = poll_s
        self.load_window_s = load_window_s
        self.records: list[ReplicaRecord] = []
        # ids drained through us -> when last seen in the registry; forgotten once gone for longer
        # than a record's TTL, so a Redis restart (record briefly absent) does not re-add them.
        self._drained_seen: dict[str, float] = {}
        self.plan = Plan(version=0, n_routed_experts=n_routed_experts,
                         layers={layer: [[] for _ in range(n_routed_experts)] for layer in self.moe_layers},
                         replicas={}, missing=[(layer, e) for layer in self.moe_layers for e in range(n_routed_experts)])
        self.changed = threading.Condition()
        self.closed = threading.Event()
        self._refresh_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.outage = False
        self.unpublished = False  # a plan built while Redis was down, to write when it returns
        self._settle_until = 0.0  # after Redis lost its data: no rebuild before replicas re-registered
        self._epoch_seen = False  # whether this router has seen its epoch key in Redis

    # ---- registry -> plan -------------------------------------------------------------------
    def resume_from_redis(self) -> None:
        """Continue the version sequence of a previous router (best effort)."""
        try:
            stored = redis_store.read_plan(self.client, self.keys)
        except redis.RedisError as err:
            event(log, "redis unreachable at start, plan starts at version 0", level=logging.WARNING, error=str(err))
            return
        if stored is None:
            return
        version, payload = stored
        try:
            previous = Plan.from_json(payload)
        except ValueError as err:
            event(log, "stored plan unreadable, superseding it", level=logging.WARNING, version=version, error=str(err))
            previous = None
        if previous is not None and previous.n_routed_experts == self.n_routed_experts \
                and set(previous.layers) == set(self.moe_layers):
            self.plan = previous
        else:
            self.plan.version = version
        event(log, "resumed plan", version=version)

    def refresh(self) -> bool:
        """Re-read the registry and rebuild; True when a new plan version was made."""
        with self._refresh_lock:
            try:
                records = redis_store.list_replicas(self.client, self.keys)
            except redis.RedisError as err:
                if not self.outage:
                    event(log, "redis unreachable, keeping the last plan", level=logging.WARNING, error=str(err))
                self.outage = True
                return False
            if self.outage:
                event(log, "redis reachable again")
            self.outage = False
            if self._redis_lost_its_data():
                # A Redis that came back empty holds no replica records until each replica's next
                # heartbeat: wait for those before judging membership, or the plan would briefly
                # declare every live expert missing.
                self._settle_until = time.monotonic() + redis_store.HEARTBEAT_S * 2 + self.poll_s
                self.unpublished = True  # the stored plan went with the data: write it again
                event(log, "redis came back empty, waiting for replicas to re-register",
                      settle_s=round(self._settle_until - time.monotonic(), 1))
            if time.monotonic() < self._settle_until:
                return False
            self.records = records
            live_ids = {r.id for r in records}
            now = time.monotonic()
            for rid in list(self._drained_seen):
                if rid in live_ids:
                    self._drained_seen[rid] = now
                elif now - self._drained_seen[rid] > redis_store.REPLICA_TTL_S + self.poll_s:
                    del self._drained_seen[rid]
            for kind in redis_store.KINDS:
                LIVE_REPLICAS.labels(kind).set(sum(r.kind == kind for r in records))
            return self._rebuild()

    def _redis_lost_its_data(self) -> bool:
        """True once per loss: the epoch key this router set is gone (it never expires)."""
        try:
            created = self.client.set(self.keys.router_epoch, str(time.time()), nx=True)
        except redis.RedisError:
            return False
        lost = bool(created) and self._epoch_seen
        self._epoch_seen = True
        return lost

    def _rebuild(self) -> bool:
        candidate = placement.build_plan(self.records, moe_layers=self.moe_layers,
                                         n_routed_experts=self.n_routed_experts, drained=self.drained,
                                         previous=self.plan, now_ms=int(time.time() * 1000))
        if candidate is self.plan:
            if self.unpublished:
                self._publish(self.plan)
            return False
        # Membership changed: order redundant replicas by the last window's load, once.
        load = self._replica_load()
        if load:
            candidate = placement.build_plan(self.records, moe_layers=self.moe_layers,
                                             n_routed_experts=self.n_routed_experts, drained=self.drained,
                                             load=load, previous=self.plan, now_ms=candidate.created_unix_ms)
        with self.changed:
            self.plan = candidate
            self.changed.notify_all()
        PLAN_VERSION.set(candidate.version)
        MISSING_EXPERTS.set(len(candidate.missing))
        event(log, "plan published", version=candidate.version, replicas=len(candidate.replicas),
              missing=len(candidate.missing),
              missing_pairs=format_pairs(candidate.missing, limit=4) if candidate.missing else None)
        self._publish(candidate)
        return True

    def _publish(self, plan: Plan) -> None:
        try:
            redis_store.write_plan(self.client, self.keys, plan.version, plan.to_json())
            self.unpublished = False
        except redis.RedisError as err:
            self.unpublished = True
            event(log, "plan not written to redis, will retry", level=logging.WARNING,
                  version=plan.version, error=str(err))

    def _replica_load(self) -> dict[str, float]:
        try:
            tokens = redis_store.read_load(self.client, self.keys, self.last_window(), self.moe_layers)
        except redis.RedisError:
            return {}
        return placement.replica_load(self.records, tokens) if tokens else {}

    @property
    def drained(self) -> set[str]:
        return set(self._drained_seen)

    def last_window(self) -> int:
        return redis_store.window_start(None, self.load_window_s) - self.load_window_s

    # ---- admin ------------------------------------------------------------------------------
    def drain(self, replica_id: str) -> Plan:
        """Remove `replica_id` from the plan now and mark it draining in Redis."""
        self.refresh()
        with self._refresh_lock:
            record = next((r for r in self.records if r.id == replica_id), None)
            if record is None:
                raise NotFound(f"no live replica with id '{replica_id}'")
            self._drained_seen[replica_id] = time.monotonic()
            record.state = DRAINING
            try:
                redis_store.set_replica_state(self.client, self.keys, record.kind, replica_id, DRAINING)
            except redis.RedisError as err:
                event(log, "draining mark not written to redis", level=logging.WARNING,
                      replica=replica_id, error=str(err))
            event(log, "replica drained", replica=replica_id, kind=record.kind)
            self._rebuild()
            return self.plan

    # ---- watching ---------------------------------------------------------------------------
    def wait_for_newer(self, known_version: int, timeout: float) -> Plan | None:
        """The current plan once its version differs from known_version; None on timeout/close."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: self.plan.version != known_version or self.closed.is_set(), timeout)
            if not ok or self.closed.is_set():
                return None
            return self.plan

    def start(self) -> "RouterState":
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self.closed.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - the watch loop must outlive one bad poll
                event(log, "registry poll failed", level=logging.ERROR, error=repr(err), exc_info=True)

    def close(self) -> None:
        self.closed.set()
        with self.changed:
            self.changed.notify_all()
        if self._thread is not None:
            self._thread.join(self.poll_s + 2.0)


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Translates moe.v1.Router calls to RouterState."""

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def GetPlan(self, request: router_pb2.GetPlanRequest, context: grpc.ServicerContext) -> router_pb2.Plan:
        plane = request.caller_plane if request.HasField("caller_plane") else None
        return self.state.plan.to_proto(plane)

    def WatchPlan(self, request: router_pb2.WatchPlanRequest, context: grpc.ServicerContext) -> Iterator[router_pb2.Plan]:
        plane = request.caller_plane if request.HasField("caller_plane") else None
        known = request.known_version
        while context.is_active() and not self.state.closed.is_set():
            plan = self.state.wait_for_newer(known, timeout=0.5)
            if plan is None:
                continue
            known = plan.version
            yield plan.to_proto(plane)
        if self.state.closed.is_set():
            raise Unavailable("router is shutting down; reconnect to another router or retry")

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
        try:
            tokens = redis_store.read_load(state.client, state.keys, window, state.moe_layers)
        except redis.RedisError:
            tokens = {}
        for (layer, expert), n in sorted(tokens.items()):
            out.expert_load.add(layer=layer, expert=expert, tokens=n)
        return out
