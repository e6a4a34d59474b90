"""Loading HF-format DeepSeek safetensors checkpoints: whole, non-expert only, or chosen experts.

Tensors are read one by one from memory-mapped safetensors files, so loading a subset never
reads the rest of the files. FP8 weights (float8_e4m3fn + `weight_scale_inv`) are dequantised
into the model dtype. Layers past `num_hidden_layers` (MTP modules) are never requested.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from model import kernels
from model.config import ModelConfig
from model.errors import CheckpointError
from model.fp8 import BLOCK as FP8_BLOCK
from model.fp8 import dequantize_weight, quantize_weight
from model.moe import ExpertBank
from model.transformer import Transformer

log = logging.getLogger("moe.model")

# Checkpoint name segment -> our module name segment (DeepSeek's convert.py, as one table).
RENAMES = {
    "embed_tokens": "embed",
    "lm_head": "head",
    "self_attn": "attn",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "mlp": "ffn",
    "shared_experts": "shared",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "e_score_correction_bias": "bias",
}
CHECKPOINT_NAMES = {ours: theirs for theirs, ours in RENAMES.items()}
FP32_PARAMS = re.compile(r"\.gate\.(weight|bias)$")  # router math stays fp32, as in the reference
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOADABLE_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn}


def checkpoint_name(ours: str) -> str:
    """Our parameter name -> the checkpoint's key (`layers.3.attn.wq_a.weight` ->
    `model.layers.3.self_attn.q_a_proj.weight`)."""
    parts = [CHECKPOINT_NAMES.get(p, p) for p in ours.split(".")]
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def expert_key(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def resolve_dtype(cfg: ModelConfig, dtype: str | torch.dtype | None) -> torch.dtype:
    name = dtype if dtype is not None else cfg.torch_dtype
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"dtype '{name}' is not supported (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


class Checkpoint:
    """Key -> file index over one or many safetensors files, with lazy per-file handles."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"model directory not found: {self.dir}")
        index_file = self.dir / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_file} is malformed: {err}") from None
            self.file_of = {key: self.dir / name for key, name in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files or model.safetensors.index.json in {self.dir}")
            self.file_of = {}
            for path in files:
                with self._open_file(path) as handle:
                    self.file_of.update({key: path for key in handle.keys()})
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _open_file(path: Path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {err}") from None

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def _handle(self, key: str):
        if key not in self.file_of:
            raise CheckpointError(f"checkpoint in {self.dir} has no tensor '{key}'")
        path = self.file_of[key]
        if path not in self._handles:
            self._handles[path] = self._open_file(path)
        return self._handles[path]

    def raw(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def is_fp8(self, key: str) -> bool:
        """Whether `key` is stored as float8_e4m3fn, read from the file header alone."""
        return self._handle(key).get_slice(key).get_dtype() == "F8_E4M3"

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Read one tensor, check its shape, dequantise FP8, cast to `dtype`."""
        tensor = self.raw(key)
        if tensor.dtype not in LOADABLE_DTYPES:
            raise CheckpointError(f"tensor '{key}' has dtype {tensor.dtype}, which this runtime cannot load")
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"tensor '{key}' has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if tensor.dtype == torch.float8_e4m3fn:
            scale_key = key + "_scale_inv"
            if scale_key not in self:
                raise CheckpointError(f"FP8 tensor '{key}' has no '{scale_key}' next to it")
            try:
                return dequantize_weight(tensor, self.raw(scale_key), dtype)
            except ValueError as err:
                raise CheckpointError(f"'{scale_key}': {err}") from None
        return tensor.to(dtype)


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, nn.Parameter(value, requires_grad=False))


def fp8_experts_possible(cfg: ModelConfig, device: str | torch.device) -> tuple[bool, str]:
    """Whether routed experts can stay FP8 on `device`, and why not."""
    from model.kernels.fp8_gemm import fp8_grouped_mm_available

    if not fp8_grouped_mm_available(torch.device(device)):
        return False, f"{device} has no FP8 grouped GEMM (needs Triton and a CUDA GPU of compute capability 8.9+)"
    if cfg.hidden_size % FP8_BLOCK or cfg.moe_intermediate_size % FP8_BLOCK:
        return False, f"hidden_size and moe_intermediate_size must be multiples of {FP8_BLOCK} for FP8 experts"
    return True, ""


def _fp8_expert_weight(ckpt: Checkpoint, key: str, shape: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert projection as (float8_e4m3fn [N, K], block scales [N/128, K/128]): taken as
    stored from an FP8 checkpoint, quantised from a dense one."""
    if not ckpt.is_fp8(key):
        return quantize_weight(ckpt.get(key, shape, torch.float32).to(device))
    raw = ckpt.raw(key)
    if tuple(raw.shape) != shape:
        raise CheckpointError(f"tensor '{key}' has shape {tuple(raw.shape)}, expected {shape}")
    if key + "_scale_inv" not in ckpt:
        raise CheckpointError(f"FP8 tensor '{key}' has no '{key}_scale_inv' next to it")
    scale = ckpt.raw(key + "_scale_inv")
    expected = (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
    if tuple(scale.shape) != expected:
        raise CheckpointError(f"'{key}_scale_inv' has shape {tuple(scale.shape)}, expected {expected}")
    return raw.to(device), scale.float().to(device)


def _load_bank_fp8(ckpt: Checkpoint, bank: ExpertBank, layer: int, dim: int, device) -> None:
    inter = bank.inter_dim
    w13, s13, w2, s2 = [], [], [], []
    for expert in bank.expert_ids:
        gate = _fp8_expert_weight(ckpt, expert_key(layer, expert, "gate_proj"), (inter, dim), device)
        up = _fp8_expert_weight(ckpt, expert_key(layer, expert, "up_proj"), (inter, dim), device)
        down = _fp8_expert_weight(ckpt, expert_key(layer, expert, "down_proj"), (dim, inter), device)
        w13.append(torch.cat([gate[0], up[0]]))
        s13.append(torch.cat([gate[1], up[1]]))
        w2.append(down[0])
        s2.append(down[1])
    bank.keep_fp8(torch.stack(w13), torch.stack(s13), torch.stack(w2), torch.stack(s2))


def _load_bank(ckpt: Checkpoint, bank: ExpertBank, layer: int, dim: int, dtype: torch.dtype, device) -> None:
    inter = bank.inter_dim
    w13 = torch.empty(len(bank.expert_ids), 2 * inter, dim, dtype=dtype, device=device)
    w2 = torch.empty(len(bank.expert_ids), dim, inter, dtype=dtype, device=device)
    for slot, expert in enumerate(bank.expert_ids):
        w13[slot, :inter] = ckpt.get(expert_key(layer, expert, "gate_proj"), (inter, dim), dtype)
        w13[slot, inter:] = ckpt.get(expert_key(layer, expert, "up_proj"), (inter, dim), dtype)
        w2[slot] = ckpt.get(expert_key(layer, expert, "down_proj"), (dim, inter), dtype)
    bank.w13 = nn.Parameter(w13, requires_grad=False)
    bank.w2 = nn.Parameter(w2, requires_grad=False)


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    with_routed_experts: bool = True,
    fp8_experts: bool | None = None,
) -> Transformer:
    """Build the model from a checkpoint. Without routed experts, MoE blocks hold only their gate
    and shared experts (an attention worker's share of the weights).

    fp8_experts: keep the routed experts in FP8 with 128x128 block scales and run them with FP8
    GEMMs (quantising dense checkpoints at load); None (default) does so when the checkpoint's
    experts are FP8 and the device can, and dequantises otherwise."""
    cfg = ModelConfig.from_model_dir(model_dir)
    dtype = resolve_dtype(cfg, dtype)
    ckpt = Checkpoint(model_dir)
    fp8_experts = with_routed_experts and _resolve_fp8_experts(ckpt, cfg, device, fp8_experts)
    with torch.device("meta"):
        model = Transformer(cfg, with_routed_experts)
    params = dict(model.named_parameters())
    loaded_bytes, current_layer = 0, -1
    for name, param in params.items():
        if name.endswith((".w13", ".w2")) and ".experts." in name:
            continue  # expert banks load per expert below
        key = checkpoint_name(name)
        if key == "lm_head.weight" and key not in ckpt and cfg.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        target = torch.float32 if FP32_PARAMS.search(name) else dtype
        value = ckpt.get(key, tuple(param.shape), target).to(device)
        loaded_bytes += value.numel() * value.element_size()
        _assign(model, name, value)
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        if layer != current_layer and layer >= 0:
            current_layer = layer
            log.info("loading layer %d/%d (%.1f MB so far)", layer + 1, cfg.num_hidden_layers, loaded_bytes / 2**20)
    for block in model.layers:
        experts = getattr(block.ffn, "experts", None)
        if isinstance(experts, ExpertBank) and fp8_experts:
            _load_bank_fp8(ckpt, experts, block.layer, cfg.hidden_size, device)
        elif isinstance(experts, ExpertBank):
            _load_bank(ckpt, experts, block.layer, cfg.hidden_size, dtype, device)
    model.rotary = type(model.rotary)(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_interleave).to(device)
    for module in model.modules():
        if isinstance(module, ExpertBank):
            module.build_slot_table(device)
    kernels.install(model, device)
    model.eval()
    log.info("model loaded from %s: %d layers, dtype %s%s, device %s", model_dir, cfg.num_hidden_layers, dtype,
             ", routed experts FP8" if fp8_experts else "", device)
    return model


def _resolve_fp8_experts(ckpt: Checkpoint, cfg: ModelConfig, device, asked: bool | None) -> bool:
    if asked is False or not cfg.moe_layers:
        return False
    if asked is None:
        first = expert_key(cfg.moe_layers[0], 0, "gate_proj")
        if first not in ckpt or not ckpt.is_fp8(first):
            return False
    possible, why_not = fp8_experts_possible(cfg, device)
    if asked and not possible:
        raise CheckpointError(f"cannot keep routed experts in FP8: {why_not}")
    if not possible:
        log.info("FP8 experts dequantised: %s", why_not)
    return possible


def load_expert_banks(
    model_dir: str | Path,
    layer_experts: dict[int, list[int]],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[int, ExpertBank]:
    """Only the chosen (layer, expert) weights: what one expert shard serves."""
    cfg = ModelConfig.from_model_dir(model_dir)
    dtype = resolve_dtype(cfg, dtype)
    ckpt = Checkpoint(model_dir)
    banks = {}
    for layer, experts in sorted(layer_experts.items()):
        if not cfg.is_moe_layer(layer):
            raise CheckpointError(f"layer {layer} is not a MoE layer of this model (MoE layers: {cfg.moe_layers})")
        bad = [e for e in experts if not 0 <= e < cfg.n_routed_experts]
        if bad:
            raise CheckpointError(f"expert ids {bad} out of range [0, {cfg.n_routed_experts})")
        with torch.device("meta"):
            bank = ExpertBank(experts, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        _load_bank(ckpt, bank, layer, cfg.hidden_size, dtype, device)
        bank.build_slot_table(device)
        kernels.install(bank, device)
        banks[layer] = bank.eval()
        log.info("loaded layer %d experts %s", layer, _compact(bank.expert_ids))
    return banks


def _compact(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]} ({len(ids)})" if len(ids) > 4 else ",".join(map(str, ids))
