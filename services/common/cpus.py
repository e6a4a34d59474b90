"""Pinning a model process to CPUs (`--cpus`), and dealing a host's CPUs out to the model
processes of a local cluster (`moe up --pin-cpus`).

An attention worker and an expert shard hand each layer back and forth several hundred times a
second, and the kernel's scheduler moves them between cores as it wakes them (hundreds of
migrations per benchmark run here). On a 2-core host, with the worker computing half the
experts itself, pinning kept a batch-16 step at 14.1 to 20.6 ms where unpinned runs took 15 to
32 (docs/performance.md, "Pinned processes"). In Kubernetes the kubelet's static CPU manager gives
Guaranteed pods exclusive cores instead; `--cpus` is for hosts without one.
"""

from __future__ import annotations

import os

from services.common.expert_ids import format_id_list, parse_id_list


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: a container's cpuset, taskset)."""
    return sorted(os.sched_getaffinity(0))


def parse_cpus(spec: str) -> list[int]:
    """"0-3,8" -> CPU ids, each one this process may run on; ValueError names the others."""
    cpus = parse_id_list(spec, "CPU")
    allowed = set(available_cpus())
    outside = [c for c in cpus if c not in allowed]
    if outside:
        raise ValueError(f"CPU list '{spec}': CPUs {format_id_list(outside)} are not available to this process "
                         f"(available: {format_id_list(allowed)})")
    return cpus


def pin_process(cpus: list[int]) -> None:
    """Every thread of this process, and every thread it starts later, runs on `cpus` only.
    Torch's intra-op threads follow the CPU count unless OMP_NUM_THREADS sets them."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # a thread that ended since the listing
            continue
    if not os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(len(cpus))


def deal_cpus(cpus: list[int], processes: int) -> list[list[int]]:
    """The CPUs of each of `processes` model processes, in order: a block of len(cpus) //
    processes of them each while there are enough, else one each, in turn (the last ones share)."""
    if processes <= len(cpus):
        width = len(cpus) // processes
        return [cpus[i * width:(i + 1) * width] for i in range(processes)]
    return [[cpus[i % len(cpus)]] for i in range(processes)]
