"""Replica decisions per expert shard: pure functions and a small memory, no I/O.

Units. Load is counted in *token-expert assignments*: one token routed to two of a shard's
experts on each of three MoE layers adds 6. `tokens_per_s` of a shard is the sum over its
experts and every layer, divided by the seconds observed; `target_tokens_per_replica` is the
rate one replica should serve comfortably (set it below the measured saturation rate, as one sets
an HPA CPU target at 70 %: a saturated shard reports what it served, not what was asked of it).

Rules, per shard, on every `decide` call:
  recommendation = clamp(ceil(tokens_per_s / target), min, max)
  up:    recommendation > current            -> scale to it now
  down:  max(recommendations over the last `stabilisation_s`) < current, the shard has been
         observed for a full window and no step down happened within `down_interval_s`
                                              -> current - 1 (never more than one at a time)
  dead:  no live replica and min >= 1          -> at least min; its load reads zero only because
         nothing serves it, so that zero is neither recorded nor acted on.
  always within [min, max], and never below 1 when min >= 1.
Like the Kubernetes HPA's scale-down stabilisation window with a policy of one pod per period.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from services.common.expert_ids import parse_expert_ids

DEFAULT_STABILISATION_S = 60.0
DEFAULT_DOWN_INTERVAL_S = 15.0
HOT_EXPERTS = 3


@dataclass(frozen=True)
class ShardSpec:
    """One autoscaled shard, from the targets config."""

    name: str                   # shard name, as the replicas register it (--shard)
    experts: tuple[int, ...]    # logical expert ids, every MoE layer
    min_replicas: int = 1
    max_replicas: int = 1
    deployment: str = ""        # Kubernetes Deployment serving it (KubernetesActuator)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("shard name must not be empty")
        if not self.experts:
            raise ValueError(f"shard {self.name}: no experts")
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"shard {self.name}: need 0 <= minReplicas <= maxReplicas and maxReplicas >= 1 "
                             f"(got {self.min_replicas}, {self.max_replicas})")


@dataclass(frozen=True)
class Observation:
    """What the loop saw for one shard this interval."""

    current: int                          # replicas asked of the actuator (Deployment spec.replicas)
    live: int                             # serving replicas in the registry
    tokens_per_s: float                   # token-expert assignments per second, all layers
    hottest: tuple[tuple[int, float], ...] = ()  # (expert, tokens/s), hottest first


@dataclass(frozen=True)
class Decision:
    shard: str
    current: int
    desired: int
    reason: str

    @property
    def changes(self) -> bool:
        return self.desired != self.current


@dataclass
class _Memory:
    since: float | None = None                       # first observation of the current streak
    history: deque = field(default_factory=deque)    # (time, recommendation) within the window
    last_down: float = -math.inf


def clamp(value: int, spec: ShardSpec) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, value))


def recommendation(tokens_per_s: float, target_tokens_per_replica: float, spec: ShardSpec) -> int:
    """clamp(ceil(load / target), min, max); a tiny epsilon keeps 4000/2000 at 2, not 3."""
    raw = math.ceil(max(0.0, tokens_per_s) / target_tokens_per_replica - 1e-9)
    return clamp(raw, spec)


def format_hot(hottest: Iterable[tuple[int, float]]) -> str:
    return ",".join(f"{e}:{t:.0f}/s" for e, t in hottest) or "none"


class Policy:
    """Decides desired replicas per shard; remembers recommendations and step-down times."""

    def __init__(self, target_tokens_per_replica: float, *,
                 stabilisation_s: float = DEFAULT_STABILISATION_S,
                 down_interval_s: float = DEFAULT_DOWN_INTERVAL_S) -> None:
        if target_tokens_per_replica <= 0:
            raise ValueError("target tokens/s per replica must be > 0")
        if stabilisation_s < 0 or down_interval_s < 0:
            raise ValueError("stabilisation and down interval must be >= 0")
        self.target = float(target_tokens_per_replica)
        self.stabilisation_s = float(stabilisation_s)
        self.down_interval_s = float(down_interval_s)
        self._memory: dict[str, _Memory] = {}

    def decide(self, spec: ShardSpec, obs: Observation, now: float) -> Decision:
        mem = self._memory.setdefault(spec.name, _Memory())
        current = max(0, obs.current)
        load = f"load={obs.tokens_per_s:.0f}/s target={self.target:.0f}/s/replica hot={format_hot(obs.hottest)}"

        def decision(desired: int, why: str) -> Decision:
            return Decision(spec.name, current, desired, f"{why} ({load} live={obs.live})")

        if obs.live == 0 and spec.min_replicas >= 1:
            # Nothing serves the shard: its zero load says nothing about demand. Forget the streak
            # so a full stabilisation window must pass after recovery before any step down.
            mem.since, mem.history = None, deque()
            desired = max(clamp(current, spec), spec.min_replicas)
            why = "no live replica, restoring to at least min" if desired != current else "no live replica, waiting for replicas to start"
            return decision(desired, why)

        rec = recommendation(obs.tokens_per_s, self.target, spec)
        if mem.since is None:
            mem.since = now
        mem.history.append((now, rec))
        while mem.history and mem.history[0][0] < now - self.stabilisation_s:
            mem.history.popleft()

        if current < spec.min_replicas or current > spec.max_replicas:
            return decision(clamp(current, spec), f"outside [min={spec.min_replicas}, max={spec.max_replicas}]")
        if rec > current:
            return decision(rec, "load above target, scaling up")
        stabilised = max(r for _, r in mem.history)
        if stabilised >= current:
            return decision(current, "steady")
        if now - mem.since < self.stabilisation_s:
            return decision(current, f"load low, observed {now - mem.since:.0f}s of {self.stabilisation_s:.0f}s")
        if now - mem.last_down < self.down_interval_s:
            return decision(current, "load low, waiting between steps down")
        mem.last_down = now
        return decision(max(current - 1, stabilised), f"load low for {self.stabilisation_s:.0f}s, one step down")

    def forget(self, shard: str) -> None:
        self._memory.pop(shard, None)


# ---- load aggregation (pure: the loop reads the counts from Redis) -----------------------

def shard_loads(counts: Mapping[tuple[int, int], int], specs: Sequence[ShardSpec], seconds: float,
                replicas: Mapping[str, int] | None = None, hot: int = HOT_EXPERTS,
                ) -> dict[str, tuple[float, tuple[tuple[int, float], ...]]]:
    """{shard: (tokens/s, hottest experts)} from {(layer, expert): tokens} over `seconds`.

    An expert listed by several shards (redundant copies) has its tokens split between them in
    proportion to their replicas (evenly when none has any): the load keys count per expert, not
    per replica, so that is the best split the data allows."""
    per_expert: dict[int, int] = {}
    for (_layer, expert), tokens in counts.items():
        per_expert[expert] = per_expert.get(expert, 0) + int(tokens)
    owners: dict[int, list[ShardSpec]] = {}
    for spec in specs:
        for expert in spec.experts:
            owners.setdefault(expert, []).append(spec)
    replicas = replicas or {}
    out: dict[str, tuple[float, tuple[tuple[int, float], ...]]] = {}
    for spec in specs:
        shares: list[tuple[int, float]] = []
        for expert in spec.experts:
            tokens = per_expert.get(expert, 0)
            holders = owners[expert]
            weights = [max(0, replicas.get(s.name, 0)) for s in holders]
            total = sum(weights)
            share = (weights[holders.index(spec)] / total) if total else 1.0 / len(holders)
            shares.append((expert, tokens * share / seconds))
        rate = sum(t for _, t in shares)
        hottest = tuple(sorted(((e, t) for e, t in shares if t > 0), key=lambda x: (-x[1], x[0]))[:hot])
        out[spec.name] = (rate, hottest)
    return out


# ---- targets config ------------------------------------------------------------------------

TARGET_KEYS = {"shard", "deployment", "experts", "minReplicas", "maxReplicas"}


def parse_targets(text: str) -> list[ShardSpec]:
    """The targets JSON (MOE_AUTOSCALER_TARGETS / --targets) -> shard specs; ValueError says why.

        [{"shard": "shard-0", "deployment": "moe-expert-shard-0", "experts": "0-7",
          "minReplicas": 1, "maxReplicas": 4}, ...]

    `experts` is the --experts syntax ("0-7", "0,2,5", "0-3,8-11") or a JSON list of ids;
    `deployment` is needed by the Kubernetes actuator only; minReplicas defaults to 1 and
    maxReplicas to minReplicas (or 1). Unknown keys fail, so a typo in the chart fails at start."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"targets are not valid JSON: {err}") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError("targets must be a non-empty JSON list of objects")
    specs: list[ShardSpec] = []
    for i, item in enumerate(raw):
        where = f"targets[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} is not an object")
        unknown = sorted(set(item) - TARGET_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(TARGET_KEYS)})")
        if not isinstance(item.get("shard"), str) or not item["shard"]:
            raise ValueError(f"{where}: 'shard' (a non-empty string) is required")
        where = f"{where} ({item['shard']})"
        experts = item.get("experts")
        if isinstance(experts, list):
            if not experts or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in experts):
                raise ValueError(f"{where}: 'experts' list must hold ids >= 0")
            expert_ids = tuple(sorted(set(experts)))
        elif isinstance(experts, str):
            try:
                expert_ids = tuple(parse_expert_ids(experts))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        else:
            raise ValueError(f"{where}: 'experts' (\"0-7\" or a list of ids) is required")
        counts = {}
        for key, default in (("minReplicas", 1), ("maxReplicas", None)):
            value = item.get(key, default)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{where}: '{key}' must be an integer")
            counts[key] = value
        minimum = counts["minReplicas"]
        maximum = counts["maxReplicas"] if counts["maxReplicas"] is not None else max(1, minimum)
        deployment = item.get("deployment", "")
        if not isinstance(deployment, str):
            raise ValueError(f"{where}: 'deployment' must be a string")
        try:
            specs.append(ShardSpec(item["shard"], expert_ids, minimum, maximum, deployment))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"targets name shards more than once: {duplicates}")
    return specs
