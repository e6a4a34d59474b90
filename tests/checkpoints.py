"""Tiny random DeepSeek checkpoints written by `transformers` itself: the correctness oracle."""

from __future__ import annotations

from pathlib import Path

import torch

from services.cli.demo_model import DEMO_CONFIG

# V3-style (sigmoid + correction bias, 4 groups, YaRN): the same config `make run`'s demo model uses.
V3_TINY = DEMO_CONFIG

V2_LITE_TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def make_checkpoint(path: Path, kind: str = "v3", seed: int = 0, shard_size: str | None = None, **overrides):
    """Write a random `transformers` model to `path`; returns the HF model (fp32, eval mode)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    if kind == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**V3_TINY, **overrides}))
        with torch.no_grad():  # a non-zero correction bias exercises biased selection
            for layer in model.model.layers[V3_TINY["first_k_dense_replace"] :]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**{**V2_LITE_TINY, **overrides}))
    model.eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model
