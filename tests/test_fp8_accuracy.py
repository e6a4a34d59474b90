"""How much FP8 dispatch (e4m3, one scale per 128 channels; BF16 combine) costs in accuracy,
against FP32 dispatch on the tiny transformers-made checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.checkpoint import load_model
from model.generate import Engine, GenerationRequest
from model.moe import ExpertBank
from services.client import Client
from services.launcher.cluster import LocalCluster
from services.wire.codec import decode_hidden, encode_hidden

PROMPTS = [(1, 2, 3), (50, 60), (7,), (11, 12, 13, 14)]
STEPS = 64


class Fp8Wire(nn.Module):
    """The numerics of an FP8 dispatch, in process: hidden states quantised as the transport
    sends them, experts computed in fp32 at the shard, outputs returned in BF16."""

    def __init__(self, bank: ExpertBank):
        super().__init__()
        self.bank = bank

    def dispatch(self, x, ids, weights):
        wire, scales = encode_hidden(x, "fp8")
        return self.bank(decode_hidden(wire, scales, torch.float32), ids, weights).to(torch.bfloat16).float()

    def combine(self, out):
        return out


@pytest.fixture(scope="module")
def fp32_greedy(v3_checkpoint):
    engine = Engine(load_model(v3_checkpoint[0]), 2048, max_batch=8)
    return [s.tokens for s in engine.generate([GenerationRequest(p, STEPS) for p in PROMPTS])]


def test_fp8_dispatch_logit_error_and_teacher_forced_greedy_agreement(v3_checkpoint, fp32_greedy):
    path, _ = v3_checkpoint
    exact, fp8 = load_model(path), load_model(path)
    for block in fp8.layers:
        if isinstance(getattr(block.ffn, "experts", None), ExpertBank):
            block.ffn.experts = Fp8Wire(block.ffn.experts)
    worst, agree = 0.0, 0
    for prompt, tokens in zip(PROMPTS, fp32_greedy):
        full = torch.tensor(prompt + tuple(tokens))
        logits = []
        for model in (exact, fp8):
            cache = model.new_cache(256)
            cache.allocate("s", full.numel())
            logits.append(model.prefill(full, cache, "s", all_logits=True))
        worst = max(worst, (logits[0] - logits[1]).abs().max().item())
        agree += int((logits[1][len(prompt) - 1 : -1].argmax(-1) == torch.tensor(tokens)).sum())
    # Measured: max |logit error| 0.0031 (0.5% of the largest logit), agreement 255/256.
    assert worst <= 0.02
    assert agree / (STEPS * len(PROMPTS)) >= 0.95


@pytest.mark.cluster
def test_fp8_dispatch_through_a_cluster_agrees_with_fp32_dispatch(v3_checkpoint, fp32_greedy, tmp_path):
    path, _ = v3_checkpoint
    with LocalCluster(path, shards=2, replicas=1, attention_workers=1, dispatch_dtype="fp8", run_dir=tmp_path) as cluster:
        client = Client(cluster.gateway_endpoint, timeout=120)
        results = [client.generate(prompt_ids=p, max_new_tokens=STEPS, ignore_eos=True).tokens for p in PROMPTS]
    same = sum(a == b for got, want in zip(results, fp32_greedy) for a, b in zip(got, want))
    # Free-running greedy: a near-tie flipped by rounding changes everything after it, so this
    # counts position-wise agreement. Measured 0.78 here (one prompt diverges after 7 tokens).
    assert same / (STEPS * len(PROMPTS)) >= 0.6
