"""Redis state: replica registry, routing plan, per-expert load. Never touched per token.

Keys (all under `<cluster>:`, docs/contracts.md):
    replica:<kind>:<id>      JSON ReplicaRecord, TTL 10 s, refreshed every 2 s by Registry
    plan:version             current plan version (int)
    plan:<version>           the plan as moe.v1.Plan JSON (services.common.plan.Plan.to_json)
    plan (pub/sub channel)   announces each new version
    load:<window>:<layer>    hash expert id -> tokens in that 10 s window (window = its start, Unix s)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import redis
from prometheus_client import Counter

from services.common.logging import event, get_logger
from services.common.redis_poller import RedisPoller

log = get_logger("redis")

REPLICA_TTL_S = 10
HEARTBEAT_S = 2.0
LOAD_WINDOW_S = 10
LOAD_EXPIRE_S = 600
OLD_PLAN_EXPIRE_S = 600
KINDS = ("expert", "attention", "gateway", "router")
SERVING, DRAINING = "serving", "draining"

LOAD_DROPPED = Counter("moe_load_tokens_dropped_total",
                       "Expert load token counts dropped because Redis was unreachable for too long")
LOAD_FLUSH_FAILURES = Counter("moe_load_flush_failures_total", "Load flushes that failed (Redis unreachable)")


def connect(url: str, password: str | None = None, *, timeout_s: float = 2.0) -> redis.Redis:
    """A client for `url`; `password` (MOE_REDIS_PASSWORD) overrides the URL's. Connects lazily."""
    kwargs: dict = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                    "decode_responses": True, "retry_on_timeout": False}
    if password:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)


class Keys:
    """Key builder: every key carries the cluster prefix."""

    def __init__(self, cluster: str) -> None:
        if not cluster or ":" in cluster:
            raise ValueError(f"cluster name must be non-empty and have no ':' (got {cluster!r})")
        self.cluster = cluster

    def _k(self, *parts: object) -> str:
        return ":".join([self.cluster, *(str(p) for p in parts)])

    def replica(self, kind: str, replica_id: str) -> str:
        return self._k("replica", kind, replica_id)

    def replica_pattern(self, kind: str | None = None) -> str:
        return self._k("replica", kind or "*", "*")

    @property
    def plan_version(self) -> str:
        return self._k("plan", "version")

    def plan(self, version: int) -> str:
        return self._k("plan", version)

    @property
    def plan_channel(self) -> str:
        return self._k("plan")

    @property
    def router_epoch(self) -> str:
        """Set by the router, no expiry: when it is gone, Redis lost its data (restarted empty)."""
        return self._k("router", "epoch")

    def load(self, window: int, layer: int) -> str:
        return self._k("load", window, layer)

    def load_pattern(self, window: int) -> str:
        return self._k("load", window, "*")


@dataclass
class ReplicaRecord:
    """One live replica as stored under replica:<kind>:<id>."""

    kind: str                                   # expert | attention | gateway | router
    id: str                                     # unique in the cluster
    endpoints: dict[str, str]                   # {"grpc": "host:port", "ucx": "host:port"}
    plane: int = 0                              # network plane index
    experts: list[int] = field(default_factory=list)  # expert shards: logical ids, sorted
    shard: str = ""                             # expert shards: shard name
    capacity: int = 1                           # relative capacity weight, >= 1
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    started_at: float = field(default_factory=time.time)  # Unix seconds
    state: str = SERVING                        # serving | draining

    def __post_init__(self) -> None:
        self.experts = sorted(int(e) for e in self.experts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "ReplicaRecord":
        raw = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


def list_replicas(client: redis.Redis, keys: Keys, kind: str | None = None) -> list[ReplicaRecord]:
    """Live replicas (of one kind, or all), sorted by (kind, id); bad records are skipped."""
    names = sorted(client.scan_iter(match=keys.replica_pattern(kind), count=500))
    if not names:
        return []
    out = []
    for name, value in zip(names, client.mget(names)):
        if value is None:
            continue  # expired between SCAN and MGET
        try:
            out.append(ReplicaRecord.from_json(value))
        except (ValueError, TypeError) as err:
            event(log, "bad replica record skipped", level=logging.WARNING, key=name, error=str(err))
    return sorted(out, key=lambda r: (r.kind, r.id))


def set_replica_state(client: redis.Redis, keys: Keys, kind: str, replica_id: str, state: str) -> bool:
    """Rewrite a live record's state keeping its TTL; False when it is not registered."""
    key = keys.replica(kind, replica_id)
    value = client.get(key)
    if value is None:
        return False
    record = ReplicaRecord.from_json(value)
    record.state = state
    return bool(client.set(key, record.to_json(), keepttl=True, xx=True))


class Registry:
    """Registers one replica and keeps it alive with a heartbeat (a `RedisPoller`).

    The heartbeat refreshes the TTL (EXPIRE) so a state written by someone else (the router marking
    the replica draining) survives; when the key is gone (expired, or Redis restarted empty) it
    writes the full record again.
    """

    def __init__(self, client: redis.Redis, keys: Keys, record: ReplicaRecord, *,
                 ttl_s: float = REPLICA_TTL_S, interval_s: float = HEARTBEAT_S) -> None:
        self.client = client
        self.keys = keys
        self.record = record
        self.ttl_ms = int(ttl_s * 1000)
        self.key = keys.replica(record.kind, record.id)
        self.poller = RedisPoller("heartbeat", self.heartbeat, interval_s=interval_s,
                                  while_down="the heartbeat retries; the record expires by its TTL")
        self._lock = threading.Lock()
        self.beats = 0

    def register(self) -> None:
        """Write the full record with its TTL (raises redis.RedisError when Redis is down)."""
        with self._lock:
            self.client.set(self.key, self.record.to_json(), px=self.ttl_ms)

    def heartbeat(self) -> bool:
        """One beat; True when the record is alive in Redis afterwards."""
        with self.poller.attempt():
            with self._lock:
                if not self.client.pexpire(self.key, self.ttl_ms):
                    self.client.set(self.key, self.record.to_json(), px=self.ttl_ms)
                    if not self.poller.outage and self.beats:
                        event(log, "registry record was gone, re-registered", key=self.key)
            self.beats += 1
        return not self.poller.outage

    def start(self) -> "Registry":
        """Register (best effort) and start the heartbeat.

        The first write replaces the record: a record left by a dead predecessor with the same id
        (killed before it could deregister) must not survive with its old endpoints."""
        with self.poller.attempt():
            self.register()
            self.beats += 1
        self.poller.start()
        return self

    def set_state(self, state: str) -> None:
        """Change our own state (e.g. draining on SIGTERM) and write it now (best effort)."""
        self.record.state = state
        try:
            self.register()
        except redis.RedisError as err:
            event(log, "could not write state", level=logging.WARNING, state=state, error=str(err))

    def stop(self) -> None:
        """Stop the heartbeat without deleting the record (it expires by TTL)."""
        self.poller.close()

    def deregister(self) -> None:
        """Stop the heartbeat and delete the record (best effort)."""
        self.stop()
        try:
            with self._lock:
                self.client.delete(self.key)
        except redis.RedisError as err:
            event(log, "deregister failed, record will expire", level=logging.WARNING, error=str(err))


# ---- plan ---------------------------------------------------------------------------------

def read_plan_version(client: redis.Redis, keys: Keys) -> int:
    value = client.get(keys.plan_version)
    return int(value) if value is not None else 0


def read_plan(client: redis.Redis, keys: Keys, version: int | None = None) -> tuple[int, str] | None:
    """(version, plan JSON) of `version` or the current one; None when there is none."""
    if version is None:
        version = read_plan_version(client, keys)
        if version == 0:
            return None
    payload = client.get(keys.plan(version))
    return (version, payload) if payload is not None else None


def write_plan(client: redis.Redis, keys: Keys, version: int, payload: str) -> None:
    """Store plan `version`, make it current, announce it on the channel; older plans expire."""
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.plan(version), payload)
    pipe.set(keys.plan_version, version)
    if version > 1:
        pipe.expire(keys.plan(version - 1), OLD_PLAN_EXPIRE_S)
    pipe.publish(keys.plan_channel, str(version))
    pipe.execute()


# ---- load ---------------------------------------------------------------------------------

def window_start(now: float | None = None, window_s: int = LOAD_WINDOW_S) -> int:
    """Start (Unix seconds, a multiple of window_s) of the window holding `now`."""
    now = time.time() if now is None else now
    return int(now // window_s) * window_s


def read_load(client: redis.Redis, keys: Keys, window: int, layers: Iterable[int]) -> dict[tuple[int, int], int]:
    """{(layer, expert): tokens} recorded in `window` (pipelined HGETALL per layer)."""
    layers = list(layers)
    pipe = client.pipeline(transaction=False)
    for layer in layers:
        pipe.hgetall(keys.load(window, layer))
    out: dict[tuple[int, int], int] = {}
    for layer, counts in zip(layers, pipe.execute()):
        for expert, tokens in (counts or {}).items():
            out[(layer, int(expert))] = int(tokens)
    return out


class LoadRecorder:
    """Counts tokens per (layer, expert) in memory; a `RedisPoller` flushes them every second.

    `add` is a dict update under a lock: no I/O on the caller's path. A failed flush keeps the
    counts and retries; counts older than the key expiry are dropped (moe_load_tokens_dropped_total).
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, window_s: int = LOAD_WINDOW_S,
                 expire_s: int = LOAD_EXPIRE_S, flush_interval_s: float = 1.0) -> None:
        self.client = client
        self.keys = keys
        self.window_s = window_s
        self.expire_s = expire_s
        self._pending: dict[tuple[int, int, int], int] = {}  # (window, layer, expert) -> tokens
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.poller = RedisPoller("load-recorder", self.flush, interval_s=flush_interval_s,
                                  while_down="keeping the counts to flush later")

    def add(self, layer: int, counts: Mapping[int, int] | Iterable[int], now: float | None = None) -> None:
        """Add tokens for `layer`: {expert: tokens}, or per-expert counts indexed by expert id."""
        window = window_start(now, self.window_s)
        items = counts.items() if isinstance(counts, Mapping) else enumerate(counts)
        with self._lock:
            for expert, tokens in items:
                tokens = int(tokens)
                if tokens:
                    key = (window, int(layer), int(expert))
                    self._pending[key] = self._pending.get(key, 0) + tokens

    def pending_tokens(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def flush(self, now: float | None = None) -> bool:
        """Write pending counts (one pipeline); True on success or nothing to do."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return True
            with self.poller.attempt():
                try:
                    pipe = self.client.pipeline(transaction=False)
                    touched = set()
                    for (window, layer, expert), tokens in batch.items():
                        key = self.keys.load(window, layer)
                        pipe.hincrby(key, str(expert), tokens)
                        touched.add(key)
                    for key in touched:
                        pipe.expire(key, self.expire_s)
                    pipe.execute()
                except redis.RedisError:
                    LOAD_FLUSH_FAILURES.inc()
                    self._requeue(batch, now)
                    raise
            return not self.poller.outage

    def _requeue(self, batch: dict[tuple[int, int, int], int], now: float | None) -> None:
        oldest = window_start(now, self.window_s) - self.expire_s
        dropped = 0
        with self._lock:
            for key, tokens in batch.items():
                if key[0] < oldest:
                    dropped += tokens
                else:
                    self._pending[key] = self._pending.get(key, 0) + tokens
        if dropped:
            LOAD_DROPPED.inc(dropped)

    def start(self) -> "LoadRecorder":
        self.poller.start()
        return self

    def stop(self, flush: bool = True) -> None:
        self.poller.close()
        if flush:
            self.flush()
