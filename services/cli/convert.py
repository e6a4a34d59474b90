"""`moe convert --fp8 SRC DST`: an FP8 copy of a BF16/FP32 checkpoint in DeepSeek-V3's layout.

Every projection weight becomes float8_e4m3fn with a `weight_scale_inv` (one fp32 scale per
128x128 block) beside it; embeddings, norms, the router gate and the LM head keep their dtype,
as in DeepSeek's own FP8 release. The shard layout of the source is kept file for file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

from services.cli import CliError

QUANTISED = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--fp8", action="store_true", required=True, help="write float8_e4m3fn weights with block scales")
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory (created; must not hold a checkpoint)")


def readable_by_all(directory: Path) -> None:
    """safetensors writes weight files owner-only (0600); give them the mode any other new file
    gets (0644 under the usual umask), so servers running as another user can read them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.glob("*.safetensors"):
        path.chmod(0o666 & ~umask)


def run(args: argparse.Namespace) -> int:
    try:
        return _convert(Path(args.src), Path(args.dst))
    except OSError as err:
        raise CliError(f"cannot write {args.dst}: {err.strerror or err}") from None


def _convert(src: Path, dst: Path) -> int:
    from safetensors.torch import save_file

    from model.checkpoint import Checkpoint
    from model.config import ModelConfig
    from model.fp8 import quantize_weight

    cfg = ModelConfig.from_model_dir(src)
    if cfg.quantization is not None:
        raise CliError(f"{src} is already quantised ({cfg.quantization.get('quant_method', '?')})")
    if dst.exists() and any(dst.glob("*.safetensors")):
        raise CliError(f"{dst} already holds a checkpoint; choose an empty directory")
    ckpt = Checkpoint(src)
    dst.mkdir(parents=True, exist_ok=True)
    files: dict[Path, list[str]] = {}
    for key, path in ckpt.file_of.items():
        files.setdefault(path, []).append(key)
    weight_map = {}
    for n, (path, keys) in enumerate(sorted(files.items()), 1):
        out = {}
        for key in keys:
            tensor = ckpt.raw(key)
            if QUANTISED.search(key) and tensor.dim() == 2:
                out[key], out[key + "_scale_inv"] = quantize_weight(tensor)
            else:
                out[key] = tensor.contiguous()
        save_file(out, str(dst / path.name), metadata={"format": "pt"})
        weight_map.update({k: path.name for k in out})
        print(f"converted {path.name} ({n}/{len(files)})")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = FP8_CONFIG
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    readable_by_all(dst)
    print(f"wrote FP8 checkpoint to {dst}")
    return 0
