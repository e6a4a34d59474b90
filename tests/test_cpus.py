"""CPU pinning: `--cpus` of the model services and `moe up --pin-cpus`'s dealing of CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.cpus import available_cpus, deal_cpus, parse_cpus

ROOT = Path(__file__).resolve().parents[1]


def test_cpus_are_dealt_in_blocks_while_there_are_enough_then_one_each_in_turn():
    assert deal_cpus([0, 1, 2, 3, 4, 5, 6, 7], 3) == [[0, 1], [2, 3], [4, 5]]
    assert deal_cpus([2, 3, 6, 7], 4) == [[2], [3], [6], [7]]
    assert deal_cpus([0, 1], 3) == [[0], [1], [0]]
    assert deal_cpus([5], 2) == [[5], [5]]


def test_a_cpu_list_names_only_cpus_this_process_may_run_on():
    mine = available_cpus()
    assert parse_cpus(",".join(map(str, mine))) == mine
    missing = max(mine) + 1
    with pytest.raises(ValueError, match=f"CPUs {missing} are not available to this process"):
        parse_cpus(f"{mine[0]},{missing}")
    with pytest.raises(ValueError, match="'x' is not an id"):
        parse_cpus("x")
    with pytest.raises(ValueError, match="names over 65536 ids"):  # refused before it is expanded
        parse_cpus("0-999999999999")


PIN_AND_REPORT = """
import json, os, sys, threading, torch
from services.common.cpus import pin_process
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
pin_process([int(sys.argv[1])])
after = threading.Thread(target=stop.wait); after.start()
threads = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
stop.set()
print(json.dumps({"threads": threads, "torch_threads": torch.get_num_threads()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(len(available_cpus()) < 2, reason="pinning to one CPU of one changes nothing to observe")
def test_pinning_holds_every_thread_of_the_process_started_before_or_after_and_sizes_torch():
    cpu = available_cpus()[-1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", PIN_AND_REPORT, str(cpu)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout)
    assert len(report["threads"]) >= 3  # main, and the threads started before and after pinning
    assert all(cpus == [cpu] for cpus in report["threads"].values()), report
    assert report["torch_threads"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("service", ["attention", "expert"])
def test_a_cpu_list_outside_the_host_is_refused_in_one_line_before_loading(v3_checkpoint, service):
    path, _ = v3_checkpoint
    missing = max(available_cpus()) + 1
    args = ["--experts", "0-3"] if service == "expert" else []
    done = subprocess.run([sys.executable, "-m", f"services.{service}", "--model", str(path), "--cpus", str(missing),
                           "--redis-url", "redis://127.0.0.1:9/0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.splitlines() == [message] and f"CPUs {missing} are not available" in message, message
