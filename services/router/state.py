"""The router's state: the registry, polled from Redis, turned into the routing plan it publishes.

`RouterState` reads the live replicas every `poll_s` (a `RedisPoller`), rebuilds the plan when
membership changes (services/router/placement.py) and writes each new version to Redis, where
attention workers read it. A Redis outage keeps the last plan; a Redis that comes back empty is
given time for the replicas to re-register before membership is judged again.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from prometheus_client import Gauge

from services.common import redis_store
from services.common.errors import NotFound
from services.common.logging import event, get_logger
from services.common.plan import Plan, format_pairs
from services.common.redis_poller import RedisPoller
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
        self._refresh_lock = threading.Lock()
        self.poller = RedisPoller("registry-watch", self.refresh, interval_s=poll_s,
                                  while_down="keeping the last plan")
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
            with self.poller.attempt():
                records = redis_store.list_replicas(self.client, self.keys)
            if self.poller.outage:
                return False
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
        self.plan = candidate
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
        tokens = self.load_in(self.last_window())
        return placement.replica_load(self.records, tokens) if tokens else {}

    def load_in(self, window: int) -> dict[tuple[int, int], int]:
        """Tokens per (layer, expert) recorded in `window`; none while Redis is away."""
        try:
            return redis_store.read_load(self.client, self.keys, window, self.moe_layers)
        except redis.RedisError:
            return {}

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

    # ---- polling ----------------------------------------------------------------------------
    def start(self) -> "RouterState":
        """Read the registry now, then every `poll_s` on the poller's thread."""
        self.refresh()
        self.poller.start()
        return self

    def close(self) -> None:
        self.poller.close()
