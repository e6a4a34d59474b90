"""What `moe up` and `LocalCluster` check before they start any process: flags, device and the
model's files. A bad value then costs one line, not a half-started cluster and a shard's traceback.
Nothing here imports torch unless a device other than the CPU is asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path

from services.common.devices import check_device as check_device_flag

# services.transport.TRANSPORT_CHOICES, kept here so that the launcher does not import torch
TRANSPORT_CHOICES = ("auto", "grpc", "ucx")
# Shard replicas and attention workers on one machine: more is a typo, and would need more ports
# than free_ports finds below the ephemeral range.
MAX_MODEL_PROCESSES = 1024


class ClusterError(RuntimeError):
    """The cluster could not start (or be found); the message names the process and its log."""


def check_flags(shards: int, replicas: int, attention_workers: int, planes: int, gateway_port: int,
                ready_timeout: float, transport: str) -> None:
    for flag, count in (("--replicas", replicas), ("--attention-workers", attention_workers), ("--planes", planes)):
        if count < 1:
            raise ClusterError(f"{flag} must be >= 1, got {count}")
    if not 0 <= gateway_port <= 65535:
        raise ClusterError(f"--port must be between 1 and 65535 (or 0 for any free port), got {gateway_port}")
    if not ready_timeout > 0:
        raise ClusterError(f"--timeout must be > 0 seconds, got {ready_timeout}")
    if transport not in TRANSPORT_CHOICES:
        raise ClusterError(f"--transport must be one of {', '.join(TRANSPORT_CHOICES)}, got {transport!r}")
    model_processes = max(shards, 0) * replicas + attention_workers
    if model_processes > MAX_MODEL_PROCESSES:
        raise ClusterError(f"{shards} shard(s) x {replicas} replica(s) + {attention_workers} attention worker(s) "
                           f"is {model_processes} processes; one machine runs at most {MAX_MODEL_PROCESSES}")


def split_experts(n_experts: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous (first, last) expert ranges, as even as possible: shard i gets [i*E/N, (i+1)*E/N)."""
    if not 1 <= shards <= n_experts:
        raise ClusterError(f"--shards must be between 1 and the model's {n_experts} routed experts, got {shards}")
    return [(i * n_experts // shards, (i + 1) * n_experts // shards - 1) for i in range(shards)]


def check_device(device: str) -> None:
    """ClusterError unless `device` is cpu or a CUDA device this host has: otherwise every shard and
    worker fails on it, each with a traceback, and only after Redis and the router have started."""
    try:
        check_device_flag(device)
    except ValueError as err:
        raise ClusterError(str(err)) from None


def read_n_experts(model_dir: Path) -> int:
    from model.config import ModelConfig
    from model.errors import ModelError

    try:
        cfg = ModelConfig.from_model_dir(model_dir)
    except (ModelError, OSError) as err:
        raise ClusterError(f"cannot read the model at {model_dir}: {err}") from None
    if not cfg.moe_layers:
        raise ClusterError(f"{model_dir} has no MoE layers; nothing to shard")
    return cfg.n_routed_experts

def check_weight_files(model_dir: Path) -> None:
    """Every safetensors file the shards and workers will open is there and readable, so that a
    config-only or half-copied checkpoint fails before anything starts. Their names only: opening
    them takes torch, which a launcher on CPU never imports."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())
        except (OSError, ValueError) as err:
            raise ClusterError(f"cannot read the model at {model_dir}: {index.name}: {err}") from None
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(name, str) for name in weight_map.values())):
            raise ClusterError(f"cannot read the model at {model_dir}: {index.name} has no weight_map "
                               f"from tensor names to file names")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ClusterError(f"cannot read the model at {model_dir}: no *.safetensors files and no "
                               f"{index.name}")
    unreadable = [path.name for path in files if not (path.is_file() and os.access(path, os.R_OK))]
    if unreadable:
        raise ClusterError(f"cannot read the model at {model_dir}: {len(unreadable)} of the {len(files)} "
                           f"weight files missing or unreadable, e.g. {unreadable[0]}")
