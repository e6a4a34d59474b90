"""Building blocks shared by attention and feed-forward: RMSNorm, rotary embeddings, SwiGLU MLP."""

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
        # Normalise in fp32 whatever the activation dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
    """Precomputed cos/sin for every position up to the model's context limit."""

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int, interleaved: bool):
        super().__init__()
        self.interleaved = interleaved
        inv_freq = rope_inverse_frequencies(rope, dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, dim/2]
        scale = rope.cos_sin_scale
        self.register_buffer("cos", angles.cos() * scale, persistent=False)
        self.register_buffer("sin", angles.sin() * scale, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, S, heads, dim] (or [B, S, dim]); positions: [B, S] -> same shape as x.

        Interleaved checkpoints rotate pairs (x0, x1), (x2, x3), ...; the result is laid out as
        [rotated evens, rotated odds], a fixed permutation applied to queries and keys alike, so
        their dot products are those of the interleaved layout.
        """
        cos, sin = self.cos[positions], self.sin[positions]  # [B, S, dim/2]
        if x.dim() == 4:
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        x32 = x.float()
        if self.interleaved:
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
        else:
            x1, x2 = x32.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
