"""docker-compose.yml (+ the GPU overlay) against the Compose spec, then as docker-compose sees it.

`docker-compose config` (Debian's docker-compose 1.29, no Docker engine needed) substitutes the
variables, resolves anchors and merges the overlay; the assertions run on its output. Where the
binary is missing and we are root, the set-up installs it with apt-get (as CI does); otherwise the
tests fail saying how to get it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "docker-compose.yml"
GPU = REPO / "docker-compose.gpu.yml"
CONTRACTS = REPO / "docs" / "contracts.md"
PORTS = {"router": 50051, "expert-0": 50053, "expert-1": 50053, "attention": 50052, "gateway": 50050}


@pytest.fixture(scope="session")
def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "docker-compose"],
                       check=False, capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is needed: apt-get install -y docker-compose (Debian) or pip install it elsewhere")
    return found


def config(docker_compose, tmp_path, *files: Path, env: dict[str, str] | None = None) -> dict:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    args = [docker_compose, "--project-directory", str(REPO)]
    for f in files:
        args += ["-f", str(f)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    done = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60,
                          env={**clean, "MOE_MODEL_HOST_DIR": str(model), **(env or {})})
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_files_follow_the_compose_spec():
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(BASE), str(GPU)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_topology_is_redis_router_two_shards_attention_gateway(docker_compose, tmp_path):
    services = config(docker_compose, tmp_path, BASE)["services"]
    assert set(services) == {"redis", *PORTS}
    for name, port in PORTS.items():
        svc = services[name]
        assert svc["command"] == ["python", "-m", f"services.{name.split('-')[0]}"]
        assert svc["environment"]["MOE_PORT"] == str(port)
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "services.common.healthcheck", "--port", str(port)]
        assert svc["environment"]["MOE_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["environment"]["MOE_REDIS_PASSWORD"] == services["redis"]["environment"]["REDIS_PASSWORD"]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and svc["user"] == "10001:10001"
        assert svc["tmpfs"] == ["/tmp"]
    shards = {services[s]["environment"]["MOE_EXPERTS"] for s in ("expert-0", "expert-1")}
    assert shards == {"0-3", "4-7"}  # the tiny demo model's 8 experts, split
    # Only the gateway is published, and only on loopback.
    assert [s for s, v in services.items() if v.get("ports")] == ["gateway"]
    assert services["gateway"]["ports"] == ["127.0.0.1:50050:50050/tcp"]


def test_model_directory_is_mounted_read_only_from_the_host_variable(docker_compose, tmp_path):
    services = config(docker_compose, tmp_path, BASE)["services"]
    for name in ("router", "expert-0", "expert-1", "attention"):
        (mount,) = services[name]["volumes"]
        assert (mount["source"], mount["target"], mount["read_only"]) == (str(tmp_path / "model"), "/models/model", True)
        assert services[name]["environment"]["MOE_MODEL_DIR"] == "/models/model"
    assert "volumes" not in services["gateway"]  # the gateway never loads weights


def test_variables_substitute(docker_compose, tmp_path):
    services = config(docker_compose, tmp_path, BASE, env={
        "MOE_CLUSTER": "c2", "MOE_REDIS_PASSWORD": "s3cret", "MOE_GATEWAY_PORT": "6000", "MOE_SHARD0_EXPERTS": "0,2"})["services"]
    assert services["router"]["environment"]["MOE_CLUSTER"] == "c2"
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == "s3cret"
    assert services["gateway"]["environment"]["MOE_REDIS_PASSWORD"] == "s3cret"
    assert services["expert-0"]["environment"]["MOE_EXPERTS"] == "0,2"
    assert services["gateway"]["ports"] == ["127.0.0.1:6000:50050/tcp"]


def test_gpu_overlay_gives_each_compute_service_its_own_gpu(docker_compose, tmp_path):
    services = config(docker_compose, tmp_path, BASE, GPU)["services"]
    devices = []
    for name in ("expert-0", "expert-1", "attention"):
        (request,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert request["driver"] == "nvidia" and request["capabilities"] == ["gpu"]
        devices += request["device_ids"]
        assert services[name]["environment"]["MOE_DEVICE"] == "cuda"
        assert services[name]["environment"]["MOE_EXPERTS" if name != "attention" else "MOE_TRANSPORT"]  # base kept
    assert len(devices) == len(set(devices)) == 3
    for name in PORTS:
        assert services[name]["image"].endswith("-cuda") and services[name]["build"]["args"] == {"BASE": "cuda"}


def test_env_names_are_the_contracts_and_the_charts(docker_compose, tmp_path):
    contract = set(re.findall(r"`(MOE_[A-Z_]+)`", CONTRACTS.read_text()))
    services = config(docker_compose, tmp_path, BASE, GPU)["services"]
    for name in PORTS:
        unknown = {k for k in services[name]["environment"] if k.startswith("MOE_")} - contract
        assert not unknown, (name, unknown)
