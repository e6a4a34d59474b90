"""Autoscaler: the pure policy, load aggregation from a real Redis, the Kubernetes actuator against
a stand-in API server (plain HTTP in a thread: no real API server exists here), and the local
actuator starting and stopping a real `python -m services.expert`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.autoscaler.__main__ import FLUSH_LAG_S, Autoscaler, read_shard_load
from services.autoscaler.actuators import ACTUATION_ERRORS, KubernetesActuator, LocalActuator
from services.autoscaler.policy import (
    Observation,
    Policy,
    ShardSpec,
    parse_targets,
    shard_loads,
)
from services.common.expert_ids import format_id_list
from services.common.expert_ids import parse_expert_ids
from services.common.ports import free_port
from services.common.redis_store import LOAD_WINDOW_S, Keys, LoadRecorder, ReplicaRecord, connect, list_replicas
from support import ROOT, stop_process, wait_until

SHARD = ShardSpec("shard-0", (0, 1, 2, 3), min_replicas=1, max_replicas=5, deployment="moe-expert-shard-0")


def obs(current: int, tokens: float, live: int | None = None) -> Observation:
    return Observation(current=current, live=current if live is None else live, tokens_per_s=tokens)


# ---- policy ------------------------------------------------------------------------------

def test_load_above_target_scales_up_at_once_to_the_ceiling():
    policy = Policy(1000, stabilisation_s=60)
    d = policy.decide(SHARD, obs(1, 3100), now=0.0)
    assert (d.current, d.desired) == (1, 4) and d.changes
    assert "scaling up" in d.reason
    assert policy.decide(SHARD, obs(2, 2000), now=1.0).desired == 2  # exactly at target: no extra replica


def test_scale_down_waits_for_stabilisation_then_steps_one_replica_per_interval():
    policy = Policy(1000, stabilisation_s=60, down_interval_s=15)
    assert policy.decide(SHARD, obs(4, 3500), now=0).desired == 4
    # load collapses: nothing happens inside the stabilisation window
    for t in range(5, 60, 5):
        assert policy.decide(SHARD, obs(4, 100), now=t).desired == 4, t
    # the window still holds the 3500 sample at t=60 (it is exactly 60 s old); at 61 it has left
    assert policy.decide(SHARD, obs(4, 100), now=60).desired == 4
    d = policy.decide(SHARD, obs(4, 100), now=61)
    assert d.desired == 3 and "one step down" in d.reason
    # one step per down interval, never straight to the recommendation (1)
    assert policy.decide(SHARD, obs(3, 100), now=70).desired == 3
    assert policy.decide(SHARD, obs(3, 100), now=76).desired == 2
    assert policy.decide(SHARD, obs(2, 100), now=91).desired == 1
    assert policy.decide(SHARD, obs(1, 0), now=200).desired == 1  # never below min


def test_a_spike_inside_the_window_holds_replicas():
    policy = Policy(1000, stabilisation_s=60, down_interval_s=0)
    policy.decide(SHARD, obs(3, 500), now=0)
    policy.decide(SHARD, obs(3, 2900), now=50)          # recommends 3: the current size
    assert policy.decide(SHARD, obs(3, 500), now=100).desired == 3   # 2900 still within 60 s
    assert policy.decide(SHARD, obs(3, 500), now=111).desired == 2


def test_policy_starts_without_history_and_does_not_scale_down_at_once():
    policy = Policy(1000, stabilisation_s=60)
    assert policy.decide(SHARD, obs(5, 0), now=1000).desired == 5
    assert policy.decide(SHARD, obs(5, 0), now=1059).desired == 5
    assert policy.decide(SHARD, obs(5, 0), now=1060).desired == 4


def test_replicas_stay_within_min_and_max():
    spec = ShardSpec("s", (0,), min_replicas=2, max_replicas=3)
    policy = Policy(100, stabilisation_s=0, down_interval_s=0)
    assert policy.decide(spec, obs(2, 10_000), now=0).desired == 3
    assert policy.decide(spec, obs(1, 0), now=1).desired == 2       # below min: raised at once
    assert policy.decide(spec, obs(7, 10_000), now=2).desired == 3  # above max: lowered at once
    assert policy.decide(spec, obs(2, 0), now=3).desired == 2
    zero = ShardSpec("z", (0,), min_replicas=0, max_replicas=2)
    assert Policy(100, stabilisation_s=0).decide(zero, obs(1, 0), now=0).desired == 0
    with pytest.raises(ValueError):
        ShardSpec("bad", (0,), min_replicas=3, max_replicas=2)


def test_dead_shard_is_restored_to_min_and_its_zero_load_is_not_a_reason_to_shrink():
    spec = ShardSpec("s", (0, 1), min_replicas=2, max_replicas=6)
    policy = Policy(1000, stabilisation_s=30, down_interval_s=0)
    d = policy.decide(spec, Observation(current=0, live=0, tokens_per_s=0), now=0)
    assert d.desired == 2 and "no live replica" in d.reason
    # replicas asked for but not yet live: keep them, however long the zero load lasts
    for t in (10, 100, 1000):
        assert policy.decide(spec, Observation(current=4, live=0, tokens_per_s=0), now=t).desired == 4
    # back to life at low load: a full stabilisation window must pass before stepping down
    assert policy.decide(spec, obs(4, 0), now=1001).desired == 4
    assert policy.decide(spec, obs(4, 0), now=1030).desired == 4
    assert policy.decide(spec, obs(4, 0), now=1031).desired == 3


def test_reason_names_the_hottest_experts():
    policy = Policy(1000)
    d = policy.decide(SHARD, Observation(1, 1, 2600, hottest=((3, 2000.0), (1, 600.0))), now=0)
    assert "hot=3:2000/s,1:600/s" in d.reason and "load=2600/s" in d.reason


def test_shard_loads_sum_layers_rank_hot_experts_and_split_shared_experts():
    a = ShardSpec("a", (0, 1, 2))
    b = ShardSpec("b", (2, 3))
    counts = {(1, 0): 100, (2, 0): 100, (1, 1): 50, (1, 2): 300, (2, 3): 40, (1, 9): 999}
    loads = shard_loads(counts, [a, b], seconds=10, replicas={"a": 3, "b": 1})
    rate_a, hot_a = loads["a"]
    rate_b, hot_b = loads["b"]
    # expert 2 (300 tokens) is held by both: 3/4 to a, 1/4 to b; expert 9 belongs to nobody
    assert rate_a == pytest.approx((200 + 50 + 225) / 10)
    assert rate_b == pytest.approx((75 + 40) / 10)
    assert hot_a == ((2, 22.5), (0, 20.0), (1, 5.0))
    assert hot_b[0] == (2, 7.5)
    even = shard_loads({(1, 2): 100}, [a, b], seconds=10)
    assert even["a"][0] == even["b"][0] == pytest.approx(5.0)


def test_targets_json_is_parsed_and_validated():
    specs = parse_targets(json.dumps([
        {"shard": "shard-0", "deployment": "moe-expert-shard-0", "experts": "0-3,8", "minReplicas": 1, "maxReplicas": 4},
        {"shard": "shard-1", "experts": [9, 4]},
    ]))
    assert specs[0] == ShardSpec("shard-0", (0, 1, 2, 3, 8), 1, 4, "moe-expert-shard-0")
    assert specs[1] == ShardSpec("shard-1", (4, 9), 1, 1, "")
    assert tuple(parse_expert_ids("0-3,8-9")) == (0, 1, 2, 3, 8, 9) and format_id_list((0, 1, 2, 3, 8, 9)) == "0-3,8-9"
    bad = {
        "not json": "[{",
        "empty": "[]",
        "typo": '[{"shard": "s", "experts": "0", "maxReplica": 2}]',
        "no shard": '[{"experts": "0"}]',
        "bad experts": '[{"shard": "s", "experts": "0-x"}]',
        "min > max": '[{"shard": "s", "experts": "0", "minReplicas": 3, "maxReplicas": 2}]',
        "duplicate": '[{"shard": "s", "experts": "0"}, {"shard": "s", "experts": "1"}]',
        "string count": '[{"shard": "s", "experts": "0", "maxReplicas": "4"}]',
    }
    for name, text in bad.items():
        with pytest.raises(ValueError):
            parse_targets(text)
        assert name


# ---- Redis: load aggregation and one loop round -------------------------------------------

def last_complete_window(now: float) -> float:
    """A timestamp inside the newest window the autoscaler treats as complete at `now`."""
    return now - FLUSH_LAG_S - LOAD_WINDOW_S


def test_load_written_by_load_recorder_is_summed_per_shard_over_complete_windows(redis_server):
    client = connect(redis_server.url)
    keys = Keys("aggr")
    recorder = LoadRecorder(client, keys)
    now = 1_000_005.0
    complete = last_complete_window(now)
    recorder.add(1, {0: 300, 1: 100}, now=complete)
    recorder.add(2, {0: 200, 5: 700}, now=complete)
    recorder.add(3, {1: 400}, now=complete - LOAD_WINDOW_S)   # the window before: also averaged
    recorder.add(1, {0: 9999}, now=now)                         # current window: incomplete, ignored
    recorder.add(1, {0: 9999}, now=complete - 2 * LOAD_WINDOW_S)  # too old for 2 windows
    assert recorder.flush()
    specs = [ShardSpec("a", (0, 1)), ShardSpec("b", (4, 5))]
    loads = read_shard_load(client, keys, specs, now, windows=2)
    assert loads["a"][0] == pytest.approx((300 + 100 + 200 + 400) / 20)
    assert loads["a"][1] == ((0, 25.0), (1, 25.0))
    assert loads["b"] == (pytest.approx(700 / 20), ((5, 35.0),))
    assert read_shard_load(client, keys, specs, now + 1000, windows=2)["a"][0] == 0


class FakeActuator:
    def __init__(self, replicas: dict[str, int]) -> None:
        self.replicas = dict(replicas)
        self.calls: list[tuple[str, int]] = []

    def current(self, spec, live=()):
        return self.replicas.get(spec.name)

    def scale(self, spec, replicas, live=()):
        self.calls.append((spec.name, replicas))
        self.replicas[spec.name] = replicas
        return True

    def close(self):
        pass


def register(client, keys, shard: str, replica_id: str, experts=(0, 1)) -> None:
    record = ReplicaRecord(kind="expert", id=replica_id, endpoints={"grpc": "127.0.0.1:1"}, experts=list(experts),
                           shard=shard)
    client.set(keys.replica("expert", replica_id), record.to_json(), px=10_000)


def test_one_round_scales_hot_shard_up_restores_dead_shard_and_leaves_idle_shard(redis_server, caplog):
    client = connect(redis_server.url)
    keys = Keys("round")
    hot, idle, dead = ShardSpec("hot", (0, 1), 1, 4), ShardSpec("idle", (2,), 1, 4), ShardSpec("dead", (3,), 2, 4)
    register(client, keys, "hot", "hot-a")
    register(client, keys, "idle", "idle-a", experts=(2,))
    now = 2_000_005.0
    recorder = LoadRecorder(client, keys)
    for back in range(2):
        recorder.add(1, {0: 20_000, 1: 10_000, 2: 5}, now=last_complete_window(now) - back * LOAD_WINDOW_S)
    assert recorder.flush()
    actuator = FakeActuator({"hot": 1, "idle": 1, "dead": 0})
    scaler = Autoscaler(client, keys, [hot, idle, dead], Policy(1000), actuator)
    with caplog.at_level(logging.INFO, logger="moe.autoscaler"):
        decisions = scaler.tick(now)
        scaler.tick(now + 1)
    assert decisions["hot"].desired == 3 and "hot=0:2000/s,1:1000/s" in decisions["hot"].reason
    assert decisions["dead"].desired == 2 and not decisions["idle"].changes
    assert actuator.calls == [("hot", 3), ("dead", 2)]        # second round: nothing changed
    assert sum("scaling" in r.getMessage() for r in caplog.records) == 2


def test_dry_run_logs_once_and_changes_nothing(redis_server, caplog):
    client = connect(redis_server.url)
    keys = Keys("dry")
    actuator = FakeActuator({"dead": 0})
    scaler = Autoscaler(client, keys, [ShardSpec("dead", (3,), 1, 2)], Policy(1000), actuator, dry_run=True)
    with caplog.at_level(logging.INFO, logger="moe.autoscaler"):
        for i in range(3):
            assert scaler.tick(1000.0 + i)["dead"].desired == 1
    assert actuator.calls == []
    assert sum("would scale" in r.getMessage() for r in caplog.records) == 1


def test_redis_down_keeps_the_last_decision_and_logs_once(caplog):
    client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    actuator = FakeActuator({"s": 2})
    scaler = Autoscaler(client, Keys("down"), [ShardSpec("s", (0,), 1, 4)], Policy(1000), actuator)
    with caplog.at_level(logging.INFO, logger="moe.autoscaler"):
        assert scaler.tick() == {} and scaler.tick() == {}
    assert actuator.calls == []
    assert sum("redis unreachable" in r.getMessage() for r in caplog.records) == 1


# ---- Kubernetes actuator against a stand-in API server -------------------------------------

class FakeApiServer:
    """Implements GET/PATCH of /apis/apps/v1/namespaces/<ns>/deployments/<name>/scale, checks the
    request like the API server would (bearer token, merge-patch content type, body shape) and
    answers 403 for `forbidden`, 404 for unknown Deployments."""

    def __init__(self, token: str | None, namespace: str = "ns", deployments: dict[str, int] | None = None) -> None:
        self.token = token
        self.namespace = namespace
        self.deployments = dict(deployments or {})
        self.requests: list[tuple[str, str, str | None, dict | None]] = []
        self.problems: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.requests.append((method, self.path, self.headers.get("Content-Type"), body))
                if outer.token is not None and self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self._reply(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                prefix = f"/apis/apps/v1/namespaces/{outer.namespace}/deployments/"
                if not (self.path.startswith(prefix) and self.path.endswith("/scale")):
                    return self._reply(404, {"kind": "Status", "code": 404})
                name = self.path[len(prefix):-len("/scale")]
                if name == "forbidden":
                    return self._reply(403, {"kind": "Status", "code": 403, "reason": "Forbidden"})
                if name not in outer.deployments:
                    return self._reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                if method == "PATCH":
                    if self.headers.get("Content-Type") != "application/merge-patch+json":
                        outer.problems.append(f"content type {self.headers.get('Content-Type')}")
                        return self._reply(415, {"kind": "Status", "code": 415})
                    replicas = (body or {}).get("spec", {}).get("replicas")
                    if set(body or {}) != {"spec"} or not isinstance(replicas, int) or replicas < 0:
                        outer.problems.append(f"body {body}")
                        return self._reply(422, {"kind": "Status", "code": 422})
                    outer.deployments[name] = replicas
                self._reply(200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                                  "metadata": {"name": name, "namespace": outer.namespace},
                                  "spec": {"replicas": outer.deployments[name]},
                                  "status": {"replicas": outer.deployments[name], "selector": f"app={name}"}})

            def do_GET(self):
                self._handle("GET")

            def do_PATCH(self):
                self._handle("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeApiServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def spec_for(deployment: str) -> ShardSpec:
    return ShardSpec(f"shard-{deployment}", (0,), 1, 4, deployment)


def test_kubernetes_actuator_reads_and_patches_the_scale_subresource(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret-1\n")
    with FakeApiServer("secret-1", deployments={"moe-expert-shard-0": 2}) as api:
        actuator = KubernetesActuator(api.url, "ns", token_path=token)
        assert actuator.current(SHARD) == 2
        assert actuator.scale(SHARD, 3)
        assert api.deployments["moe-expert-shard-0"] == 3 and actuator.current(SHARD) == 3
        path = "/apis/apps/v1/namespaces/ns/deployments/moe-expert-shard-0/scale"
        assert api.requests[0][:2] == ("GET", path)
        assert api.requests[1] == ("PATCH", path, "application/merge-patch+json", {"spec": {"replicas": 3}})
        assert api.problems == []
        # a rotated token is picked up without a restart
        token.write_text("secret-2")
        api.token = "secret-2"
        assert actuator.current(SHARD) == 3


def test_kubernetes_errors_are_logged_once_per_shard_and_kind_and_never_raise(tmp_path, caplog):
    token = tmp_path / "token"
    token.write_text("t")
    with FakeApiServer("t", deployments={"ok": 1}) as api:
        actuator = KubernetesActuator(api.url, "ns", token_path=token)
        forbidden, missing = spec_for("forbidden"), spec_for("missing")
        before = ACTUATION_ERRORS.labels(shard=forbidden.name, kind="http-403")._value.get()
        with caplog.at_level(logging.WARNING, logger="moe.autoscaler"):
            for _ in range(3):
                assert actuator.current(forbidden) is None
                assert actuator.scale(forbidden, 2) is False
                assert actuator.current(missing) is None
        assert ACTUATION_ERRORS.labels(shard=forbidden.name, kind="http-403")._value.get() == before + 6
        messages = [r.getMessage() for r in caplog.records]
        assert messages.count("kubernetes API refused") == 2          # one per shard
        assert actuator.current(spec_for("ok")) == 1
    closed = KubernetesActuator(f"http://127.0.0.1:{free_port()}", "ns", timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="moe.autoscaler"):
        assert closed.current(SHARD) is None and closed.scale(SHARD, 2) is False
    assert [r.getMessage() for r in caplog.records].count("kubernetes API unreachable") == 1


@pytest.mark.slow
def test_autoscaler_process_patches_the_deployment_and_stops_on_sigterm(redis_server, tmp_path):
    """The whole process: real Redis with load, the stand-in API server (as behind kubectl proxy)."""
    client = connect(redis_server.url)
    keys = Keys("proc")
    register(client, keys, "shard-0", "r0", experts=(0, 1, 2, 3))
    recorder = LoadRecorder(client, keys)
    now = time.time()
    for back in range(-1, 4):  # every window the process may read while it starts: 4500 tokens/s
        recorder.add(1, {2: 45_000}, now=now - back * LOAD_WINDOW_S)
    assert recorder.flush()
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"shard": "shard-0", "deployment": "moe-expert-shard-0", "experts": "0-3",
                                    "minReplicas": 1, "maxReplicas": 4}]))
    with FakeApiServer(None, deployments={"moe-expert-shard-0": 1}) as api:
        env = {**os.environ, "MOE_AUTOSCALER_TARGETS": f"@{targets}", "MOE_NAMESPACE": "ns", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.autoscaler", "--kube-api", api.url, "--redis-url", redis_server.url,
             "--cluster", "proc", "--metrics-port", "0", "--interval", "0.3", "--target-tokens-per-replica", "2000"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: api.deployments["moe-expert-shard-0"] == 3, 20, "PATCH to 3 replicas")
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=10)
        finally:
            stop_process(proc)
    assert proc.returncode == 0, output
    assert 'event=scaling shard=shard-0' in output and "replicas_to=3" in output and "hot=2:4500/s" in output
    assert output.count("event=scaling") == 1 and api.problems == []


# ---- local actuator: a real expert replica ---------------------------------------------------

@pytest.mark.slow
def test_local_actuator_starts_a_real_expert_replica_and_stops_it_by_pid(v3_checkpoint, redis_server, tmp_path):
    path, _ = v3_checkpoint
    client = connect(redis_server.url)
    keys = Keys("local")
    spec = ShardSpec("shard-a", (0, 1), 1, 2)
    actuator = LocalActuator(model=str(path), redis_url=redis_server.url, cluster="local", run_dir=tmp_path,
                             grace_s=10)
    try:
        assert actuator.current(spec) == 0
        assert actuator.scale(spec, 1)
        assert actuator.current(spec) == 1
        child = actuator.children["shard-a"][0]
        live = wait_until(lambda: [r for r in list_replicas(client, keys, "expert") if r.shard == "shard-a"], 40,
                          f"replica registered (log: {child.log_path})", interval=0.2)
        assert [(r.id, r.experts, r.pid) for r in live] == [(child.name, [0, 1], child.process.pid)]
        # a replica someone else started counts, but is never stopped by us
        register(client, keys, "shard-a", "launcher-replica", experts=(0, 1))
        live = [r for r in list_replicas(client, keys, "expert") if r.shard == "shard-a"]
        assert actuator.current(spec, live) == 2
        assert actuator.scale(spec, 0, live)
        assert child.process.wait(15) == 0          # SIGTERM: drained and exited cleanly
        wait_until(lambda: not client.exists(keys.replica("expert", child.name)), 5, "deregistered")
        live = [r for r in list_replicas(client, keys, "expert") if r.shard == "shard-a"]
        assert [r.id for r in live] == ["launcher-replica"] and actuator.current(spec, live) == 1
        assert client.exists(keys.replica("expert", "launcher-replica"))
    finally:
        actuator.close()
    assert all(c.process.poll() is not None for kids in actuator.children.values() for c in kids)


def test_local_actuator_close_stops_every_child_and_reaps_crashed_ones(tmp_path):
    sleeper = [sys.executable, "-c", "import sys, time; time.sleep(60)"]
    actuator = LocalActuator(model="unused", redis_url="redis://x", cluster="c", run_dir=tmp_path, command=sleeper,
                             grace_s=5)
    spec = ShardSpec("s", (0,), 0, 3)
    assert actuator.scale(spec, 3) and actuator.current(spec) == 3
    argv = actuator.argv(spec, "rid")
    assert argv[argv.index("--experts") + 1] == "0" and argv[argv.index("--replica-id") + 1] == "rid"
    kids = list(actuator.children["s"])
    kids[0].process.kill()
    kids[0].process.wait()
    assert actuator.current(spec) == 2                 # the crashed one no longer counts
    assert actuator.scale(spec, 3) and actuator.current(spec) == 3
    procs = [c.process for c in actuator.children["s"]]
    actuator.close()
    assert all(p.poll() is not None for p in procs)


def test_local_actuator_kills_a_replica_that_ignores_sigterm_once_the_grace_has_passed(tmp_path):
    stubborn = [sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('SIGTERM', 'ignored', "
                "flush=True); time.sleep(60)"]
    actuator = LocalActuator(model="unused", redis_url="redis://x", cluster="c", run_dir=tmp_path, command=stubborn,
                             grace_s=1.0)
    spec = ShardSpec("s", (0,), 0, 1)
    assert actuator.scale(spec, 1)
    (child,) = actuator.children["s"]
    wait_until(lambda: "SIGTERM ignored" in child.log_path.read_text(), 20, "the replica's handler")
    assert child.log_path.read_text().startswith("---- start ")    # its argv heads the log
    asked = time.monotonic()
    assert actuator.scale(spec, 0) and actuator.current(spec) == 0
    assert child.process.poll() is None                            # still draining, within its grace
    wait_until(lambda: actuator.current(spec) == 0 and child.process.poll() is not None, 20, "SIGKILL after the grace")
    assert child.process.returncode == -signal.SIGKILL and time.monotonic() - asked >= 1.0
    assert actuator.current(spec) == 0 and actuator.children["s"] == []     # reaped
