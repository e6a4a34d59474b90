"""`python -m services.cli.demo_model DIR`: write the demo model used by `make run`.

The demo model is a tiny random DeepSeek-V3-style checkpoint (sigmoid gate with correction bias,
4 expert groups, YaRN RoPE, one dense layer then two MoE layers of 8 routed experts), written by
`transformers` itself so it is exactly what the correctness oracle loads. Nothing is downloaded.
The tests build their V3-style fixture from this same config.
Does nothing when DIR already holds a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.cli.convert import readable_by_all

DEMO_CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=24,
    routed_scaling_factor=2.5,
    max_position_embeddings=256,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
    },
)


def has_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def write_demo_model(path: str | Path, seed: int = 0) -> Path:
    """Write the demo checkpoint to `path` unless one is there; returns the path."""
    path = Path(path)
    if has_checkpoint(path):
        return path
    try:
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError as err:
        raise SystemExit(f"demo_model: needs torch and transformers (pip install -e '.[test]'): {err}") from None
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**DEMO_CONFIG))
    with torch.no_grad():  # a non-zero correction bias exercises biased expert selection
        for layer in model.model.layers[DEMO_CONFIG["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    readable_by_all(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cli.demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="where to write the checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = Path(args.dir)
    if has_checkpoint(path):
        print(f"demo model already in {path}")
        return 0
    write_demo_model(path, args.seed)
    print(f"demo model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
