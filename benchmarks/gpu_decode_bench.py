"""GPU decode speed (issue 7): our CUDA-graph decode against transformers' eager generate() on a
DeepSeek-V2-Lite-sized model with random bf16 weights built on the GPU (no checkpoint on disk):
both models share one random state dict. Prints ms per decode step at each batch, the ratio,
and the fraction of the weight-read roofline (bytes a step must read / measured copy bandwidth).

    python benchmarks/gpu_decode_bench.py [--batches 1,16,64] [--layers 27] [--steps 16] [--fp8] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import kernels  # noqa: E402
from model.checkpoint import checkpoint_name  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.cuda_graph import GraphDecoder  # noqa: E402
from model.layers import RotaryEmbedding  # noqa: E402
from model.kernels.cuda import grouped_mm  # noqa: E402
from model.moe import ExpertBank  # noqa: E402
from model.transformer import Transformer  # noqa: E402

V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
    q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy",
    norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def build_pair(overrides: dict, dtype=torch.bfloat16):
    """(transformers model, our model) sharing weight storage, random weights made on the GPU."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            hf = DeepseekV2ForCausalLM(DeepseekV2Config(**{**V2_LITE, **overrides})).eval()
    finally:
        torch.set_default_dtype(default)
    return hf, ours_from_transformers(hf)


def ours_from_transformers(hf) -> Transformer:
    cfg = ModelConfig.from_dict({**hf.config.to_dict(), "model_type": "deepseek_v2"})
    theirs = hf.state_dict()
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, _ in list(model.named_parameters()):
        key = checkpoint_name(name)
        key = key.replace(".experts.w13", ".experts.gate_up_proj").replace(".experts.w2", ".experts.down_proj")
        value = theirs[key]
        if name.endswith(".gate.weight"):
            value = value.float()  # router math in fp32, as the checkpoint loader does
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))
    model.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_interleave).cuda()
    for module in model.modules():
        if isinstance(module, ExpertBank):
            module.build_slot_table("cuda")
    kernels.install(model, "cuda")  # as load_model does
    return model.eval()


def cuda_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def transformers_step(hf, batch: int, prompt: int, steps: int) -> float:
    ids = torch.randint(0, hf.config.vocab_size, (batch, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def run(n):
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    run(2)
    short = min(cuda_time(lambda: run(steps)) for _ in range(2))
    long = min(cuda_time(lambda: run(2 * steps)) for _ in range(2))
    return (long - short) / steps


def ours_step(model: Transformer, batch: int, prompt: int, steps: int, graphs: bool) -> tuple[float, list[int]]:
    """Per-step time of greedy decode after an eager prefill; also returns row 0's tokens."""
    cache = model.new_cache(batch * (prompt + 4 * steps + 32) + 64)
    decoder = GraphDecoder(model, cache) if graphs else None
    gen = torch.Generator("cuda").manual_seed(1)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt), device="cuda", generator=gen)
    tokens = []
    for i in range(batch):
        cache.allocate(i, prompt + 4 * steps + 8)
        tokens.append(model.prefill(prompts[i], cache, i)[-1].argmax())
    tokens = torch.stack(tokens)
    seqs, length = list(range(batch)), prompt
    row0 = [tokens[0]]

    def run(n):
        nonlocal tokens, length
        for _ in range(n):
            lengths = [length] * batch
            logits = decoder.decode(tokens, seqs, lengths) if decoder else model.decode(tokens, cache, seqs, lengths)
            tokens = logits.argmax(-1)
            row0.append(tokens[0])
            length += 1

    run(2)
    t = min(cuda_time(lambda: run(steps)) for _ in range(2)) / steps
    return t, [int(x) for x in row0[: steps + 3]]


def profile_graph_step(model: Transformer, batch: int, prompt: int, label: str) -> None:
    """Kernels of one replayed decode step: count, total, and the top ones by time."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(batch * (prompt + 32) + 64)
    decoder = GraphDecoder(model, cache)
    for i in range(batch):
        cache.allocate(i, prompt + 4)
        model.prefill(torch.arange(prompt, device="cuda") * (i + 3) % model.cfg.vocab_size, cache, i)
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    for _ in range(2):
        decoder.decode(tokens, list(range(batch)), [prompt] * batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.decode(tokens, list(range(batch)), [prompt] * batch)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    print(f"profile, {label} graph step at batch {batch}: {sum(e.count for e in events)} kernels, {total / 1e3:.2f} ms of kernel time")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"  {e.self_device_time_total / 1e3:7.3f} ms {100 * e.self_device_time_total / total:5.1f}% {e.count:5d}x  {e.key[:90]}")


def step_bytes(model: Transformer, batch: int, context: int) -> float:
    """Bytes one decode step must read: every non-expert weight (embedding rows aside), the
    routed experts the batch touches (expected distinct experts under uniform routing) and the
    shared ones, the latent cache of every sequence."""
    cfg = model.cfg
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed.") or ".experts." in name:
            continue
        total += p.numel() * p.element_size()
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    distinct = E * (1 - (1 - K / E) ** batch)
    for module in model.modules():
        if isinstance(module, ExpertBank):
            per_expert = (module.w13[0].numel() + module.w2[0].numel()) * module.w13.element_size()
            total += (distinct + module.shared_slots) * per_expert
    total += cfg.num_hidden_layers * batch * context * cfg.kv_cache_dim * model.head.weight.element_size()
    return total


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = min(cuda_time(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() / t


def replay_time(fn, repeats: int = 20) -> float:
    """Seconds per call of `fn` replayed from a CUDA graph (as in a decode step: no Python or
    launch overhead), best of five rounds of `repeats` back-to-back replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replays():
        for _ in range(repeats):
            graph.replay()

    return min(cuda_time(replays) for _ in range(5)) / repeats


def expert_gemm_probe(D=2048, I=1408, E=64, K=6, tokens=(1, 16, 64)) -> None:
    """Routed-expert GEMMs alone, replayed from CUDA graphs as a decode step runs them: bf16
    grouped GEMM against the block-scaled FP8 grouped GEMM (activation quantisation included),
    random routing. Bandwidth counts the weights of the experts the routing touched."""
    from model.fp8 import quantize_stacked
    from model.kernels.fp8_gemm import fp8_grouped_mm, quantize_1x128

    torch.manual_seed(0)
    for name, (n, k) in {"w13": (2 * I, D), "w2": (D, I)}.items():
        w = torch.randn(E, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_stacked(w)
        for T in tokens:
            rows = T * K
            experts = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)]).view(-1).sort().values
            offsets = torch.bincount(experts, minlength=E).cumsum(0).to(torch.int32)
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            dense = replay_time(lambda: grouped_mm(x, w.transpose(1, 2), offsets))
            fp8 = replay_time(lambda: fp8_grouped_mm(*quantize_1x128(x), wq, ws, offsets, T))
            touched = int((offsets.diff(prepend=offsets.new_zeros(1)) > 0).sum()) * n * k
            print(f"expert GEMM {name} [{rows}x{k}] x {E} x [{k}, {n}]: bf16 {dense * 1e6:6.0f} us ({2 * touched / dense / 1e12:.2f} TB/s), "
                  f"fp8 {fp8 * 1e6:6.0f} us ({touched / fp8 / 1e12:.2f} TB/s): {dense / fp8:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="also time routed experts as block-scaled FP8 GEMMs")
    parser.add_argument("--profile", action="store_true", help="top kernels of one replayed step at the smallest and largest batch")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    hf, ours = build_pair({"num_hidden_layers": args.layers})
    params = sum(p.numel() for p in hf.parameters())
    print(f"model: {params / 1e9:.2f}B parameters, {args.layers} layers, bf16; prompt {args.prompt}")
    # the two models agree (same weights): last-position logits of one prompt
    prompt = torch.arange(args.prompt, device="cuda") * 37 % ours.cfg.vocab_size
    cache = ours.new_cache(args.prompt + 16)
    cache.allocate("check", args.prompt)
    with torch.inference_mode():
        mine = ours.prefill(prompt, cache, "check")[-1]
        theirs = hf(prompt[None]).logits[0, -1].float()
    print(f"ours vs transformers last-token logits: max abs diff {(mine - theirs).abs().max().item():.4f} "
          f"(|logits| max {theirs.abs().max().item():.2f}); argmax equal: {bool(mine.argmax() == theirs.argmax())}")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")
    print(f"{'batch':>5} {'transformers ms':>16} {'ours eager ms':>14} {'ours graph ms':>14} {'speed-up':>9} {'roofline':>9} {'row-0 greedy tokens, graph vs eager':>15}")
    measured = {}
    for batch in batches:
        eager, eager_tokens = ours_step(ours, batch, args.prompt, args.steps, graphs=False)
        graph, graph_tokens = ours_step(ours, batch, args.prompt, args.steps, graphs=True)
        theirs = float("nan") if args.skip_transformers else transformers_step(hf, batch, args.prompt, args.steps)
        measured[batch] = (theirs, graph, graph_tokens)
        roof = step_bytes(ours, batch, args.prompt + args.steps) / bandwidth / graph
        same = next((i for i, (a, b) in enumerate(zip(eager_tokens, graph_tokens)) if a != b), len(graph_tokens))
        print(f"{batch:>5} {theirs * 1e3:>16.2f} {eager * 1e3:>14.2f} {graph * 1e3:>14.2f} {theirs / graph:>8.1f}x "
              f"{roof * 100:>8.1f}% {same:>6}/{len(graph_tokens)} same")
    if args.profile:
        for batch in (batches[0], batches[-1]):
            profile_graph_step(ours, batch, args.prompt, "bf16")
    if args.fp8:
        del hf
        for module in ours.modules():
            if isinstance(module, ExpertBank):
                module.quantize_fp8()
        kernels.install(ours, "cuda")
        torch.cuda.empty_cache()
        print("routed experts as FP8 (128x128 block scales, 1x128 activation tiles):")
        print(f"{'batch':>5} {'ours fp8 graph ms':>18} {'vs transformers':>16} {'vs bf16 graph':>14} {'roofline':>9} {'row-0 greedy tokens, fp8 vs bf16':>15}")
        for batch in batches:
            theirs, dense, dense_tokens = measured[batch]
            graph, tokens = ours_step(ours, batch, args.prompt, args.steps, graphs=True)
            roof = step_bytes(ours, batch, args.prompt + args.steps) / bandwidth / graph
            same = next((i for i, (a, b) in enumerate(zip(dense_tokens, tokens)) if a != b), len(tokens))
            print(f"{batch:>5} {graph * 1e3:>18.2f} {theirs / graph:>15.1f}x {dense / graph:>13.2f}x {roof * 100:>8.1f}% {same:>6}/{len(tokens)} same")
        if args.profile:
            profile_graph_step(ours, batches[-1], args.prompt, "fp8")
        del ours
        torch.cuda.empty_cache()
        expert_gemm_probe()
    return 0


if __name__ == "__main__":
    sys.exit(main())
