"""Model configuration read from a checkpoint's HF-format `config.json`.

DeepSeek publishes V2/V3 configs with `rope_theta` + `rope_scaling`; `transformers` 5 writes the
same information as `rope_parameters`. Both are accepted and normalised into `RopeConfig`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    @staticmethod
    def yarn_mscale(scale: float, mscale: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def softmax_mscale(self) -> float:
        """Multiplier on the attention softmax scale (YaRN `mscale_all_dim`, squared by the caller)."""
        if self.kind != "yarn" or not self.mscale_all_dim:
            return 1.0
        return self.yarn_mscale(self.factor, self.mscale_all_dim)

    @property
    def cos_sin_scale(self) -> float:
        """Multiplier on cos/sin (YaRN attention factor)."""
        if self.kind != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return self.yarn_mscale(self.factor, self.mscale) / self.yarn_mscale(self.factor, self.mscale_all_dim)
        return self.yarn_mscale(self.factor, 1.0)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    moe_layer_freq: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: dict[str, Any] | None = field(default=None, compare=False)

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values stored per token per layer in the latent cache: c_KV plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_mscale**2

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_hidden_layers) if self.is_moe_layer(layer)]

    # ---- loading --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        return _parse(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return _parse(raw, source=str(path))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"model directory not found: {model_dir}")
        return cls.from_file(model_dir / "config.json")

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rope"}
        out["rope"] = {f.name: getattr(self.rope, f.name) for f in fields(self.rope)}
        return out


def _require(raw: dict[str, Any], key: str, kind: type, source: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{source}: missing required key '{key}'")
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: key '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _optional(raw: dict[str, Any], key: str, kind: type, default: Any, source: str) -> Any:
    if raw.get(key) is None:
        return default
    return _require(raw, key, kind, source)


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5: everything in rope_parameters; DeepSeek: rope_theta + rope_scaling.
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"{source}: rope type '{kind}' is not supported (default, yarn)")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    max_pos = raw.get("max_position_embeddings", 4096)
    original = params.get("original_max_position_embeddings", max_pos)
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original
    return RopeConfig(
        theta=float(theta),
        kind="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        truncate=bool(params.get("truncate", True)),
    )


def _parse(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    known = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not known and model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: unsupported architecture {architectures or model_type!r}; "
            f"this runtime serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    is_v3 = (known[0] if known else "").startswith("DeepseekV3") or model_type == "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM" if is_v3 else "DeepseekV2ForCausalLM"

    n_routed = _require(raw, "n_routed_experts", int, source)
    topk_method = _optional(raw, "topk_method", str, "noaux_tc" if is_v3 else "greedy", source)
    if topk_method not in TOPK_METHODS:
        raise ConfigError(f"{source}: topk_method '{topk_method}' is not one of {TOPK_METHODS}")
    scoring = _optional(raw, "scoring_func", str, "sigmoid" if is_v3 else "softmax", source)
    if scoring not in SCORING_FUNCS:
        raise ConfigError(f"{source}: scoring_func '{scoring}' is not one of {SCORING_FUNCS}")
    n_group = _optional(raw, "n_group", int, 1, source)
    topk_group = _optional(raw, "topk_group", int, n_group, source)
    if topk_method == "greedy":
        n_group, topk_group = 1, 1
    if n_group < 1 or n_routed % n_group:
        raise ConfigError(f"{source}: n_routed_experts={n_routed} is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ConfigError(f"{source}: topk_group={topk_group} must lie in [1, n_group={n_group}]")
    top_k = _require(raw, "num_experts_per_tok", int, source)
    if not 1 <= top_k <= n_routed:
        raise ConfigError(f"{source}: num_experts_per_tok={top_k} must lie in [1, {n_routed}]")

    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"{source}: hidden_act '{hidden_act}' is not supported (silu)")
    heads = _require(raw, "num_attention_heads", int, source)
    kv_heads = raw.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise ConfigError(f"{source}: num_key_value_heads={kv_heads} differs from num_attention_heads; MLA needs both equal")

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    q_lora_rank = raw.get("q_lora_rank")
    if q_lora_rank is not None and (not isinstance(q_lora_rank, int) or q_lora_rank <= 0):
        raise ConfigError(f"{source}: q_lora_rank must be a positive int or null, got {q_lora_rank!r}")

    return ModelConfig(
        architecture=architecture,
        vocab_size=_require(raw, "vocab_size", int, source),
        hidden_size=_require(raw, "hidden_size", int, source),
        intermediate_size=_require(raw, "intermediate_size", int, source),
        moe_intermediate_size=_require(raw, "moe_intermediate_size", int, source),
        num_hidden_layers=_require(raw, "num_hidden_layers", int, source),
        num_attention_heads=heads,
        kv_lora_rank=_require(raw, "kv_lora_rank", int, source),
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=_require(raw, "qk_nope_head_dim", int, source),
        qk_rope_head_dim=_require(raw, "qk_rope_head_dim", int, source),
        v_head_dim=_require(raw, "v_head_dim", int, source),
        n_routed_experts=n_routed,
        n_shared_experts=_optional(raw, "n_shared_experts", int, 0, source),
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        topk_method=topk_method,
        scoring_func=scoring,
        norm_topk_prob=bool(raw.get("norm_topk_prob", is_v3)),
        routed_scaling_factor=_optional(raw, "routed_scaling_factor", float, 1.0, source),
        first_k_dense_replace=_optional(raw, "first_k_dense_replace", int, 0, source),
        moe_layer_freq=_optional(raw, "moe_layer_freq", int, 1, source),
        max_position_embeddings=_require(raw, "max_position_embeddings", int, source),
        rms_norm_eps=_optional(raw, "rms_norm_eps", float, 1e-6, source),
        rope=_parse_rope(raw, source),
        rope_interleave=bool(raw.get("rope_interleave", True)),
        num_nextn_predict_layers=_optional(raw, "num_nextn_predict_layers", int, 0, source),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=str(dtype),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        quantization=raw.get("quantization_config"),
    )
