"""`python -m services.autoscaler`: replicas per expert shard from the load the shards report.

Every --interval seconds: read the live expert replicas (registry) and the per-(layer, expert)
token counts of the last complete 10 s load windows from Redis, sum them per shard, let
policy.Policy decide, and tell the actuator (Kubernetes Deployment scale, or local processes).

Targets (MOE_AUTOSCALER_TARGETS or --targets; JSON, or @path to a JSON file):

    [{"shard": "shard-0", "deployment": "moe-expert-shard-0", "experts": "0-7",
      "minReplicas": 1, "maxReplicas": 4}]

`shard` is the name replicas register with (--shard / MOE_SHARD_NAME); `deployment` the
Deployment the Kubernetes actuator scales; `experts` the shard's logical ids ("0-7", "0,2,5",
"0-3,8-11" or a JSON list). Unknown keys fail at start. See docs/autoscaling.md.

Redis down: the last decision stands (nothing is changed), logged once, retried each interval.
SIGTERM/SIGINT: stop the loop; the local actuator stops every replica it started; exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence

import redis
from prometheus_client import Counter, Gauge

from services.autoscaler.actuators import KubernetesActuator, LocalActuator
from services.autoscaler.policy import (
    DEFAULT_STABILISATION_S,
    Decision,
    Observation,
    Policy,
    ShardSpec,
    parse_targets,
    shard_loads,
)
from services.common import redis_store, settings
from services.common.logging import configure_logging, event, get_logger
from services.common.redis_poller import RedisPoller
from services.common.redis_store import LOAD_WINDOW_S, SERVING, Keys, ReplicaRecord, window_start
from services.common.server import start_metrics_server

log = get_logger("autoscaler")

DEFAULT_TARGET_TOKENS = 2000.0
DEFAULT_INTERVAL_S = 15.0
DEFAULT_WINDOWS = 2
FLUSH_LAG_S = 2.0   # LoadRecorder flushes every second: a window is complete 2 s after it ends

DESIRED = Gauge("moe_autoscaler_desired_replicas", "Replicas the policy wants per shard", ["shard"])
CURRENT = Gauge("moe_autoscaler_current_replicas", "Replicas the actuator reports per shard "
                "(Deployment spec.replicas, or local processes)", ["shard"])
LIVE = Gauge("moe_autoscaler_live_replicas", "Serving replicas of the shard in the registry", ["shard"])
TOKENS = Gauge("moe_autoscaler_observed_tokens_per_second",
               "Token-expert assignments per second served by the shard (all layers)", ["shard"])
REDIS_ERRORS = Counter("moe_autoscaler_redis_errors_total", "Intervals skipped because Redis was unreachable")


class Actuator(Protocol):
    def current(self, spec: ShardSpec, live: Sequence[ReplicaRecord] = ()) -> int | None: ...
    def scale(self, spec: ShardSpec, replicas: int, live: Sequence[ReplicaRecord] = ()) -> bool: ...
    def close(self) -> None: ...


def read_shard_load(client: redis.Redis, keys: Keys, specs: Sequence[ShardSpec], now: float,
                    windows: int = DEFAULT_WINDOWS, replicas: dict[str, int] | None = None):
    """{shard: (tokens/s, hottest)} over the last `windows` complete load windows."""
    last = window_start(now - FLUSH_LAG_S - LOAD_WINDOW_S)
    counts: dict[tuple[int, int], int] = {}
    for window in range(last - (windows - 1) * LOAD_WINDOW_S, last + 1, LOAD_WINDOW_S):
        prefix = keys.load(window, "")
        layers = sorted(int(name[len(prefix):]) for name in client.scan_iter(match=keys.load_pattern(window), count=500)
                        if name[len(prefix):].isdigit())
        for key, tokens in redis_store.read_load(client, keys, window, layers).items():
            counts[key] = counts.get(key, 0) + tokens
    return shard_loads(counts, specs, windows * LOAD_WINDOW_S, replicas)


class Autoscaler:
    """The loop: one `tick` per interval; `run` until `stop`."""

    def __init__(self, client: redis.Redis, keys: Keys, specs: Sequence[ShardSpec], policy: Policy,
                 actuator: Actuator, *, interval_s: float = DEFAULT_INTERVAL_S, windows: int = DEFAULT_WINDOWS,
                 dry_run: bool = False) -> None:
        self.client = client
        self.keys = keys
        self.specs = list(specs)
        self.policy = policy
        self.actuator = actuator
        self.interval_s = interval_s
        self.windows = windows
        self.dry_run = dry_run
        self.decisions: dict[str, Decision] = {}
        self._logged: dict[str, tuple[int, int]] = {}
        self.poller = RedisPoller("autoscaler", self.tick, interval_s=interval_s,
                                  while_down="keeping the last decision")
        self._stop = threading.Event()

    def tick(self, now: float | None = None) -> dict[str, Decision]:
        """One round; returns this round's decisions (empty when Redis was unreachable)."""
        now = time.time() if now is None else now
        with self.poller.attempt():
            records = [r for r in redis_store.list_replicas(self.client, self.keys, "expert") if r.state == SERVING]
            by_shard = {s.name: [r for r in records if r.shard == s.name] for s in self.specs}
            loads = read_shard_load(self.client, self.keys, self.specs, now, self.windows,
                                    {name: len(rs) for name, rs in by_shard.items()})
        if self.poller.outage:
            REDIS_ERRORS.inc()
            return {}

        out = {}
        for spec in self.specs:
            live = by_shard[spec.name]
            rate, hottest = loads[spec.name]
            LIVE.labels(shard=spec.name).set(len(live))
            TOKENS.labels(shard=spec.name).set(rate)
            current = self.actuator.current(spec, live)
            if current is None:
                continue  # the actuator logged why; retry next interval
            CURRENT.labels(shard=spec.name).set(current)
            decision = self.policy.decide(spec, Observation(current, len(live), rate, hottest), now)
            DESIRED.labels(shard=spec.name).set(decision.desired)
            self.decisions[spec.name] = out[spec.name] = decision
            if decision.changes:
                self._act(spec, decision, live)
            else:
                self._logged.pop(spec.name, None)
        return out

    def _act(self, spec: ShardSpec, decision: Decision, live: Sequence[ReplicaRecord]) -> None:
        pair = (decision.current, decision.desired)
        if self._logged.get(spec.name) != pair:
            self._logged[spec.name] = pair
            event(log, "would scale (dry run)" if self.dry_run else "scaling", shard=spec.name,
                  deployment=spec.deployment or None, replicas_from=decision.current,
                  replicas_to=decision.desired, reason=decision.reason)
        if not self.dry_run and self.actuator.scale(spec, decision.desired, live):
            self._logged.pop(spec.name, None)

    def run(self) -> None:
        """Tick now and every interval on the poller's thread, until `stop`."""
        event(log, "autoscaler running", shards=",".join(s.name for s in self.specs), interval_s=self.interval_s,
              target_tokens_per_replica=self.policy.target, stabilisation_s=self.policy.stabilisation_s,
              dry_run=self.dry_run or None)
        self.poller.start(immediately=True)
        self._stop.wait()
        self.poller.close()

    def stop(self) -> None:
        self._stop.set()


# ---- command line ---------------------------------------------------------------------------

def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    env = settings.env
    parser = argparse.ArgumentParser(prog="python -m services.autoscaler", description=__doc__.splitlines()[0])
    common = parser.add_argument_group("common (flag overrides env)")
    common.add_argument("--cluster", default=env("MOE_CLUSTER", "moe"), help="Redis key prefix [MOE_CLUSTER, moe]")
    common.add_argument("--redis-url", default=env("MOE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="Redis URL; MOE_REDIS_PASSWORD overrides its password [MOE_REDIS_URL]")
    common.add_argument("--host", default=env("MOE_HOST", "0.0.0.0"), help="metrics bind address [MOE_HOST, 0.0.0.0]")
    common.add_argument("--metrics-port", type=int, default=env("MOE_METRICS_PORT", str(settings.DEFAULT_METRICS_PORT)),
                        help=f"Prometheus /metrics port, 0 disables [MOE_METRICS_PORT, {settings.DEFAULT_METRICS_PORT}]")
    common.add_argument("--log-level", choices=settings.LOG_LEVELS, type=str.lower,
                        default=env("MOE_LOG_LEVEL", "info"), help="[MOE_LOG_LEVEL, info]")

    scale = parser.add_argument_group("autoscaling")
    scale.add_argument("--actuator", choices=("kubernetes", "local"), default=env("MOE_AUTOSCALER_ACTUATOR", "kubernetes"),
                       help="who changes replicas [MOE_AUTOSCALER_ACTUATOR, kubernetes]")
    scale.add_argument("--targets", default=env("MOE_AUTOSCALER_TARGETS"),
                       help="shards to scale: JSON list, or @path to a JSON file [MOE_AUTOSCALER_TARGETS]")
    scale.add_argument("--target-tokens-per-replica", type=_positive,
                       default=env("MOE_AUTOSCALER_TARGET_TOKENS", str(DEFAULT_TARGET_TOKENS)),
                       help="token-expert assignments per second one replica should serve "
                            f"[MOE_AUTOSCALER_TARGET_TOKENS, {DEFAULT_TARGET_TOKENS:.0f}]")
    scale.add_argument("--interval", type=_positive, default=env("MOE_AUTOSCALER_INTERVAL", str(DEFAULT_INTERVAL_S)),
                       help=f"seconds between decisions [MOE_AUTOSCALER_INTERVAL, {DEFAULT_INTERVAL_S:.0f}]")
    scale.add_argument("--stabilisation", type=_non_negative,
                       default=env("MOE_AUTOSCALER_STABILISATION", str(DEFAULT_STABILISATION_S)),
                       help="seconds load must stay low before a step down "
                            f"[MOE_AUTOSCALER_STABILISATION, {DEFAULT_STABILISATION_S:.0f}]")
    scale.add_argument("--windows", type=int, default=env("MOE_AUTOSCALER_WINDOWS", str(DEFAULT_WINDOWS)),
                       help=f"complete {LOAD_WINDOW_S} s load windows averaged [MOE_AUTOSCALER_WINDOWS, {DEFAULT_WINDOWS}]")
    scale.add_argument("--dry-run", action="store_true",
                       default=env("MOE_AUTOSCALER_DRY_RUN", "false").lower() in ("1", "true", "yes"),
                       help="log decisions, change nothing [MOE_AUTOSCALER_DRY_RUN, false]")

    kube = parser.add_argument_group("kubernetes actuator")
    kube.add_argument("--namespace", default=env("MOE_NAMESPACE"),
                      help="namespace of the Deployments [MOE_NAMESPACE, the pod's namespace]")
    kube.add_argument("--kube-api", default=env("MOE_KUBE_API"),
                      help="API server URL instead of the in-cluster one, e.g. http://127.0.0.1:8001 "
                           "behind `kubectl proxy` [MOE_KUBE_API]")

    local = parser.add_argument_group("local actuator")
    local.add_argument("--model", default=env("MOE_MODEL_DIR"), help="checkpoint the replicas load [MOE_MODEL_DIR]")
    local.add_argument("--run-dir", default=env("MOE_RUN_DIR"),
                       help="replica logs go here [MOE_RUN_DIR, ./run/autoscaler]")
    local.add_argument("--replica-args", default=env("MOE_AUTOSCALER_REPLICA_ARGS", ""),
                       help="extra flags for each replica, e.g. '--device cuda' [MOE_AUTOSCALER_REPLICA_ARGS]")
    return parser


def load_targets_text(value: str | None) -> str:
    if not value:
        raise ValueError("no targets: set MOE_AUTOSCALER_TARGETS or --targets (JSON, or @path)")
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text()
        except OSError as err:
            raise ValueError(f"cannot read targets file {value[1:]}: {err}") from None
    return value


def build_actuator(args: argparse.Namespace, specs: Sequence[ShardSpec]) -> Actuator:
    if args.actuator == "kubernetes":
        missing = [s.name for s in specs if not s.deployment]
        if missing:
            raise ValueError(f"the kubernetes actuator needs 'deployment' for shards {missing}")
        return KubernetesActuator.from_environment(args.namespace, args.kube_api)
    if not args.model:
        raise ValueError("the local actuator needs --model / MOE_MODEL_DIR")
    return LocalActuator(model=args.model, redis_url=args.redis_url, cluster=args.cluster,
                         run_dir=Path(args.run_dir or "run/autoscaler"), extra_args=args.replica_args.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("autoscaler", args.log_level)
    try:
        specs = parse_targets(load_targets_text(args.targets))
        if args.windows < 1:
            raise ValueError("--windows must be >= 1")
        keys = Keys(args.cluster)
        actuator = build_actuator(args, specs)
    except ValueError as err:
        print(f"autoscaler: {err}", file=sys.stderr)
        return 2
    client = redis_store.connect(args.redis_url, settings.redis_password())
    policy = Policy(args.target_tokens_per_replica, stabilisation_s=args.stabilisation, down_interval_s=args.interval)
    scaler = Autoscaler(client, keys, specs, policy, actuator, interval_s=args.interval, windows=args.windows,
                        dry_run=args.dry_run)

    def handler(signum: int, _frame: object) -> None:
        event(log, "signal received, stopping", signal=signal.Signals(signum).name)
        scaler.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if args.metrics_port:
        start_metrics_server(args.metrics_port, args.host)
    try:
        scaler.run()
    finally:
        actuator.close()
        event(log, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
