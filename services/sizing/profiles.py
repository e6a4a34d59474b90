"""Hardware profiles: the figures sizing needs, from datasheets or from our own benchmarks.

A profile file is one flat JSON object with the keys of `HardwareProfile` (units in the key
names; bandwidths per direction, per GPU, one network plane per GPU/NIC). `write_profile` writes
one, so a benchmark can record what it measured and `moe size --profile FILE` can size with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from model.errors import ModelError


class ProfileError(ModelError):
    """A hardware profile file or name that sizing cannot use."""


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu_memory_gb: float  # HBM capacity, 1e9 bytes
    hbm_bandwidth_gb_s: float
    bf16_tflops: float  # dense (no sparsity) tensor-core peak
    fp8_tflops: float
    scale_out_bandwidth_gb_s: float  # one NIC/plane per GPU, per direction
    scale_up_bandwidth_gb_s: float  # NVLink per GPU, per direction
    scale_out_latency_us: float  # one all-to-all hop, worst case in the fabric
    scale_up_latency_us: float
    gpus_per_node: int
    scale_up_domain_gpus: int  # GPUs that reach each other over NVLink


# DeepSeek, "Insights into DeepSeek-V3" (ISCA 2025): IB 2.8 us same leaf / 3.7 us cross leaf
# per hop, NVLink 3.33 us. Datasheets quote NVLink as both directions together; halved here.
_IB_HOP_US, _NVLINK_HOP_US, _IB_400G_GB_S = 3.7, 3.33, 50.0

BUILTIN: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        # H800 SXM: H100 silicon with NVLink cut to 400 GB/s (both directions).
        HardwareProfile("h800", 80, 3350, 989, 1979, _IB_400G_GB_S, 200, _IB_HOP_US, _NVLINK_HOP_US, 8, 8),
        HardwareProfile("h100", 80, 3350, 989, 1979, _IB_400G_GB_S, 450, _IB_HOP_US, _NVLINK_HOP_US, 8, 8),
        HardwareProfile("h200", 141, 4800, 989, 1979, _IB_400G_GB_S, 450, _IB_HOP_US, _NVLINK_HOP_US, 8, 8),
        # GB200 NVL72, per Blackwell GPU: 13.4 TB / 576 TB/s HBM3e over 72 GPUs, 360/180 PFLOPS
        # dense FP8/BF16 per rack (the datasheet's 720/360 are with sparsity), NVLink 5 1.8 TB/s.
        HardwareProfile("gb200-nvl72", 186, 8000, 2500, 5000, _IB_400G_GB_S, 900, _IB_HOP_US, _NVLINK_HOP_US, 4, 72),
    )
}


def write_profile(path: str | Path, **figures: float | int | str) -> Path:
    """Write a profile file; every `HardwareProfile` key is required, unknown keys are refused."""
    profile = _from_mapping(figures, str(path))
    Path(path).write_text(json.dumps(asdict(profile), indent=2) + "\n")
    return Path(path)


def load_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name (h800, h100, h200, gb200-nvl72) or a profile JSON file."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ProfileError(f"no hardware profile '{name_or_path}': not a file and not one of {', '.join(BUILTIN)}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ProfileError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path} must hold a JSON object")
    return _from_mapping(raw, str(path))


def _from_mapping(raw: dict, source: str) -> HardwareProfile:
    known = {f.name: f for f in fields(HardwareProfile)}
    unknown = sorted(set(raw) - set(known))
    missing = sorted(set(known) - set(raw))
    if unknown or missing:
        detail = "; ".join(filter(None, [unknown and f"unknown keys {unknown}", missing and f"missing keys {missing}"]))
        raise ProfileError(f"{source}: {detail}")
    values = {}
    for name, f in known.items():
        value = raw[name]
        if name == "name":
            values[name] = str(value)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ProfileError(f"{source}: '{name}' must be a positive number, got {value!r}")
        values[name] = int(value) if f.type == "int" else float(value)
    return HardwareProfile(**values)
