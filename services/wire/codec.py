"""Hidden states on the expert wire: FP8 dispatch compression (DeepEP / DeepSeek-V3 style).

Activations sent to expert shards may travel as float8_e4m3fn with one float32 scale per 128
consecutive channels of each token ("1x128" blocks); the combine direction stays BF16/FP32.

    q, scales = quantize_1x128(x)                  # x [T, H] -> q e4m3 [T, H], scales fp32 [T, ceil(H/128)]
    x_hat = dequantize_1x128(q, scales, torch.float32)

    wire, scales = encode_hidden(x, "fp8")         # what a transport puts on the wire; scales is
    wire, scales = encode_hidden(x, "bf16")        #   None for "fp32" / "bf16"
    x_hat = decode_hidden(wire, scales, torch.float32)   # the shard's side; any of the three

Scale rule: s = amax(|x| over the block) / 448, so the block's largest magnitude lands on e4m3's
largest finite value. An all-zero block gets s = 1 (q is 0 either way; no 0/0). A last block
narrower than 128 (H % 128 != 0) takes its amax over the channels that exist.

Error bound (see tests/test_fp8_dispatch.py): e4m3 keeps 3 mantissa bits, so rounding a scaled
value v = x/s to nearest costs at most half a step: |v|*2^-4 for normals and 2^-10 (half the
subnormal step 2^-9) below the smallest normal 2^-6. Scaled back, per element
    |x - x_hat| <= max(|x| * 2^-4, s * 2^-10),    s = amax/448,
hence never more than amax/16 anywhere in the block. Values of the form k * s with k
representable in e4m3 (in particular any e4m3 value when amax is 448) come back exactly.

Non-finite input (NaN, +-Inf) is refused with ValueError: its scale would poison the whole block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.common import tensors
from services.wire.dtypes import FP8_GROUP as GROUP, HIDDEN_WIRE_DTYPES, check_dispatch_dtype, scale_groups

E4M3_MAX = 448.0                  # largest finite float8_e4m3fn


def _check_finite(x: torch.Tensor, where: str) -> None:
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(x).sum())
    inf = int((~finite).sum()) - nan
    first = [int(i) for i in (~finite).nonzero()[0]]
    raise ValueError(f"{where}: input has {nan} NaN and {inf} Inf values (first at index {first}); "
                     "FP8 dispatch cannot encode non-finite activations")


def quantize_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H] float -> (q float8_e4m3fn [..., H], scales float32 [..., ceil(H/128)])."""
    if not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise ValueError(f"quantize_1x128: expected a float32/bfloat16/float16 tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize_1x128: expected a tensor [..., H], got a scalar")
    _check_finite(x, "quantize_1x128")
    *lead, hidden = x.shape
    groups = scale_groups(hidden)
    xf = x.reshape(-1, hidden).float()
    if hidden % GROUP:
        xf = F.pad(xf, (0, groups * GROUP - hidden))  # zeros never raise a block's amax
    blocks = xf.view(-1, groups, GROUP)                                   # [T, G, 128]
    amax = blocks.abs().amax(dim=-1, keepdim=True)                        # [T, G, 1]
    scales = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    # clamp: fp32 rounding of x/s can overshoot 448 by an ulp, and e4m3fn has no Inf to absorb it
    q = (blocks / scales).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(-1, groups * GROUP)[:, :hidden]
    return q.reshape(*lead, hidden).contiguous(), scales.view(*lead, groups)


def dequantize_1x128(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q e4m3 [..., H], scales fp32 [..., ceil(H/128)]) -> [..., H] in `dtype`."""
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"dequantize_1x128: q must be float8_e4m3fn, got {q.dtype}")
    *lead, hidden = q.shape
    groups = scale_groups(hidden)
    if tuple(scales.shape) != (*lead, groups):
        raise ValueError(f"dequantize_1x128: scales shape {list(scales.shape)} is not {[*lead, groups]} "
                         f"for q {list(q.shape)}")
    full = scales.float().repeat_interleave(GROUP, dim=-1)[..., :hidden]
    return (q.float() * full).to(dtype)


def encode_hidden(x: torch.Tensor, dispatch_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states as they go on the wire: (tensor, scales or None), both contiguous.

    "fp32" -> (float32, None); "bf16" -> (bfloat16, None); "fp8" -> (float8_e4m3fn, float32 scales).
    A tensor already in the wire dtype is returned as is (no copy)."""
    if check_dispatch_dtype(dispatch_dtype) == "fp8":
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
