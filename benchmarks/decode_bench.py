"""Decode speed: our in-process generator against transformers' generate(), same checkpoint,
same machine, same run. Start-up and prefill are excluded: each side is timed for N and 2N new
tokens and the difference divided by N gives the per-step decode time. The contenders run
interleaved, round after round, and each keeps its best round, so a noisy neighbour on a shared
machine slows every contender alike instead of whichever happened to run at that moment. Ours runs
eagerly and, for batches of up to 16, also through compiled decode steps (`Engine(compile_cpu=True)`;
compiling happens in the warm-up, outside the timed runs). transformers runs in every dtype ours
does, and each row prints its ratio against transformers in float32 and in the row's own dtype
(on CPUs with native bf16 instructions, transformers itself gains from bf16 too).

    python benchmarks/decode_bench.py [--dtypes float32,bfloat16] [--batches 1,16] [--steps 32]
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import make_checkpoint  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.compiled_decode import COMPILED_BATCH  # noqa: E402
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


def time_ours(model, batch: int, new_tokens: int, compile_cpu: bool = False) -> float:
    engine = Engine(model, cache_tokens=batch * (PROMPT_LEN + new_tokens + 16), max_batch=batch, compile_cpu=compile_cpu)
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


def per_step(contenders: dict, batch: int, steps: int, rounds: int) -> dict[str, float]:
    """Best-of-`rounds` per-step decode time of each contender (name -> (timer, model)),
    prefill and set-up cancelled by differencing N and 2N new tokens. Each contender runs its N
    and its 2N call in turn, the order swapped every round: whichever call follows another
    contender meets what that one leaves running (a cluster's processes finishing their requests),
    and always putting the N call there made the difference, and the per-step time, too small."""
    for timer, model in contenders.values():
        timer(model, batch, 2)  # warm-up
    best = {n: {name: float("inf") for name in contenders} for n in (steps, 2 * steps)}
    for round_ in range(rounds):
        order = (steps, 2 * steps) if round_ % 2 == 0 else (2 * steps, steps)
        for name, (timer, model) in contenders.items():
            for n in order:
                best[n][name] = min(best[n][name], timer(model, batch, n))
    return {name: (best[2 * steps][name] - best[steps][name]) / steps for name in contenders}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of both models' weights")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled contenders (~20 s of compiling each)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtypes = args.dtypes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(Path(tmp), "v3", seed=0, **BENCH_CONFIG)
        ours = {dtype: load_model(tmp, dtype=dtype) for dtype in dtypes}
    hf.eval()
    theirs = {dtype: hf if dtype == "float32" else copy.deepcopy(hf).to(getattr(torch, dtype)) for dtype in dtypes}
    theirs.setdefault("float32", hf)
    contenders = {f"transformers {dtype}": (time_transformers, model) for dtype, model in theirs.items()}
    contenders.update({f"ours {dtype} eager": (time_ours, model) for dtype, model in ours.items()})
    compiled = {f"ours {dtype} compiled": (functools.partial(time_ours, compile_cpu=True), model) for dtype, model in ours.items()}
    params = sum(p.numel() for p in hf.parameters())
    print(f"model: {params / 1e6:.1f}M parameters; prompt {PROMPT_LEN}; {torch.get_num_threads()} threads; "
          f"best of {args.rounds} interleaved rounds")
    print(f"{'batch':>5} {'contender (weights dtype)':<28} {'ms/step':>9} {'tok/s':>7} "
          f"{'vs transformers float32':>24} {'vs transformers same dtype':>27}")
    for batch in [int(b) for b in args.batches.split(",")]:
        # compiled decode steps serve up to COMPILED_BATCH sequences; larger ones run eagerly
        times = per_step(contenders | (compiled if batch <= COMPILED_BATCH and not args.eager_only else {}),
                         batch, args.steps, args.rounds)
        for name, t in times.items():
            dtype = name.split()[1]
            print(f"{batch:>5} {name:<28} {t * 1e3:>9.2f} {batch / t:>7.0f} "
                  f"{times['transformers float32'] / t:>23.2f}x {times[f'transformers {dtype}'] / t:>26.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
