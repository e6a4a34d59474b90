"""`moe inspect`: parameter counts and KV-cache bytes per token of a model, without its weights.

Every figure comes from `model.accounting`, the same arithmetic `moe size` uses.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from model import accounting
from model.config import ModelConfig
from services.cli import CliError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --config / --preset: where the model's config.json comes from (one of them)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="checkpoint directory holding config.json")
    source.add_argument("--config", metavar="FILE", help="a config.json file")
    source.add_argument("--preset", metavar="NAME", help="a published config shipped with moe-runtime (deepseek-v3, deepseek-v2-lite)")


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    from model.presets import preset_path

    if args.model:
        return ModelConfig.from_model_dir(args.model)
    if args.config:
        return ModelConfig.from_file(args.config)
    return ModelConfig.from_file(preset_path(args.preset))


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def report(cfg: ModelConfig) -> dict[str, Any]:
    counts = accounting.parameter_counts(cfg)
    bf16 = accounting.BF16
    return {
        "architecture": cfg.architecture,
        "layers": cfg.num_hidden_layers,
        "moe_layers": len(cfg.moe_layers),
        "mtp_modules": cfg.num_nextn_predict_layers,
        "hidden_size": cfg.hidden_size,
        "routed_experts": cfg.n_routed_experts,
        "shared_experts": cfg.n_shared_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "parameters": {
            "total": counts.total,
            "activated_per_token": round(counts.activated),
            "mtp": counts.mtp,
            "mtp_unique": counts.mtp_unique,
            "total_with_mtp": counts.total_with_mtp,
            "activated_per_token_with_mtp": round(counts.activated_with_mtp),
            "by_category": counts.by_category,
        },
        "kv_cache_bf16": {
            "mla_bytes_per_token": accounting.kv_bytes_per_token(cfg, bf16),
            "mla_bytes_per_token_per_layer": accounting.kv_bytes_per_token_per_layer(cfg, bf16),
            "mha_bytes_per_token": accounting.mha_kv_bytes_per_token(cfg, bf16),
            "gqa8_bytes_per_token": accounting.gqa_kv_bytes_per_token(cfg, bf16),
            "mha_head_dims": {"key": cfg.qk_head_dim, "value": cfg.v_head_dim},
        },
    }


PARAMETER_UNITS = ((1e9, "B"), (1e6, "M"), (1e3, "K"))


def parameter_count(n: int) -> str:
    """`n` in the largest unit it reaches, so small models and small categories stay readable."""
    for scale, suffix in PARAMETER_UNITS:
        # Judged after rounding, so 999,999 reads 1.00 M rather than 1,000.00 K.
        if round(n / scale, 2) >= 1:
            return f"{n / scale:,.2f} {suffix}"
    return f"{n:,}"


def format_table(info: dict[str, Any]) -> str:
    p, kv = info["parameters"], info["kv_cache_bf16"]
    rows = [
        ("architecture", info["architecture"]),
        ("layers (MoE / MTP)", f"{info['layers']} ({info['moe_layers']} / {info['mtp_modules']})"),
        ("experts", f"{info['routed_experts']} routed, {info['shared_experts']} shared, {info['experts_per_token']} per token"),
        ("", ""),
        ("parameters, total", parameter_count(p["total"])),
        ("  activated per token", parameter_count(p["activated_per_token"])),
        *((f"  {name}", parameter_count(n)) for name, n in p["by_category"].items() if name != "mtp"),
        ("MTP modules (as stored)", parameter_count(p["mtp"])),
        ("  not shared with main", parameter_count(p["mtp_unique"])),
        ("total with MTP", parameter_count(p["total_with_mtp"])),
        ("", ""),
        ("KV cache per token (BF16)", f"{kv['mla_bytes_per_token']:,} bytes (latent MLA)"),
        ("  per layer", f"{kv['mla_bytes_per_token_per_layer']:,} bytes"),
        ("  as MHA", f"{kv['mha_bytes_per_token']:,} bytes (K {kv['mha_head_dims']['key']} + V {kv['mha_head_dims']['value']} per head)"),
    ]
    if kv["gqa8_bytes_per_token"] is not None:
        rows.append(("  as GQA, 8 KV heads", f"{kv['gqa8_bytes_per_token']:,} bytes"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = model_config_from_args(args)
    except OSError as err:
        raise CliError(str(err)) from None
    info = report(cfg)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
