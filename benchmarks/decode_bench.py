"""Decode speed: our in-process generator against transformers' generate(), same checkpoint,
same machine, same run. Start-up and prefill are excluded: each side is timed for N and 2N new
tokens and the difference divided by N gives the per-step decode time.

    python benchmarks/decode_bench.py [--dtype float32|bfloat16] [--batches 1,16] [--steps 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import make_checkpoint  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.generate import Engine, GenerationRequest  # noqa: E402

# ~45M parameters, V3-style: sigmoid routing with groups, YaRN, q_lora.
BENCH_CONFIG = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32,
    n_shared_experts=1, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
    kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
    max_position_embeddings=1024,
)
PROMPT_LEN = 32


def time_ours(model, batch: int, new_tokens: int) -> float:
    engine = Engine(model, cache_tokens=batch * (PROMPT_LEN + new_tokens + 16), max_batch=batch)
    prompts = [tuple((i * 7 + j) % 8000 for j in range(PROMPT_LEN)) for i in range(batch)]
    start = time.perf_counter()
    engine.generate([GenerationRequest(p, new_tokens) for p in prompts])
    return time.perf_counter() - start


def time_transformers(hf, batch: int, new_tokens: int) -> float:
    prompts = torch.tensor([[(i * 7 + j) % 8000 for j in range(PROMPT_LEN)] for i in range(batch)])
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def per_step(timer, model, batch: int, steps: int, repeats: int) -> float:
    """Best-of-`repeats` per-step decode time, prefill and set-up cancelled by differencing."""
    timer(model, batch, 2)  # warm-up
    short = min(timer(model, batch, steps) for _ in range(repeats))
    long = min(timer(model, batch, 2 * steps) for _ in range(repeats))
    return (long - short) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our model's dtype")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(Path(tmp), "v3", seed=0, **BENCH_CONFIG)
        ours = load_model(tmp, dtype=args.dtype)
    params = sum(p.numel() for p in hf.parameters())
    print(f"model: {params / 1e6:.1f}M parameters; transformers fp32 eager vs ours {args.dtype}; prompt {PROMPT_LEN}")
    print(f"{'batch':>5} {'transformers ms/step':>21} {'ours ms/step':>13} {'tok/s theirs':>13} {'tok/s ours':>11} {'speed-up':>9}")
    for batch in [int(b) for b in args.batches.split(",")]:
        theirs = per_step(time_transformers, hf, batch, args.steps, args.repeats)
        mine = per_step(time_ours, ours, batch, args.steps, args.repeats)
        print(
            f"{batch:>5} {theirs * 1e3:>21.2f} {mine * 1e3:>13.2f} {batch / theirs:>13.0f} {batch / mine:>11.0f} "
            f"{theirs / mine:>8.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
