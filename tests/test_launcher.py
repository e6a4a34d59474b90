"""`moe up --detach` / `moe status` / `moe down` on real processes, and a start that fails cleanly."""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
import shutil
import subprocess
import sys

import pytest

from services.client import Client
from services.launcher.cluster import LocalCluster, expert_plane, split_experts, visible_gpus
from services.launcher.processes import cluster_pids, pid_alive

pytestmark = pytest.mark.cluster

MOE = [sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())"]


def moe(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*MOE, *args], capture_output=True, text=True, timeout=timeout)


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
    model_dir, _ = v3_checkpoint
    run_dir = tmp_path / "run"
    cluster = f"t-{secrets.token_hex(4)}"
    up = moe("up", "--model", str(model_dir), "--shards", "2", "--replicas", "1", "--attention-workers", "1",
             "--port", "0", "--run-dir", str(run_dir), "--cluster", cluster, "--detach", "--timeout", "180")
    state_path = run_dir / "cluster.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    try:
        assert up.returncode == 0, up.stderr
        assert "expert shard-0-3 replica 1/1 serving" in up.stderr
        assert up.stdout.strip() == state["gateway_endpoint"]
        pids = {name: p["pid"] for name, p in state["processes"].items()}
        assert set(pids) == {"redis", "router", "shard-0-3.r0", "shard-4-7.r0", "attention-0", "gateway"}
        assert all(pid_alive(pid) for pid in pids.values())

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


def test_process_failing_to_start_is_named_and_nothing_is_left(v3_checkpoint, tmp_path):
    model_dir, _ = v3_checkpoint
    broken = tmp_path / "config-only"  # the router starts (config only); shards and workers cannot load weights
    broken.mkdir()
    shutil.copy(model_dir / "config.json", broken / "config.json")
    cluster = f"t-{secrets.token_hex(4)}"
    up = moe("up", "--model", str(broken), "--shards", "2", "--replicas", "1", "--attention-workers", "1",
             "--port", "0", "--run-dir", str(tmp_path / "run"), "--cluster", cluster, "--detach", "--timeout", "120")
    assert up.returncode == 2, up.stderr
    line = next(l for l in up.stderr.splitlines() if l.startswith("moe up: cluster did not start"))
    assert re.search(r"(expert shard-\d-\d replica 1/1|attention worker 1/1) \(\S+\) exited with status", line)
    assert "last lines of" in line
    started = [int(p) for p in re.findall(r"\(pid (\d+)\)", up.stderr)]
    assert started and not [p for p in started if pid_alive(p)]       # Redis, router: stopped
    assert cluster_pids(cluster) == []                                   # no service left at all
    assert not (tmp_path / "run" / "cluster.json").exists()
