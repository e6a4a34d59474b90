"""FP8 as DeepSeek-V3 uses it: float8_e4m3fn with one fp32 scale per 128x128 block of a weight,
and one per 1x128 tile (128 consecutive channels of a row) of an activation.

The checkpoint stores `weight_scale_inv`, the factor that multiplies the FP8 values back to the
real weight: w = q * scale_inv (block-wise). Activations follow the same rule per tile:

    q, scales = quantize_1x128(x)                  # x [T, H] -> q e4m3 [T, H], scales fp32 [T, ceil(H/128)]
    x_hat = dequantize_1x128(q, scales, torch.float32)

Scale rule: s = amax(|x| over the block) / 448, so the block's largest magnitude lands on e4m3's
largest finite value. An all-zero block gets s = 1 (q is 0 either way; no 0/0). A last block
narrower than 128 (H % 128 != 0) takes its amax over the channels that exist.

Error bound (see tests/test_fp8_dispatch.py): e4m3 keeps 3 mantissa bits, so rounding a scaled
value v = x/s to nearest costs at most half a step: |v|*2^-4 for normals and 2^-10 (half the
subnormal step 2^-9) below the smallest normal 2^-6. Scaled back, per element
    |x - x_hat| <= max(|x| * 2^-4, s * 2^-10),    s = amax/448,
hence never more than amax/16 anywhere in the block. Values of the form k * s with k
representable in e4m3 (in particular any e4m3 value when amax is 448) come back exactly.
A non-finite input poisons its block's scale; callers that must refuse it check first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (q: float8_e4m3fn [N, K], scale_inv: float32 [ceil(N/b), ceil(K/b)])."""
    n, k = w.shape
    rows, cols = -(-n // block), -(-k // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    tiles = padded.view(rows, block, cols, block)
    amax = tiles.abs().amax(dim=(1, 3))  # [rows, cols]
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block, cols * block)[:n, :k].contiguous(), scale_inv


def quantize_stacked(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """A stack of weights w: [E, N, K] -> (q [E, N, K], scale_inv [E, ceil(N/b), ceil(K/b)]),
    each matrix quantised on its own as `quantize_weight` does."""
    q, scale_inv = zip(*(quantize_weight(m, block) for m in w))
    return torch.stack(q), torch.stack(scale_inv)


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: int = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_weight`: [N, K] FP8 + block scales -> [N, K] in `dtype`."""
    n, k = q.shape
    expected = (-(-n // block), -(-k // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a {n}x{k} weight")
    scales = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return (q.float() * scales).to(dtype)


def quantize_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H] float -> (q float8_e4m3fn [..., H], scales float32 [..., ceil(H/128)]), by the
    scale rule above. The kernels' FP8 GEMMs quantise through a Triton kernel that computes the
    same bytes (model/kernels/fp8_gemm.py)."""
    if not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise ValueError(f"quantize_1x128: expected a float32/bfloat16/float16 tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize_1x128: expected a tensor [..., H], got a scalar")
    *lead, hidden = x.shape
    groups = -(-hidden // BLOCK)
    xf = x.reshape(-1, hidden).float()
    if hidden % BLOCK:
        xf = F.pad(xf, (0, groups * BLOCK - hidden))  # zeros never raise a block's amax
    blocks = xf.view(-1, groups, BLOCK)  # [T, G, 128]
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # [T, G, 1]
    # divide by a tensor, not a Python scalar: CUDA turns `t / scalar` into `t * (1/scalar)`
    scales = torch.where(amax > 0, amax / torch.full_like(amax, E4M3_MAX), torch.ones_like(amax))
    # clamp: fp32 rounding of x/s can overshoot 448 by an ulp, and e4m3fn has no Inf to absorb it
    q = (blocks / scales).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(-1, groups * BLOCK)[:, :hidden]
    return q.reshape(*lead, hidden).contiguous(), scales.view(*lead, groups)


def dequantize_1x128(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q e4m3 [..., H], scales fp32 [..., ceil(H/128)]) -> [..., H] in `dtype`."""
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"dequantize_1x128: q must be float8_e4m3fn, got {q.dtype}")
    *lead, hidden = q.shape
    groups = -(-hidden // BLOCK)
    if tuple(scales.shape) != (*lead, groups):
        raise ValueError(f"dequantize_1x128: scales shape {list(scales.shape)} is not {[*lead, groups]} "
                         f"for q {list(q.shape)}")
    full = scales.float().repeat_interleave(BLOCK, dim=-1)[..., :hidden]
    return (q.float() * full).to(dtype)
