"""Building blocks shared by attention and feed-forward: RMSNorm, rotary embeddings, SwiGLU MLP,
and the LM head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics whatever the activation dtype, then weight * x_hat.to(x.dtype), as the
        # reference does. In fp32 that is F.rms_norm exactly (one dispatch instead of several); for
        # other dtypes F.rms_norm's casts would dispatch more ops than it saves, so it is written out.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LMHead(nn.Linear):
    """The output projection [.., D] -> fp32 logits [.., V]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).float()


def rope_inverse_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """[dim/2] inverse frequencies, YaRN-corrected when the checkpoint asks for it."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind != "yarn":
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    interpolated = inv_freq / rope.factor
    return interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight


class RotaryEmbedding(nn.Module):
    """Rotary position embedding as one [R, R] rotation matrix per position.

    Interleaved checkpoints rotate pairs (x0, x1), (x2, x3), ...; the matrix also lays the result
    out as [rotated evens, rotated odds], a fixed permutation applied to queries and keys alike,
    so their dot products are those of the interleaved layout. Building the matrices once per
    forward pass and applying them with one matmul per tensor replaces ~10 elementwise ops per
    rotated tensor per layer (the decode step is bound by op count on CPU and by launches on GPU).
    """

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int, interleaved: bool):
        super().__init__()
        self.dim = dim
        inv_freq = rope_inverse_frequencies(rope, dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, dim/2]
        scale = rope.cos_sin_scale
        self.register_buffer("cos", angles.cos() * scale, persistent=False)
        self.register_buffer("sin", angles.sin() * scale, persistent=False)
        # out[j] = sum_i x[i] * M[i, j]; the four entries of pair p's 2x2 block:
        half = torch.arange(dim // 2)
        first, second = (2 * half, 2 * half + 1) if interleaved else (half, half + dim // 2)
        rows = torch.cat([first, second, second, first])  # cos, -sin, cos, sin
        cols = torch.cat([half, half, half + dim // 2, half + dim // 2])
        self.register_buffer("flat_index", rows * dim + cols, persistent=False)  # [2*dim]

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [B, S] -> [B, S, R, R] fp32 rotation matrices."""
        cos, sin = self.cos[positions], self.sin[positions]  # [B, S, R/2]
        values = torch.cat([cos, -sin, cos, sin], dim=-1)  # [B, S, 2R]
        rot = cos.new_zeros(*positions.shape, self.dim * self.dim)
        rot[..., self.flat_index] = values
        return rot.view(*positions.shape, self.dim, self.dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, S, heads, R] (or [B, S, R]); positions: [B, S] -> same shape as x."""
        return rotate(x, self.rotation(positions))


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, R] or [B, S, R]; rot: [B, S, R, R] -> x rotated, in x's dtype (math in fp32)."""
    x32 = x.float()
    if x.dim() == 3:
        return (x32.unsqueeze(2) @ rot).squeeze(2).to(x.dtype)  # [B, S, 1, R] @ [B, S, R, R]
    return (x32 @ rot).to(x.dtype)  # [B, S, H, R] @ [B, S, R, R]
