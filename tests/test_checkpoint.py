"""Config parsing, subset loading, FP8 checkpoints and the errors a user sees."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import Checkpoint, load_expert_banks, load_model
from model.config import ModelConfig
from model.errors import CheckpointError, ConfigError
from model.generate import Engine, GenerationRequest
from services.cli import main as moe


def test_deepseek_rope_keys_and_transformers_rope_parameters_agree(v3_checkpoint):
    path, _ = v3_checkpoint
    raw = json.loads((path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    deepseek_style = {**raw, "rope_theta": params.pop("rope_theta"), "rope_scaling": {**params, "type": params.pop("rope_type")}}
    assert ModelConfig.from_dict(deepseek_style).rope == ModelConfig.from_dict(json.loads((path / "config.json").read_text())).rope
    assert ModelConfig.from_dict(deepseek_style).rope.kind == "yarn"


def test_unknown_architecture_and_missing_key_fail_with_names(tmp_path, v3_checkpoint):
    raw = json.loads((v3_checkpoint[0] / "config.json").read_text())
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        ModelConfig.from_dict({**raw, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    del raw["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_dict(raw)


def test_yarn_mscale_changes_the_softmax_scale(v3_checkpoint):
    cfg = ModelConfig.from_model_dir(v3_checkpoint[0])
    assert cfg.softmax_scale > cfg.qk_head_dim**-0.5  # factor 4, mscale_all_dim 1 -> x (1 + 0.1 ln 4)^2


def test_non_expert_subset_reads_no_expert_tensor(v3_checkpoint, monkeypatch):
    path, _ = v3_checkpoint
    read = []
    original = Checkpoint.raw
    monkeypatch.setattr(Checkpoint, "raw", lambda self, key: read.append(key) or original(self, key))
    model = load_model(path, with_routed_experts=False)
    assert read and not any(".experts." in key for key in read)
    assert model.layers[1].ffn.experts is None and model.layers[1].ffn.shared is not None


def test_expert_subset_opens_only_the_files_holding_those_experts(v3_checkpoint):
    path, hf = v3_checkpoint
    ckpt_files = {p.name for p in Checkpoint(path).file_of.values()}
    assert len(ckpt_files) > 2, "fixture should be sharded"
    banks = load_expert_banks(path, {2: [5, 6]})
    assert list(banks) == [2] and banks[2].expert_ids == [5, 6]
    experts = hf.model.layers[2].mlp.experts  # transformers packs [E, 2I, D] and [E, D, I]
    assert torch.equal(banks[2].w13[0], experts.gate_up_proj[5])
    assert torch.equal(banks[2].w2[1], experts.down_proj[6])
    x = torch.randn(4, 64)
    ids = torch.tensor([[5, 6], [6, -1], [1, 5], [0, 1]])
    weights = torch.rand(4, 2)
    out = banks[2](x, ids, weights)
    assert torch.equal(out[3], torch.zeros(64))  # experts 0 and 1 are not held here


def test_expert_subset_rejects_dense_layer_and_bad_ids(v3_checkpoint):
    with pytest.raises(CheckpointError, match="not a MoE layer"):
        load_expert_banks(v3_checkpoint[0], {0: [1]})
    with pytest.raises(CheckpointError, match="out of range"):
        load_expert_banks(v3_checkpoint[0], {1: [99]})


@pytest.fixture
def broken_copy(tmp_path, v2_checkpoint):
    dst = tmp_path / "ckpt"
    shutil.copytree(v2_checkpoint[0], dst)
    return dst


def test_missing_file_and_missing_key_name_the_culprit(broken_copy):
    tensors = load_file(broken_copy / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, broken_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        load_model(broken_copy)
    (broken_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(broken_copy)


def test_wrong_shape_and_unsupported_dtype_name_the_tensor(broken_copy):
    tensors = load_file(broken_copy / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, broken_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape \(3,\)"):
        load_model(broken_copy)
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    save_file(tensors, broken_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*int8"):
        load_model(broken_copy)


def test_mtp_layer_weights_in_checkpoint_are_skipped(broken_copy):
    tensors = load_file(broken_copy / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.ones(64, 128)
    tensors["model.layers.3.self_attn.kv_b_proj.weight"] = torch.ones(2, 2)
    save_file(tensors, broken_copy / "model.safetensors")
    raw = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps({**raw, "num_nextn_predict_layers": 1}))
    assert load_model(broken_copy).cfg.num_hidden_layers == 3


def test_fp8_checkpoint_matches_its_dequantised_weights_and_stays_close(tmp_path, v3_checkpoint):
    src, _ = v3_checkpoint
    dst = tmp_path / "fp8"
    assert moe(["convert", "--fp8", str(src), str(dst)]) == 0
    stored = Checkpoint(dst)
    assert stored.raw("model.layers.1.self_attn.q_a_proj.weight").dtype == torch.float8_e4m3fn
    assert stored.raw("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv").dtype == torch.float32
    assert stored.raw("model.layers.1.mlp.gate.weight").dtype == torch.float32  # router stays fp32
    fp8_model, original = load_model(dst, dtype="float32"), load_model(src)

    # Reference: the original model with every quantised weight replaced by its dequantised value.
    reference = load_model(src)
    fp8_state = fp8_model.state_dict()
    reference.load_state_dict(fp8_state)
    prompt = torch.arange(12) * 3 % 320
    logits = {}
    for name, model in [("fp8", fp8_model), ("reference", reference), ("original", original)]:
        cache = model.new_cache(32)
        cache.allocate("s", 12)
        logits[name] = model.prefill(prompt, cache, "s", all_logits=True)
    assert (logits["fp8"] - logits["reference"]).abs().max().item() <= 1e-5
    assert (logits["fp8"] - logits["original"]).abs().max().item() > 0  # it really was quantised

    # Greedy agreement, teacher-forced: along the original model's greedy continuation, how often
    # does the FP8 model pick the same next token? (Free-running sequences diverge for good at
    # the first near-tie, which says little about quantisation error on a random tiny model.)
    steps, agree, total = 32, 0, 0
    for prompt in [(1, 2, 3), (50, 60), (7,)]:
        (seq,) = Engine(original, 512).generate([GenerationRequest(prompt, steps)])
        full = torch.tensor(prompt + tuple(seq.tokens))
        cache = fp8_model.new_cache(128)
        cache.allocate("s", full.numel())
        fp8_choice = fp8_model.prefill(full, cache, "s", all_logits=True)[len(prompt) - 1 : -1].argmax(-1)
        agree += int((fp8_choice == torch.tensor(seq.tokens)).sum())
        total += steps
    # Measured 0.86 (83/96): this random model's logits span only about +-0.6, so near-ties are
    # common; the bound leaves room for a few more of them.
    assert agree / total >= 0.75
    relative = (logits["fp8"] - logits["original"]).abs().max() / logits["original"].abs().max()
    assert relative.item() < 0.1  # measured 0.031


def test_convert_refuses_an_fp8_source(tmp_path, v3_checkpoint, capsys):
    dst = tmp_path / "fp8"
    assert moe(["convert", "--fp8", str(v3_checkpoint[0]), str(dst)]) == 0
    assert moe(["convert", "--fp8", str(dst), str(tmp_path / "again")]) == 2
    assert "already quantised" in capsys.readouterr().err


def test_converted_weights_are_readable_by_other_users(tmp_path, v3_checkpoint):
    # servers often run as another user than the one who converted (a pod's uid, say)
    dst = tmp_path / "fp8"
    assert moe(["convert", "--fp8", str(v3_checkpoint[0]), str(dst)]) == 0
    weights = list(dst.glob("*.safetensors"))
    assert weights and all(path.stat().st_mode & 0o044 == 0o044 for path in weights)


def test_convert_to_a_place_that_cannot_be_written_is_one_line(tmp_path, v3_checkpoint, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert moe(["convert", "--fp8", str(v3_checkpoint[0]), str(blocker / "fp8")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moe convert: cannot write {blocker / 'fp8'}: ") and "\n" not in err
