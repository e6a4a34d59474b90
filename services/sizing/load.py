"""Expert-load distributions and what they cost: the slowest device bounds every all-to-all.

Placement mirrors the router's EPLB: redundant slots go to the experts with the highest load per
replica, then slots are packed heaviest first onto the least loaded device with a free slot.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path

from model.errors import ModelError


class LoadError(ModelError):
    """An expert-load file or exponent that sizing cannot use."""


def zipf_shares(n_experts: int, exponent: float) -> list[float]:
    """Load share of each expert when the i-th hottest gets a share proportional to 1 / i**s."""
    if exponent < 0:
        raise LoadError(f"--zipf exponent must be >= 0, got {exponent}")
    weights = [1.0 / (rank**exponent) for rank in range(1, n_experts + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def read_load_file(path: str | Path, n_experts: int) -> list[list[float]]:
    """Per-expert token counts: a list, an {expert id: tokens} object (one Redis `load:` hash), or
    {layer: {expert id: tokens}} (all layers). Returns one count list per layer given."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise LoadError(f"cannot read expert load file {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise LoadError(f"{path} is not valid JSON: {err}") from None
    per_layer = raw.values() if isinstance(raw, dict) and raw and all(isinstance(v, (dict, list)) for v in raw.values()) else [raw]
    return [_counts(layer, n_experts, path) for layer in per_layer]


def _counts(raw: object, n_experts: int, path: Path) -> list[float]:
    counts = [0.0] * n_experts
    items = enumerate(raw) if isinstance(raw, list) else raw.items() if isinstance(raw, dict) else None
    if items is None:
        raise LoadError(f"{path}: expected a list or an object of per-expert token counts")
    for expert, tokens in items:
        try:
            index, value = int(expert), float(tokens)
        except (TypeError, ValueError):
            raise LoadError(f"{path}: bad entry {expert!r}: {tokens!r}") from None
        if not 0 <= index < n_experts or value < 0:
            raise LoadError(f"{path}: expert {index} with {value} tokens is outside 0..{n_experts - 1} or negative")
        counts[index] = value
    if not sum(counts):
        raise LoadError(f"{path}: every expert has zero tokens")
    return counts


def slowest_device_factor(load: list[float], devices: int, slots_per_device: int, redundant: int) -> float:
    """Tokens on the busiest device over the mean, after placing `load` with `redundant` replicas."""
    slots = len(load) + redundant
    if slots > devices * slots_per_device:
        raise LoadError(f"{len(load)} experts + {redundant} redundant need {slots} slots; {devices} devices x {slots_per_device} hold {devices * slots_per_device}")
    replicas = [1] * len(load)
    hottest = [(-tokens, expert) for expert, tokens in enumerate(load)]
    heapq.heapify(hottest)
    for _ in range(redundant):
        _, expert = heapq.heappop(hottest)
        replicas[expert] += 1
        heapq.heappush(hottest, (-load[expert] / replicas[expert], expert))
    per_slot = sorted((load[e] / replicas[e] for e in range(len(load)) for _ in range(replicas[e])), reverse=True)
    device_heap = [(0.0, device, 0) for device in range(devices)]  # (tokens, device, slots used)
    heapq.heapify(device_heap)
    full: list[float] = []
    for tokens in per_slot:
        used_tokens, device, used = heapq.heappop(device_heap)
        if used + 1 < slots_per_device:
            heapq.heappush(device_heap, (used_tokens + tokens, device, used + 1))
        else:
            full.append(used_tokens + tokens)
    busiest = max(full + [t for t, _, _ in device_heap])
    return busiest / (sum(load) / devices)
