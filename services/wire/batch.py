"""The expert batch: what a worker sends one replica for one MoE layer, and what a replica accepts.

    batch = ExpertBatch(layer, hidden, expert_ids, weights)        # hidden [T, H] fp32 / bf16
    hidden, scales, ids, weights = wire_tensors(batch, "fp8")      # what a transport puts on the wire
    x, ids = validate(batch, holdings, torch.bfloat16)             # a replica's check (InvalidArgument)

Accepted dtypes per field (FIELD_DTYPES) hold for every transport. The dtype of the result a
caller gets back is `result_dtype(hidden)`: the hidden states' own, float32 for float8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from services.common.errors import InvalidArgument
from services.common.expert_ids import format_id_list
from services.common.tensors import NAMES
from services.wire.codec import decode_hidden, encode_hidden
from services.wire.dtypes import FP8_GROUP, scale_groups

# field -> wire dtype names it may have; hidden_scales only with float8_e4m3fn hidden
FIELD_DTYPES = {
    "hidden": ("float32", "bfloat16", "float8_e4m3fn"),
    "hidden_scales": ("float32",),
    "expert_ids": ("int32",),
    "weights": ("float32",),
}


@dataclass
class ExpertBatch:
    """One MoE layer's work for one shard replica."""

    layer: int
    hidden: torch.Tensor                       # [T, H] float32 / bfloat16 (float8_e4m3fn with hidden_scales)
    expert_ids: torch.Tensor                   # [T, K] int32 logical ids; -1 = slot not for this replica
    weights: torch.Tensor                      # [T, K] float32 (0 where expert_ids == -1)
    hidden_scales: torch.Tensor | None = None  # [T, ceil(H/128)] float32, only for float8_e4m3fn hidden

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[0])


def result_dtype(hidden_dtype: torch.dtype) -> torch.dtype:
    """The dtype a caller gets its [T, H] output in: the hidden states', float32 for float8."""
    return hidden_dtype if hidden_dtype in (torch.float32, torch.bfloat16) else torch.float32


def wire_tensors(batch: ExpertBatch, dispatch_dtype: str
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(hidden in the dispatch dtype, its fp8 scales or None, expert_ids int32, weights float32).
    Hidden states the caller quantised already (float8 with scales) go as they are; InvalidArgument
    when they cannot be encoded (FP8 refuses NaN / Inf)."""
    if batch.hidden_scales is not None or batch.hidden.dtype == torch.float8_e4m3fn:
        hidden, scales = batch.hidden, batch.hidden_scales
    else:
        try:
            hidden, scales = encode_hidden(batch.hidden, dispatch_dtype)
        except ValueError as err:
            raise InvalidArgument(f"hidden: {err}") from None
    return hidden, scales, _as(batch.expert_ids, torch.int32), _as(batch.weights, torch.float32)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@dataclass
class Holdings:
    """What one replica serves: the batches `validate` lets through."""

    layers: list[int]
    expert_ids: list[int]
    hidden_size: int
    n_routed_experts: int
    # held[id + 1] is True for held ids; index 0 stands for -1 (always accepted)
    held: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.held = np.zeros(self.n_routed_experts + 1, dtype=bool)
        self.held[0] = True
        self.held[np.array(self.expert_ids, dtype=np.int64) + 1] = True


def validate(batch: ExpertBatch, holdings: Holdings, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Check `batch` against what the replica holds; InvalidArgument names the culprit.
    -> (hidden [T, H] decoded to `dtype`, expert_ids [T, K] int64), on the batch's device."""
    layer = batch.layer
    if layer not in holdings.layers:
        raise InvalidArgument(f"layer {layer} is not a MoE layer held by this shard "
                              f"(layers held: {format_id_list(holdings.layers)})")
    hidden, ids, weights, scales = batch.hidden, batch.expert_ids, batch.weights, batch.hidden_scales
    _check_dtype("hidden", hidden)
    if hidden.dim() != 2 or hidden.shape[1] != holdings.hidden_size:
        raise InvalidArgument(f"hidden: shape {list(hidden.shape)} is not [T, {holdings.hidden_size}] "
                              f"(hidden_size of this model)")
    T = hidden.shape[0]
    _check_dtype("expert_ids", ids)
    if ids.dim() != 2 or ids.shape[0] != T:
        raise InvalidArgument(f"expert_ids: shape {list(ids.shape)} is not [T={T}, K] (T from hidden)")
    _check_dtype("weights", weights)
    if tuple(weights.shape) != tuple(ids.shape):
        raise InvalidArgument(f"weights: shape {list(weights.shape)} differs from expert_ids "
                              f"shape {list(ids.shape)}")
    if ids.numel():
        _check_routing(holdings, ids.cpu().numpy(), weights.cpu().numpy())
    if hidden.dtype == torch.float8_e4m3fn:
        blocks = scale_groups(holdings.hidden_size)
        if scales is None:
            raise InvalidArgument("hidden_scales: required with float8_e4m3fn hidden")
        _check_dtype("hidden_scales", scales)
        if tuple(scales.shape) != (T, blocks):
            raise InvalidArgument(f"hidden_scales: shape {list(scales.shape)} is not [T={T}, {blocks}] "
                                  f"(one scale per {FP8_GROUP} channels)")
        if not bool(torch.isfinite(scales).all()):
            raise InvalidArgument("hidden_scales: NaN or Inf among the fp8 scales")
    elif scales is not None and scales.numel():
        raise InvalidArgument(f"hidden_scales: only allowed with float8_e4m3fn hidden "
                              f"(hidden is {_name(hidden.dtype)})")
    else:
        scales = None
    return decode_hidden(hidden, scales, dtype), ids.long()


def _check_dtype(name: str, tensor: torch.Tensor) -> None:
    if _name(tensor.dtype) not in FIELD_DTYPES[name]:
        raise InvalidArgument(f"{name}: dtype {_name(tensor.dtype)} is not accepted "
                              f"({', '.join(FIELD_DTYPES[name])})")


def _check_routing(holdings: Holdings, ids: np.ndarray, weights: np.ndarray) -> None:
    """In NumPy: these checks run on every request, where a dozen torch operators on [T, K]
    cost several times NumPy's per-call overhead (docs/performance.md)."""
    n = holdings.n_routed_experts
    if ids.min() < -1 or ids.max() >= n:
        bad = np.unique(ids[(ids < -1) | (ids >= n)])[:8].tolist()
        raise InvalidArgument(f"expert_ids: {bad} outside [-1, {n})")
    held = holdings.held[ids + 1]
    if not held.all():
        bad = np.unique(ids[~held])[:8].tolist()
        raise InvalidArgument(f"expert_ids: experts {bad} are not held by this shard "
                              f"(holds {format_id_list(holdings.expert_ids)}; -1 marks a slot for another replica)")
    if not np.isfinite(weights).all():
        raise InvalidArgument("weights: NaN or Inf among the routing weights")


def _name(dtype: torch.dtype) -> str:
    return NAMES.get(dtype) or str(dtype).removeprefix("torch.")
