"""GPU fast path (issue 7): CUDA-graph decode, grouped-GEMM experts, bf16 bounds. Skipped
without a CUDA device; run on one with `pytest -m gpu tests/test_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from model import kernels
from model.checkpoint import load_model
from model.kernels.fp8_gemm import quantize_1x128
from model.cuda_graph import GraphDecoder
from model.generate import Engine, GenerationRequest
from model.kernels import cuda
from model.moe import ExpertBank

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU decode path, issue 7)"),
]

PROMPTS = [(1, 2, 3), (7, 8, 9, 10, 11, 12), (40,)]
NEW_TOKENS = (32, 20, 27)  # sequences leave at different steps: the batch shrinks under the graph


@pytest.fixture(params=["v3", "v2"])
def checkpoint(request, v3_checkpoint, v2_checkpoint):
    return v3_checkpoint if request.param == "v3" else v2_checkpoint


def generate(model, cuda_graphs: bool, compile_layers: bool = True):
    engine = Engine(model, cache_tokens=1024, max_batch=4, cuda_graphs=False)
    if cuda_graphs:
        engine.graphs = GraphDecoder(model, engine.cache, compile_layers=compile_layers)
    return engine.generate([GenerationRequest(p, n) for p, n in zip(PROMPTS, NEW_TOKENS)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replayed_greedy_tokens_equal_eager_tokens(checkpoint, dtype):
    """Replaying a captured step changes nothing: same tokens, same log-probabilities."""
    path, _ = checkpoint
    model = load_model(path, dtype=dtype, device="cuda")
    eager, graphed = generate(model, False), generate(model, True, compile_layers=False)
    for a, b in zip(eager, graphed):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_layers_follow_eager_decode(checkpoint, dtype):
    """Graphs of compiled layers (the default on GPUs), teacher-forced along eager greedy output:
    fp32 picks the same token at every step; bf16 differs only by rounding, since inductor fuses
    bf16 elementwise chains without rounding between ops (measured max |logprob diff| 0.0039,
    where bf16 against fp32 is 0.0044), so a near-tie may flip."""
    path, _ = checkpoint
    model = load_model(path, dtype=dtype, device="cuda")
    eager = generate(model, False)
    cache = model.new_cache(1024)
    decoder = GraphDecoder(model, cache, compile_layers=True)
    diffs, agree, total = [], 0, 0
    for prompt, seq in zip(PROMPTS, eager):
        cache.allocate("forced", len(prompt) + len(seq.tokens))
        model.prefill(torch.tensor(prompt, device="cuda"), cache, "forced")
        for i in range(1, len(seq.tokens)):
            logits = decoder.decode(torch.tensor([seq.tokens[i - 1]], device="cuda"), ["forced"], [len(prompt) + i - 1])[0]
            logprobs = torch.log_softmax(logits.float(), -1)
            diffs.append(abs(logprobs[seq.tokens[i]].item() - seq.logprobs[i]))
            agree += int(logprobs.argmax().item() == seq.tokens[i])
            total += 1
        cache.free("forced")
    print(f"compiled vs eager ({dtype}): max |logprob diff| {max(diffs):.4f}, argmax agreement {agree}/{total}")
    if dtype == "float32":
        assert agree == total and max(diffs) <= 1e-3
    else:
        assert agree >= 0.95 * total and max(diffs) <= 2e-2


def test_cuda_fp32_greedy_tokens_match_transformers(checkpoint):
    path, hf = checkpoint
    model = load_model(path, device="cuda")
    for prompt, n, seq in zip(PROMPTS, NEW_TOKENS, generate(model, True)):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert seq.tokens == ref[0, len(prompt) :].tolist()


def test_bf16_logprobs_within_bound_of_fp32(v3_checkpoint):
    path, _ = v3_checkpoint
    prompt = torch.arange(48, device="cuda") * 5 % 320
    out = []
    for dtype in ("float32", "bfloat16"):
        model = load_model(path, dtype=dtype, device="cuda")
        cache = model.new_cache(64)
        cache.allocate("s", 48)
        out.append(torch.log_softmax(model.prefill(prompt, cache, "s", all_logits=True), -1))
    diff = (out[0] - out[1]).abs().max().item()
    print(f"bf16 vs fp32 max |logprob diff| = {diff:.4f}")
    assert diff < 0.1  # the CPU suite's bf16 bound, on GPU kernels


def test_grouped_gemm_experts_equal_expert_loop_on_cuda():
    torch.manual_seed(0)
    bank = ExpertBank([0, 2, 3, 5, 7], 8, 64, 32).cuda()
    torch.nn.init.normal_(bank.w13, std=0.1)
    torch.nn.init.normal_(bank.w2, std=0.1)
    bank.build_slot_table("cuda")
    x = torch.randn(33, 64, device="cuda")
    ids = torch.randint(0, 8, (33, 3), device="cuda")
    weights = torch.rand(33, 3, device="cuda")
    with torch.no_grad():
        loop = bank(x, ids, weights)  # the reference: no kernel installed
        kernels.install(bank, "cuda")
        assert bank.compute is cuda.grouped_experts
        grouped = bank(x, ids, weights)
    assert torch.allclose(grouped, loop, atol=1e-4, rtol=1e-4)


def test_decode_step_makes_no_host_sync(v3_checkpoint):
    path, _ = v3_checkpoint
    model = load_model(path, dtype="bfloat16", device="cuda")
    cache = model.new_cache(256)
    for seq in (0, 1):
        cache.allocate(seq, 64)
        model.prefill(torch.tensor([1, 2, 3], device="cuda"), cache, seq)
    index, bias = cache.gather_table([0, 1], [4, 4], model.attention_dtype)
    positions = torch.tensor([[3], [3]], device="cuda")
    args = (torch.tensor([5, 6], device="cuda"), positions, cache.pool, index.gather(1, positions), index, bias[:, None])
    with torch.inference_mode():
        model.decode_step(*args)  # warm caches (absorbed weights) first
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.decode_step(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")


FP8_SIZES = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=256)  # whole 128x128 blocks


@pytest.fixture(scope="module")
def fp8_ready_checkpoint(tmp_path_factory):
    from checkpoints import make_checkpoint

    path = tmp_path_factory.mktemp("fp8-ready")
    make_checkpoint(path, "v3", seed=5, **FP8_SIZES)
    return path


def test_fp8_experts_stay_within_a_bound_of_bf16(fp8_ready_checkpoint):
    """64 greedy bf16 tokens, then both models score the whole sequence (teacher forcing): the
    model with FP8 experts (routed and shared, as DeepSeek's FP8 release stores them) picks the
    same token at most positions and its log-probabilities stay within a bound of bf16's.
    Measured on this random tiny model: 0.83 agreement, max |diff| 0.62; rounding the expert
    inputs through e4m3 in PyTorch alone gives the same error, so it is the quantisation, not
    the kernels (see the next test). Free-running decode is reported alongside."""
    bf16 = load_model(fp8_ready_checkpoint, dtype="bfloat16", device="cuda", fp8_experts=False)
    fp8 = load_model(fp8_ready_checkpoint, dtype="bfloat16", device="cuda", fp8_experts=True)
    assert all(b.ffn.experts.is_fp8 for b in fp8.layers if hasattr(b.ffn, "experts"))
    prompt = (5, 17, 33, 2, 250, 101, 7, 64)
    (dense,) = Engine(bf16, cache_tokens=256, max_batch=1).generate([GenerationRequest(prompt, 64)])
    (quantised,) = Engine(fp8, cache_tokens=256, max_batch=1).generate([GenerationRequest(prompt, 64)])
    sequence = torch.tensor(prompt + tuple(dense.tokens[:-1]), device="cuda")
    scores = []
    for model in (bf16, fp8):
        cache = model.new_cache(256)
        cache.allocate("s", len(sequence))
        scores.append(torch.log_softmax(model.prefill(sequence, cache, "s", all_logits=True)[len(prompt) - 1 :], -1))
    diff = (scores[0] - scores[1]).abs().max().item()
    forced = (scores[1].argmax(-1).cpu() == torch.tensor(dense.tokens)).float().mean().item()
    free = next((i for i, (a, b) in enumerate(zip(dense.tokens, quantised.tokens)) if a != b), 64)
    print(f"fp8 vs bf16: max |logprob diff| {diff:.4f}, teacher-forced greedy agreement {forced:.3f} over 64, "
          f"free-running identical for {free}/64 tokens")
    assert forced >= 0.75
    assert diff < 1.0


def test_fp8_checkpoint_runs_its_experts_as_fp8_gemms(fp8_ready_checkpoint, tmp_path, monkeypatch):
    """An FP8 checkpoint keeps its experts FP8 on a capable GPU, and a MoE block's output equals
    a PyTorch reference: the dequantised block with each expert GEMM input rounded through the
    same 1x128 e4m3 quantisation (fp32 throughout, so the kernels' own error is what remains:
    measured 3.4e-3, several times below what the activation quantisation itself changes; the
    kernel's ~1e-4 per GEMM grows where an intermediate activation rounds to a neighbouring e4m3
    value)."""
    import argparse

    from services.cli import convert

    convert.run(argparse.Namespace(src=str(fp8_ready_checkpoint), dst=str(tmp_path / "fp8"), fp8=True))
    kept = load_model(tmp_path / "fp8", dtype="float32", device="cuda")  # auto: stays FP8
    assert kept.layers[1].ffn.experts.is_fp8 and kept.layers[1].ffn.experts.w13.dtype == torch.float8_e4m3fn
    reference = load_model(tmp_path / "fp8", dtype="float32", device="cuda", fp8_experts=False)
    x = torch.randn(1, 40, kept.cfg.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        got = kept.layers[1].ffn(x)
        unrounded = reference.layers[1].ffn(x)
        dense_project = cuda._project

        def rounded_through_e4m3(rows, w, scale, offsets, tokens):
            q, s = quantize_1x128(rows)
            return dense_project((q.float().view(len(q), -1, 128) * s[..., None]).view(q.shape), w, scale, offsets, tokens)

        monkeypatch.setattr(cuda, "_project", rounded_through_e4m3)
        want = reference.layers[1].ffn(x)
    rel = ((got - want).norm() / want.norm()).item()
    quantisation = ((unrounded - want).norm() / want.norm()).item()
    print(f"FP8 GEMMs vs PyTorch emulation of the same quantisation: relative error {rel:.2e} "
          f"(the activation quantisation itself: {quantisation:.2e})")
    assert rel < 1e-2 and rel < quantisation / 5
