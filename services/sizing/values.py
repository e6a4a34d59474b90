"""Read a values file of our Helm chart into sizing settings: the deployment it would run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from model.config import ModelConfig
from services.common import expert_ids
from services.sizing.estimate import DeploymentError

GPU_RESOURCE = "nvidia.com/gpu"


def parse_expert_ids(spec: str, n_experts: int) -> list[int]:
    """A shard's `experts` value as ids, sizing's error type on bad input."""
    try:
        return expert_ids.parse_expert_ids(spec, n_experts)
    except ValueError as err:
        raise DeploymentError(f"bad expert range: {err}") from None


def _gpus(resources: Any) -> int:
    limits = (resources or {}).get("limits") or {}
    return int(limits.get(GPU_RESOURCE, 1))


def deployment_settings(path: str | Path, cfg: ModelConfig) -> dict[str, Any]:
    """Deployment fields implied by the chart values; the attention batch comes back separately
    under `attention_batch` (sequences per attention worker) for the caller to turn into tokens."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise DeploymentError(f"cannot read values file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise DeploymentError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    shards = values.get("expertShards") or []
    if not shards:
        raise DeploymentError(f"{path}: no expertShards to size")
    covered: set[int] = set()
    slots = ep_width = experts_per_gpu = 0
    for shard in shards:
        ids = parse_expert_ids(shard.get("experts", ""), cfg.n_routed_experts)
        gpus, replicas = _gpus(shard.get("resources")), int(shard.get("replicas", 1))
        covered.update(ids)
        slots += len(ids) * replicas
        ep_width += gpus * replicas
        experts_per_gpu = max(experts_per_gpu, math.ceil(len(ids) / gpus))
    missing = cfg.n_routed_experts - len(covered)
    if missing:
        raise DeploymentError(f"{path}: {missing} routed experts are served by no expert shard")
    attention = values.get("attention") or {}
    settings: dict[str, Any] = {
        "ep_width": ep_width,
        "experts_per_gpu": experts_per_gpu,
        "redundant_experts": slots - cfg.n_routed_experts,
        "planes": max(1, len(values.get("planes") or [])),
        "attention_workers": int(attention.get("replicas", 1)),
        "attention_gpus_per_worker": _gpus(attention.get("resources")),
        "attention_batch": int(attention.get("maxBatch", 64)),
    }
    if attention.get("kvCacheTokens") is not None:
        settings["kv_cache_tokens"] = int(attention["kvCacheTokens"])
    dispatch = values.get("dispatchDtype")
    if dispatch is not None:
        settings["dispatch_dtype"] = dispatch
        # DESIGN.md: combine stays at the model's precision; only dispatch compresses to FP8.
        settings["combine_dtype"] = "fp32" if dispatch == "fp32" else "bf16"
    return settings
