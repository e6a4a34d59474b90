"""Our model against transformers' DeepseekV3/V2ForCausalLM on the same checkpoint (fp32)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.checkpoint import load_model
from model.generate import Engine, GenerationRequest
from model.kernels import cpu, cuda
from model.moe import ExpertBank

TOLERANCE = 1e-4


def hf_greedy(hf_model, prompt: list[int], steps: int) -> list[int]:
    out = hf_model.generate(
        torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(params=["v3", "v2"])
def checkpoint(request, v3_checkpoint, v2_checkpoint):
    return v3_checkpoint if request.param == "v3" else v2_checkpoint


def test_prefill_logits_match_transformers(checkpoint):
    path, hf = checkpoint
    model = load_model(path)
    prompt = torch.randint(0, model.cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(64)
    cache.allocate("s", 20)
    ours = model.prefill(prompt, cache, "s", all_logits=True)
    with torch.no_grad():
        ref = hf(prompt[None]).logits[0]
    assert (ours - ref).abs().max().item() <= TOLERANCE


def test_every_decode_step_through_latent_cache_matches_transformers(checkpoint):
    path, hf = checkpoint
    model = load_model(path)
    tokens = [5, 17, 2, 99, 42]
    cache = model.new_cache(128)
    cache.allocate("s", 64)
    logits = model.prefill(torch.tensor(tokens), cache, "s")[-1]
    for _ in range(12):
        tokens.append(int(logits.argmax()))
        logits = model.decode(torch.tensor(tokens[-1:]), cache, ["s"], [len(tokens) - 1])[0]
        with torch.no_grad():
            ref = hf(torch.tensor([tokens])).logits[0, -1]
        assert (logits - ref).abs().max().item() <= TOLERANCE


def test_absorbed_path_agrees_with_naive_path(v3_checkpoint):
    path, _ = v3_checkpoint
    model = load_model(path)
    prompt = torch.arange(30) * 7 % model.cfg.vocab_size
    cache = model.new_cache(128)
    cache.allocate("naive", 30)
    cache.allocate("absorbed", 30)
    naive = model.prefill(prompt, cache, "naive", all_logits=True)
    absorbed = model.extend(prompt, cache, "absorbed", 0, all_logits=True)
    assert (naive - absorbed).abs().max().item() <= 1e-5
    # both paths leave the same latents in the cache
    a, b = cache.slots("naive", 0, 30), cache.slots("absorbed", 0, 30)
    assert torch.allclose(cache.pool[:, a], cache.pool[:, b], atol=1e-6)


def test_chunked_prefill_continues_a_sequence(v3_checkpoint):
    path, hf = v3_checkpoint
    model = load_model(path)
    prompt = torch.arange(24) * 5 % model.cfg.vocab_size
    cache = model.new_cache(64)
    cache.allocate("s", 24)
    model.prefill(prompt[:10], cache, "s")
    tail = model.extend(prompt[10:], cache, "s", 10, all_logits=True)
    with torch.no_grad():
        ref = hf(prompt[None]).logits[0, 10:]
    assert (tail - ref).abs().max().item() <= TOLERANCE


def test_greedy_tokens_match_transformers_over_32_steps(checkpoint):
    path, hf = checkpoint
    model = load_model(path)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12], [40]]
    engine = Engine(model, cache_tokens=512, max_batch=4)
    seqs = engine.generate([GenerationRequest(tuple(p), 32) for p in prompts])
    for prompt, seq in zip(prompts, seqs):
        assert seq.tokens == hf_greedy(hf, prompt, 32)
        assert seq.finish_reason == "length"


def test_batched_decode_equals_one_at_a_time(v3_checkpoint):
    path, _ = v3_checkpoint
    model = load_model(path)
    prompts = [(3, 4, 5), (9,), (11, 12, 13, 14, 15, 16, 17)]
    together = Engine(model, 512, max_batch=8).generate([GenerationRequest(p, 10) for p in prompts])
    for prompt, seq in zip(prompts, together):
        (alone,) = Engine(model, 512, max_batch=1).generate([GenerationRequest(prompt, 10)])
        assert alone.tokens == seq.tokens
        assert max(abs(a - b) for a, b in zip(alone.logprobs, seq.logprobs)) <= 1e-5


def test_bf16_model_runs_close_to_fp32(v3_checkpoint):
    path, _ = v3_checkpoint
    fp32, bf16 = load_model(path), load_model(path, dtype="bfloat16")
    prompt = torch.arange(16) % fp32.cfg.vocab_size
    results = []
    for model in (fp32, bf16):
        cache = model.new_cache(32)
        cache.allocate("s", 16)
        results.append(model.prefill(prompt, cache, "s", all_logits=True))
    assert bf16.embed.weight.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits; logits here are O(1): 0.1 is a loose but meaningful bound
    assert (results[0] - results[1]).abs().max().item() < 0.1


def test_grouped_gemm_expert_path_equals_expert_loop(v3_checkpoint):
    """The sync-free grouped path (what CUDA graphs capture) against the per-expert loop, on a
    bank holding a subset of experts so not-held ids are skipped by both."""
    from model.checkpoint import load_expert_banks

    path, _ = v3_checkpoint
    (bank,) = load_expert_banks(path, {1: [0, 2, 5, 7]}).values()
    x = torch.randn(9, bank.w13.shape[2], generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 8, (9, 3), generator=torch.Generator().manual_seed(1))
    weights = torch.rand(9, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loop = bank(x, ids, weights)
        grouped = cuda.grouped_experts(bank, x, ids, weights)
    assert bank.compute is cpu.sorted_experts
    assert loop.abs().max() > 0
    assert torch.allclose(grouped, loop, atol=1e-5, rtol=1e-5)


def test_cpu_expert_paths_equal_a_per_token_reference(v3_checkpoint):
    """Both eager CPU paths, one GEMM pair per expert (one thread, or few experts hit; weight-left
    for experts with few rows, F.linear for busy ones) and batched GEMMs over all held experts
    with the busiest experts' extra rows done one by one (two threads, most experts hit), the
    compiled graphs' pair-by-pair products and the bank's reference, against each (token, expert)
    pair computed on its own."""
    from model.checkpoint import load_expert_banks

    path, _ = v3_checkpoint
    (bank,) = load_expert_banks(path, {1: [0, 2, 5, 7]}).values()
    g = torch.Generator().manual_seed(3)

    def reference(x, ids, weights):
        out = torch.zeros_like(x)
        for t, k in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
            expert = int(ids[t, k])
            if expert in bank.expert_ids:
                slot = bank.expert_ids.index(expert)
                gate, up = (bank.w13[slot] @ x[t]).split(bank.inter_dim)
                out[t] += weights[t, k] * (bank.w2[slot] @ (F.silu(gate) * up))
        return out

    sparse_ids = torch.tensor([[2, 6, 1]])  # one token: one held expert of four
    few_ids = torch.tensor([[0, 2, 5], [2, 5, 7], [0, 7, 1], [5, 0, 3], [2, 7, 4], [0, 5, 6]])  # 3 or 4 rows each
    skewed_ids = torch.stack([torch.tensor([0, 1 + t % 3, 5 if t % 4 else 7]) for t in range(20)])  # expert 0 gets all 20
    threads = torch.get_num_threads()
    try:
        for n_threads, ids in itertools.product((1, 2), (sparse_ids, few_ids, skewed_ids)):
            torch.set_num_threads(n_threads)  # the batched path runs only with more than one thread
            x = torch.randn(ids.shape[0], bank.w13.shape[2], generator=g)
            weights = torch.rand(ids.shape, generator=g)
            with torch.no_grad():
                want = reference(x, ids, weights)
                for got in (bank(x, ids, weights), cpu.pair_experts(bank, x, ids, weights), bank.reference(x, ids, weights)):
                    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
            assert want.abs().max() > 0
    finally:
        torch.set_num_threads(threads)


def test_shared_experts_absorbed_into_the_bank_compute_the_same_moe(v3_checkpoint):
    """Shared experts served as always-on slots of the grouped GEMMs (the GPU layout) give the
    MoE block's output of a separate shared MLP."""
    from model.checkpoint import load_model

    path, _ = v3_checkpoint
    separate, absorbed = load_model(path), load_model(path)
    absorbed.layers[1].ffn.absorb_shared_into_experts()
    bank = absorbed.layers[1].ffn.experts
    assert absorbed.layers[1].ffn.shared is None and bank.shared_slots == 1
    assert bank.compute is ExpertBank.reference  # the dense CPU loop knows no shared slots
    x = torch.randn(2, 7, separate.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, by_reference = separate.layers[1].ffn(x), absorbed.layers[1].ffn(x)
        kernels.install(absorbed, "cpu")
        assert bank.compute is cuda.grouped_experts
        got = absorbed.layers[1].ffn(x)
    assert torch.allclose(by_reference, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_decode_gather_table_masks_padding_of_shorter_sequences():
    from model.kv_cache import LatentKVCache

    cache = LatentKVCache(1, 64, 4, torch.float32, block_size=4)
    cache.allocate("a", 6)
    cache.allocate("b", 3)
    index, bias = cache.gather_table(["a", "b"], [6, 2], torch.float32)
    assert index.shape == bias.shape == (2, 6)
    assert torch.equal(index[0], cache.slots("a", 0, 6)) and torch.equal(index[1, :2], cache.slots("b", 0, 2))
    assert (bias[0] == 0).all() and (bias[1, :2] == 0).all() and torch.isinf(bias[1, 2:]).all()
    _, valid = cache.context(["a", "b"], [6, 2])  # the boolean form stays as it was
    assert valid.tolist() == [[True] * 6, [True, True] + [False] * 4]


def test_lm_head_prepacked_on_cpu_matches_linear_and_follows_weight_writes():
    """The CPU head runs on a prepacked copy of its weight: it must agree with F.linear, in any
    batch shape, and repack after an in-place weight write rather than serve stale logits."""
    head, bf16 = cpu.PackedLMHead(64, 300, bias=False), cpu.PackedLMHead(64, 300, bias=False).to(torch.bfloat16)
    x = torch.randn(5, 1, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(head(x), torch.nn.functional.linear(x, head.weight), atol=1e-5)
        head.weight.mul_(2)
        assert torch.allclose(head(x[:1]), torch.nn.functional.linear(x[:1], head.weight), atol=1e-5)
        out = bf16(x.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (5, 1, 300)


def test_absorbed_attention_weights_are_kept_until_wkv_b_changes(v3_checkpoint):
    """Decoders prepare the absorbed weights when built; a frozen compiled graph holds them as
    constants, so preparing again (a new engine or decoder on the same model) must keep the same
    tensors, and only a write to wkv_b may rebuild them."""
    model = load_model(v3_checkpoint[0])
    model.prepare_decode()
    kept = [block.attn.absorbed for block in model.layers]
    model.prepare_decode()
    assert all(block.attn.absorbed is prior for block, prior in zip(model.layers, kept))
    with torch.no_grad():
        model.layers[0].attn.wkv_b.weight.mul_(2)
    model.prepare_decode()
    assert model.layers[0].attn.absorbed is not kept[0] and model.layers[1].attn.absorbed is kept[1]
    assert torch.equal(model.layers[0].attn.absorbed[0], 2 * kept[0][0])
