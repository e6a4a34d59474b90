"""Parameter counts and KV-cache bytes of a `ModelConfig`, from the HF checkpoint layout.

Every count is a sum over the tensors a DeepSeek checkpoint stores (names and shapes as in the
published safetensors), so `moe inspect`, `moe size` and the loader agree by
construction. Pure arithmetic: nothing here touches a file or a device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from model.config import ModelConfig

# Tensor categories, in the order `moe inspect` prints them.
CATEGORIES = ("embedding", "attention", "dense_mlp", "router", "routed_experts", "shared_experts", "norms", "lm_head", "mtp")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
BF16 = DTYPE_BYTES["bfloat16"]
GQA_KV_GROUPS = 8  # the usual GQA width of the dense models MLA is compared with (Llama 3, Qwen 2.5)


@dataclass(frozen=True)
class Tensor:
    name: str  # full checkpoint name, e.g. "model.layers.3.mlp.experts.17.down_proj.weight"
    shape: tuple[int, ...]
    category: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _attention(cfg: ModelConfig, prefix: str) -> Iterator[Tensor]:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    a = f"{prefix}self_attn."
    if cfg.q_lora_rank is None:
        yield Tensor(a + "q_proj.weight", (heads * cfg.qk_head_dim, h), "attention")
    else:
        yield Tensor(a + "q_a_proj.weight", (cfg.q_lora_rank, h), "attention")
        yield Tensor(a + "q_a_layernorm.weight", (cfg.q_lora_rank,), "attention")
        yield Tensor(a + "q_b_proj.weight", (heads * cfg.qk_head_dim, cfg.q_lora_rank), "attention")
    yield Tensor(a + "kv_a_proj_with_mqa.weight", (cfg.kv_cache_dim, h), "attention")
    yield Tensor(a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), "attention")
    yield Tensor(a + "kv_b_proj.weight", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), "attention")
    yield Tensor(a + "o_proj.weight", (h, heads * cfg.v_head_dim), "attention")


def _mlp(prefix: str, hidden: int, inner: int, category: str) -> Iterator[Tensor]:
    yield Tensor(prefix + "gate_proj.weight", (inner, hidden), category)
    yield Tensor(prefix + "up_proj.weight", (inner, hidden), category)
    yield Tensor(prefix + "down_proj.weight", (hidden, inner), category)


def decoder_layer_tensors(cfg: ModelConfig, layer: int) -> Iterator[Tensor]:
    """Tensors of decoder layer `layer` (an index past the last layer is an MTP module's layer)."""
    h = cfg.hidden_size
    prefix = f"model.layers.{layer}."
    yield Tensor(prefix + "input_layernorm.weight", (h,), "norms")
    yield Tensor(prefix + "post_attention_layernorm.weight", (h,), "norms")
    yield from _attention(cfg, prefix)
    if not cfg.is_moe_layer(layer):
        yield from _mlp(prefix + "mlp.", h, cfg.intermediate_size, "dense_mlp")
        return
    yield Tensor(prefix + "mlp.gate.weight", (cfg.n_routed_experts, h), "router")
    if cfg.topk_method == "noaux_tc":
        yield Tensor(prefix + "mlp.gate.e_score_correction_bias", (cfg.n_routed_experts,), "router")
    for expert in range(cfg.n_routed_experts):
        yield from _mlp(f"{prefix}mlp.experts.{expert}.", h, cfg.moe_intermediate_size, "routed_experts")
    if cfg.n_shared_experts:
        yield from _mlp(prefix + "mlp.shared_experts.", h, cfg.moe_intermediate_size * cfg.n_shared_experts, "shared_experts")


def mtp_tensors(cfg: ModelConfig, index: int) -> Iterator[Tensor]:
    """MTP module `index` as DeepSeek-V3 stores it: a MoE decoder layer numbered after the main
    layers, enorm/hnorm, eh_proj [hidden, 2*hidden], and its own copies of the embedding and head
    (same values as the main model's; the checkpoint stores them again)."""
    h = cfg.hidden_size
    layer = cfg.num_hidden_layers + index
    prefix = f"model.layers.{layer}."
    for tensor in decoder_layer_tensors(cfg, layer):
        yield Tensor(tensor.name, tensor.shape, "mtp")
    yield Tensor(prefix + "embed_tokens.weight", (cfg.vocab_size, h), "mtp")
    yield Tensor(prefix + "enorm.weight", (h,), "mtp")
    yield Tensor(prefix + "hnorm.weight", (h,), "mtp")
    yield Tensor(prefix + "eh_proj.weight", (h, 2 * h), "mtp")
    yield Tensor(prefix + "shared_head.norm.weight", (h,), "mtp")
    yield Tensor(prefix + "shared_head.head.weight", (cfg.vocab_size, h), "mtp")


def model_tensors(cfg: ModelConfig, include_mtp: bool = False) -> Iterator[Tensor]:
    """Every tensor of the checkpoint, in HF names; MTP modules only when asked."""
    h = cfg.hidden_size
    yield Tensor("model.embed_tokens.weight", (cfg.vocab_size, h), "embedding")
    for layer in range(cfg.num_hidden_layers):
        yield from decoder_layer_tensors(cfg, layer)
    yield Tensor("model.norm.weight", (h,), "norms")
    if not cfg.tie_word_embeddings:
        yield Tensor("lm_head.weight", (cfg.vocab_size, h), "lm_head")
    if include_mtp:
        for index in range(cfg.num_nextn_predict_layers):
            yield from mtp_tensors(cfg, index)


def _activated_share(tensor: Tensor, cfg: ModelConfig) -> float:
    """Fraction of a tensor one token reads: the top-k of the routed experts, one embedding row."""
    if tensor.name.endswith("embed_tokens.weight"):
        return 1 / cfg.vocab_size
    if ".mlp.experts." in tensor.name:
        return cfg.num_experts_per_tok / cfg.n_routed_experts
    return 1.0


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # main model, as stored
    activated: float  # main model parameters one token reads (embedding: one row)
    mtp: int  # MTP modules as stored, including their copies of embedding and head
    mtp_unique: int  # MTP parameters not shared with the main model
    mtp_activated: float
    by_category: dict[str, int]

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    @property
    def activated_with_mtp(self) -> float:
        return self.activated + self.mtp_activated


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    by_category = dict.fromkeys(CATEGORIES, 0)
    activated = 0.0
    mtp_activated = 0.0
    shared_copies = 0
    for tensor in model_tensors(cfg, include_mtp=True):
        by_category[tensor.category] += tensor.numel
        share = _activated_share(tensor, cfg) * tensor.numel
        if tensor.category == "mtp":
            mtp_activated += share
            if tensor.name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
                shared_copies += tensor.numel
        else:
            activated += share
    mtp = by_category["mtp"]
    return ParameterCounts(
        total=sum(by_category.values()) - mtp,
        activated=activated,
        mtp=mtp,
        mtp_unique=mtp - shared_copies,
        mtp_activated=mtp_activated,
        by_category=by_category,
    )


# ---- per-layer pieces deployment sizing reads ---------------------------------------------------------
def _first_layer(cfg: ModelConfig, moe: bool) -> int:
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer) == moe:
            return layer
    return -1


def _category_sum(cfg: ModelConfig, layer: int, category: str) -> int:
    if layer < 0:
        return 0
    return sum(t.numel for t in decoder_layer_tensors(cfg, layer) if t.category == category)


def attention_parameters(cfg: ModelConfig) -> int:
    """One layer's MLA projections and their norms."""
    return _category_sum(cfg, 0, "attention")


def dense_mlp_parameters(cfg: ModelConfig) -> int:
    """One dense (non-MoE) layer's MLP; 0 when every layer is MoE."""
    return _category_sum(cfg, _first_layer(cfg, moe=False), "dense_mlp")


def routed_expert_parameters(cfg: ModelConfig) -> int:
    """One routed expert of one layer: gate, up and down projections."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def shared_expert_parameters(cfg: ModelConfig) -> int:
    """All shared experts of one MoE layer (stored fused, as one wider MLP)."""
    return _category_sum(cfg, _first_layer(cfg, moe=True), "shared_experts")


def linear_weight_bytes(cfg: ModelConfig) -> float:
    """Bytes per projection weight as stored: e4m3 plus one fp32 scale per 128x128 block when the
    checkpoint is FP8, else the checkpoint dtype (embeddings and norms keep the dtype either way)."""
    if cfg.quantization and cfg.quantization.get("quant_method") == "fp8":
        return DTYPE_BYTES["fp8"] + DTYPE_BYTES["float32"] / (128 * 128)
    return DTYPE_BYTES.get(cfg.torch_dtype, BF16)


# ---- KV cache ------------------------------------------------------------------------------------
def kv_bytes_per_token_per_layer(cfg: ModelConfig, dtype_bytes: int = BF16) -> int:
    """Latent MLA cache of one token in one layer: c_KV (kv_lora_rank) plus the shared rope key."""
    return cfg.kv_cache_dim * dtype_bytes


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = BF16) -> int:
    """Latent MLA cache of one token over all decoder layers (MTP layers excluded: their cache
    holds only the draft positions)."""
    return cfg.num_hidden_layers * kv_bytes_per_token_per_layer(cfg, dtype_bytes)


def mha_kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = BF16, kv_heads: int | None = None) -> int:
    """The same model caching full keys and values instead of the latent: per layer and KV head a
    key of qk_head_dim (nope + rope) and a value of v_head_dim, which is what an un-absorbed MLA
    (e.g. transformers' cache) stores. `kv_heads` < heads gives the GQA equivalent."""
    heads = cfg.num_attention_heads if kv_heads is None else kv_heads
    return cfg.num_hidden_layers * heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes


def gqa_kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = BF16) -> int | None:
    """The same model as GQA with `GQA_KV_GROUPS` KV heads; None when it has no more attention
    heads than that, since grouping would then cache as much as MHA or more."""
    if cfg.num_attention_heads <= GQA_KV_GROUPS:
        return None
    return mha_kv_bytes_per_token(cfg, dtype_bytes, kv_heads=GQA_KV_GROUPS)
