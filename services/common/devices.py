"""The `--device` flag's one check, shared by `moe generate --model` and `moe up`."""

from __future__ import annotations


def check_device(device: str) -> None:
    """ValueError naming the flag unless `device` is cpu or a CUDA device this host has: caught
    here, it is one line; caught by a model load, a traceback from deep inside torch."""
    if device == "cpu":
        return  # the default needs no torch, whose import would add seconds to every CPU `moe up`
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but no CUDA device is available")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device} was asked for but only {torch.cuda.device_count()} CUDA "
                         f"device(s) are visible")
