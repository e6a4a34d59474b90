"""Routing: group-limited top-k as each checkpoint method prescribes."""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.moe import Gate

BASE = dict(
    architectures=["DeepseekV3ForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
    moe_intermediate_size=4, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=4, q_lora_rank=None,
    qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=8, num_experts_per_tok=2,
    n_group=4, topk_group=2, max_position_embeddings=32, routed_scaling_factor=2.5,
)


def gate_for(**overrides) -> Gate:
    gate = Gate(ModelConfig.from_dict({**BASE, **overrides}))
    torch.nn.init.normal_(gate.weight)
    if gate.bias is not None:
        gate.bias.data.zero_()
    return gate


def test_masked_groups_never_outrank_valid_experts_when_biased_scores_are_negative():
    gate = gate_for()
    # sigmoid scores lie in (0, 1); a bias of -5 makes every biased score negative. Masking by
    # multiplying with zero would rank masked experts (0) above every valid one (< 0).
    gate.bias.data.fill_(-5.0)
    x = torch.randn(64, 8)
    ids, _ = gate(x)
    logits = x @ gate.weight.t()
    grouped = (logits.sigmoid() - 5.0).view(64, 4, 2)
    best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # [T, 2]
    chosen_groups = ids // 2
    for t in range(64):
        assert set(chosen_groups[t].tolist()) <= set(best_groups[t].tolist())


def test_weights_come_from_unbiased_scores_normalised_and_scaled():
    gate = gate_for()
    gate.bias.data = torch.linspace(-0.5, 0.5, 8)
    x = torch.randn(16, 8)
    ids, weights = gate(x)
    scores = (x @ gate.weight.t()).sigmoid()
    picked = scores.gather(1, ids)
    assert torch.allclose(weights, picked / picked.sum(-1, keepdim=True) * 2.5, atol=1e-6)


def test_bias_changes_selection_but_not_the_weight_formula():
    gate = gate_for(n_group=1, topk_group=1)
    x = torch.randn(32, 8)
    gate.bias.data = torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0])  # forces experts 0 and 1
    ids, _ = gate(x)
    assert sorted(set(ids.flatten().tolist())) == [0, 1]


def test_v2_greedy_softmax_without_normalisation():
    gate = gate_for(
        architectures=["DeepseekV2ForCausalLM"], topk_method="greedy", scoring_func="softmax",
        norm_topk_prob=False, routed_scaling_factor=1.0,
    )
    x = torch.randn(8, 8)
    ids, weights = gate(x)
    probs = (x @ gate.weight.t()).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(ids.sort(-1).values, top.indices.sort(-1).values)
    assert torch.allclose(weights.sort(-1).values, top.values.sort(-1).values, atol=1e-6)


def test_v2_group_limited_greedy_uses_each_groups_best_expert():
    gate = gate_for(
        architectures=["DeepseekV2ForCausalLM"], topk_method="group_limited_greedy", scoring_func="softmax",
        norm_topk_prob=False, n_group=4, topk_group=1,
    )
    x = torch.randn(32, 8)
    ids, _ = gate(x)
    probs = (x @ gate.weight.t()).softmax(-1).view(32, 4, 2)
    best_group = probs.amax(-1).argmax(-1)
    assert torch.equal(ids // 2, best_group[:, None].expand(-1, 2))
