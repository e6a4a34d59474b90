"""GPU fast path (issue 7): CUDA-graph decode, grouped-GEMM experts, bf16 bounds. Skipped
without a CUDA device; run on one with `pytest -m gpu tests/test_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import load_model
from model.generate import Engine, GenerationRequest
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


def generate(model, cuda_graphs: bool):
    engine = Engine(model, cache_tokens=1024, max_batch=4, cuda_graphs=cuda_graphs)
    return engine.generate([GenerationRequest(p, n) for p, n in zip(PROMPTS, NEW_TOKENS)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replayed_greedy_tokens_equal_eager_tokens(checkpoint, dtype):
    path, _ = checkpoint
    model = load_model(path, dtype=dtype, device="cuda")
    eager, graphed = generate(model, False), generate(model, True)
    for a, b in zip(eager, graphed):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-3


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
        bank.grouped = True
        grouped = bank(x, ids, weights)
        bank.grouped = False
        loop = bank(x, ids, weights)
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
