"""Parameter counts and KV bytes against real checkpoints and DeepSeek's published figures.

Published figures are rounded to whole billions (671B total, 37B activated, 685B with MTP, from
the DeepSeek-V3 model card), so a count is right when it lies within half a billion of them; the
685B total is 671B + 14B, two roundings, hence one billion.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from safetensors import safe_open

from model import accounting
from model.config import ModelConfig
from model.presets import PRESETS, preset_path

B = 1e9


@pytest.fixture(scope="module")
def v3():
    return ModelConfig.from_file(preset_path("deepseek-v3"))


def test_presets_parse_with_their_published_shapes(v3):
    assert set(PRESETS) == {"deepseek-v3", "deepseek-v2-lite"}
    assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (v3.n_group, v3.topk_group, v3.kv_lora_rank, v3.q_lora_rank, v3.num_nextn_predict_layers) == (8, 4, 512, 1536, 1)
    assert v3.rope.kind == "yarn" and v3.rope.factor == 40
    lite = ModelConfig.from_file(preset_path("deepseek-v2-lite"))
    assert lite.q_lora_rank is None and lite.topk_method == "greedy" and lite.n_shared_experts == 2


@pytest.mark.parametrize("fixture", ["v3_checkpoint", "v2_checkpoint"])
def test_tensor_names_and_shapes_match_a_checkpoint_written_by_transformers(fixture, request):
    path, _ = request.getfixturevalue(fixture)
    on_disk = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            on_disk.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    cfg = ModelConfig.from_model_dir(path)
    ours = {t.name: t.shape for t in accounting.model_tensors(cfg)}
    assert ours == on_disk
    assert accounting.parameter_counts(cfg).total == sum(math.prod(shape) for shape in on_disk.values())


def test_deepseek_v3_counts_match_the_published_671b_37b_685b(v3):
    counts = accounting.parameter_counts(v3)
    assert abs(counts.total - 671 * B) <= 0.5 * B
    assert abs(counts.activated - 37 * B) <= 0.5 * B
    assert abs(counts.total_with_mtp - 685 * B) <= 1.0 * B
    assert abs(counts.mtp - 14 * B) <= 1.0 * B
    # The MTP module's stored copies of embedding and head are the only shared parameters.
    assert counts.mtp - counts.mtp_unique == 2 * v3.vocab_size * v3.hidden_size


def test_mtp_module_is_a_moe_layer_plus_projection_norms_and_head(v3):
    names = {t.name: t.shape for t in accounting.mtp_tensors(v3, 0)}
    assert names["model.layers.61.eh_proj.weight"] == (7168, 2 * 7168)
    assert names["model.layers.61.mlp.experts.255.down_proj.weight"] == (7168, 2048)
    assert {"model.layers.61.enorm.weight", "model.layers.61.hnorm.weight", "model.layers.61.shared_head.head.weight"} <= set(names)


def test_deepseek_v2_lite_total_matches_the_published_15_7b():
    counts = accounting.parameter_counts(ModelConfig.from_file(preset_path("deepseek-v2-lite")))
    assert abs(counts.total - 15.7 * B) <= 0.05 * B  # published to one decimal
    assert counts.mtp == 0


def test_latent_kv_cache_is_70272_bytes_per_token_for_deepseek_v3(v3):
    assert accounting.kv_bytes_per_token_per_layer(v3) == (512 + 64) * 2
    assert accounting.kv_bytes_per_token(v3) == 70_272
    # MLA caches one latent per layer; full keys and values, even for 8 KV heads, cost more.
    assert accounting.kv_bytes_per_token(v3) < accounting.gqa_kv_bytes_per_token(v3) < accounting.mha_kv_bytes_per_token(v3)
    assert accounting.mha_kv_bytes_per_token(v3) == 61 * 128 * (192 + 128) * 2


def test_gqa_comparison_needs_more_attention_heads_than_gqa_kv_heads(v3):
    def gqa(heads: int) -> int | None:
        return accounting.gqa_kv_bytes_per_token(dataclasses.replace(v3, num_attention_heads=heads))

    assert gqa(4) is None and gqa(accounting.GQA_KV_GROUPS) is None
    assert gqa(accounting.GQA_KV_GROUPS + 1) == 61 * accounting.GQA_KV_GROUPS * (192 + 128) * 2


def test_fp8_checkpoints_store_one_byte_per_weight_plus_block_scales(v3, v3_checkpoint):
    assert accounting.linear_weight_bytes(v3) == pytest.approx(1 + 4 / 16384)
    assert accounting.linear_weight_bytes(ModelConfig.from_model_dir(v3_checkpoint[0])) == 4  # fp32 fixture
