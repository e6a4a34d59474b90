"""FP8 weights as DeepSeek-V3 publishes them: float8_e4m3fn with one fp32 scale per 128x128 block.

The checkpoint stores `weight_scale_inv`, the factor that multiplies the FP8 values back to the
real weight: w = q * scale_inv (block-wise).
"""

from __future__ import annotations

import torch

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
