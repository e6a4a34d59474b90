"""Hidden states on the expert wire: FP8 dispatch compression (DeepEP / DeepSeek-V3 style).

Activations sent to expert shards may travel as float8_e4m3fn with one float32 scale per 128
consecutive channels of each token ("1x128" blocks, model/fp8.py's `quantize_1x128`: its scale
rule and error bound are the wire's); the combine direction stays BF16/FP32.

    wire, scales = encode_hidden(x, "fp8")         # what a transport puts on the wire; scales is
    wire, scales = encode_hidden(x, "bf16")        #   None for "fp32" / "bf16"
    x_hat = decode_hidden(wire, scales, torch.float32)   # the shard's side; any of the three

Non-finite input (NaN, +-Inf) is refused with ValueError: its scale would poison the whole block.
"""

from __future__ import annotations

import torch

from model.fp8 import dequantize_1x128, quantize_1x128
from services.common import tensors
from services.wire.dtypes import HIDDEN_WIRE_DTYPES, check_dispatch_dtype


def _check_finite(x: torch.Tensor, where: str) -> None:
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(x).sum())
    inf = int((~finite).sum()) - nan
    first = [int(i) for i in (~finite).nonzero()[0]]
    raise ValueError(f"{where}: input has {nan} NaN and {inf} Inf values (first at index {first}); "
                     "FP8 dispatch cannot encode non-finite activations")


def encode_hidden(x: torch.Tensor, dispatch_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states as they go on the wire: (tensor, scales or None), both contiguous.

    "fp32" -> (float32, None); "bf16" -> (bfloat16, None); "fp8" -> (float8_e4m3fn, float32 scales).
    A tensor already in the wire dtype is returned as is (no copy)."""
    if check_dispatch_dtype(dispatch_dtype) == "fp8":
        _check_finite(x, "encode_hidden")
        return quantize_1x128(x)
    return x.to(tensors.DTYPES[HIDDEN_WIRE_DTYPES[dispatch_dtype]]).contiguous(), None


def decode_hidden(wire: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of encode_hidden: the wire tensor (plus scales for float8) -> `dtype`."""
    if wire.dtype == torch.float8_e4m3fn:
        if scales is None:
            raise ValueError("decode_hidden: float8_e4m3fn hidden states need their scales")
        return dequantize_1x128(wire, scales, dtype)
    if scales is not None:
        raise ValueError(f"decode_hidden: scales given with {wire.dtype} hidden states (only float8 has them)")
    return wire.to(dtype)
