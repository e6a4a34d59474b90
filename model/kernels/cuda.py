"""Expert compute for CUDA: sync-free grouped GEMMs over rows grouped by expert.

Every shape depends on the token count only, never on the routing, and nothing waits on the
host: what a captured CUDA graph needs. Dense weights run one `grouped_mm` per projection (one
kernel for all experts on Hopper in bf16); FP8 banks quantise activations per 1x128 tile and run
the block-scaled Triton GEMM of fp8_gemm.py. The same code runs on CPU tensors (a gather + bmm
stands in for the grouped GEMM), which is how CPU banks that absorbed shared experts compute and
how the path is checked without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels.fp8_gemm import fp8_grouped_mm, quantize_1x128
from model.moe import ExpertBank


def grouped_experts(bank: ExpertBank, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`ExpertBank.forward` as two grouped GEMMs over all (token, slot) pairs, shared slots included."""
    T = ids.shape[0]
    E = bank.w13.shape[0]  # routed slots, then shared ones
    slots, weights = bank.pairs(ids, weights)  # [T, K + S] each
    K = slots.shape[1]
    slots = slots.view(-1)  # [T*K]
    held = slots >= 0
    key = torch.where(held, slots, E)  # not-held pairs go last, into no group
    order, counts = group_by_key(key, E + 1)  # [T*K], [E+1]
    offsets = counts[:E].cumsum(0).to(torch.int32)  # [E] end row of each expert's group
    tokens = order // K
    xs = x[tokens]  # [T*K, D] rows grouped by expert
    gate_up = _project(xs, bank.w13, bank.w13_scale, offsets, T)  # [T*K, 2I]
    act = F.silu(gate_up[:, : bank.inter_dim]) * gate_up[:, bank.inter_dim :]
    ys = _project(act, bank.w2, bank.w2_scale, offsets, T)  # [T*K, D]
    w = torch.where(held, weights.reshape(-1), 0.0)[order]  # [T*K] fp32
    scaled = torch.where(held[order, None], ys.float() * w[:, None], 0.0)  # rows past the groups are garbage
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, scaled).to(x.dtype)


def _project(rows: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, offsets: torch.Tensor, tokens: int) -> torch.Tensor:
    """rows [M, K] grouped by expert x w [E, N, K] -> [M, N]; a group never exceeds `tokens`
    rows (a token picks an expert at most once)."""
    if w.dtype != torch.float8_e4m3fn:
        return grouped_mm(rows, w.transpose(1, 2), offsets)
    q, q_scale = quantize_1x128(rows)
    return fp8_grouped_mm(q, q_scale, w, scale, offsets, tokens, out_dtype=rows.dtype)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a: [M, K] rows grouped; b: [G, K, N]; offsets: [G] int32 end row of each group -> [M, N]
    (rows past offsets[-1] are left undefined). One kernel for all groups on Hopper (bf16);
    elsewhere a gather of each row's weight + bmm: slow but just as sync-free (on CPU still far
    faster than torch's reference loop for `_grouped_mm`, see docs/performance.md)."""
    if not (a.is_cuda and a.dtype == torch.bfloat16):
        group = torch.searchsorted(offsets, torch.arange(a.shape[0], device=a.device, dtype=torch.int32), right=True)
        return torch.bmm(a[:, None, :], b[group.clamp(max=b.shape[0] - 1)]).squeeze(1)
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offsets)


def group_by_key(key: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """key: [P] values in [0, n_keys) -> (order [P]: a stable permutation that groups equal keys
    in key order, counts [n_keys]). A counting sort from one-hot prefix sums, a few fusable
    elementwise kernels: argsort's radix sort cost a decode step more than the layer's attention
    projections (docs/performance.md)."""
    onehot = (key[:, None] == torch.arange(n_keys, device=key.device)).to(torch.int32)  # [P, n_keys]
    counts = onehot.sum(0, dtype=torch.int32)  # [n_keys]
    rank = (onehot.cumsum(0, dtype=torch.int32) * onehot).sum(1, dtype=torch.int32) - 1  # [P] place within its key
    starts = counts.cumsum(0, dtype=torch.int32) - counts  # [n_keys] first row of each key
    dest = (starts[key] + rank).long()  # [P]
    order = torch.empty_like(dest).scatter_(0, dest, torch.arange(key.numel(), device=key.device))
    return order, counts
