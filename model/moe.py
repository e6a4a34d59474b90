"""Mixture-of-Experts: the gate, a bank of routed experts, and the MoE block.

The block talks to its routed experts only through `dispatch` and `combine`, so a distributed
runtime can swap the local `ExpertBank` for one that sends the work to remote shards.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import MLP


class Gate(nn.Module):
    """Group-limited top-k routing exactly as the checkpoint's `topk_method` prescribes.

    - noaux_tc (V3): sigmoid scores; selection uses scores + e_score_correction_bias, a group's
      score is the sum of its two best biased scores; weights come from the unbiased scores.
    - group_limited_greedy (V2): softmax scores; a group's score is its best expert's score.
    - greedy (V2-Lite): softmax scores, plain top-k.
    Experts outside the chosen groups are masked with -inf: multiplying by zero once let masked
    experts outrank valid ones whose biased scores were negative.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_groups = cfg.n_group
        self.topk_groups = cfg.topk_group
        self.method = cfg.topk_method
        self.scoring = cfg.scoring_func
        self.normalise = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if self.method == "noaux_tc":
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] -> (expert ids [T, K] int64, routing weights [T, K] float32)."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias
        if self.method != "greedy" and self.n_groups > 1:
            T, E = choice.shape
            grouped = choice.view(T, self.n_groups, E // self.n_groups)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices  # [T, topk_groups]
            masked = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).view(T, E)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.normalise and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a: [M, K] rows grouped; b: [G, K, N]; offsets: [G] int32 end row of each group -> [M, N]
    (rows past offsets[-1] are left undefined). One kernel for all groups on Hopper (bf16);
    elsewhere a gather of each row's weight + bmm: slow but just as sync-free (on CPU still
    ~30x faster than _grouped_mm, a reference loop there)."""
    if not (a.is_cuda and a.dtype == torch.bfloat16):
        group = torch.searchsorted(offsets, torch.arange(a.shape[0], device=a.device, dtype=torch.int32), right=True)
        return torch.bmm(a[:, None, :], b[group.clamp(max=b.shape[0] - 1)]).squeeze(1)
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offsets)


class RoutedExperts(Protocol):
    """Where a MoE block's routed experts run: in this process or on remote shards."""

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> object: ...

    def combine(self, handle: object) -> torch.Tensor: ...


class ExpertBank(nn.Module):
    """One layer's routed experts, all of them or a subset, addressed by logical expert id.

    Weights are stacked so an expert is a slice, not a module: w13 [E, 2I, D] holds gate and up
    projections together, w2 [E, D, I] the down projections.
    """

    def __init__(self, expert_ids: list[int], n_routed_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.expert_ids = sorted(expert_ids)
        self.n_routed_experts = n_routed_experts
        self.inter_dim = inter_dim
        self.w13 = nn.Parameter(torch.empty(len(self.expert_ids), 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(len(self.expert_ids), dim, inter_dim))
        self.register_buffer("slot_of", None, persistent=False)
        self.grouped: bool | None = None  # None: one grouped GEMM on CUDA, a loop elsewhere
        self.build_slot_table(self.w13.device)

    def build_slot_table(self, device: torch.device | str) -> None:
        """slot_of[id] = local slot of a held expert, -1 otherwise; the last entry serves id -1."""
        slot = torch.full((self.n_routed_experts + 1,), -1, dtype=torch.long, device=device)
        slot[torch.tensor(self.expert_ids, dtype=torch.long, device=device)] = torch.arange(len(self.expert_ids), device=device)
        self.slot_of = slot

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, D]; ids: [T, K] logical ids (-1 or ids not held are skipped); weights: [T, K].

        Returns [T, D] = sum over held slots of weight * expert(x), accumulated in fp32.
        `grouped` picks one grouped GEMM over all experts (no host sync, fixed shapes: what a
        CUDA graph needs); otherwise a loop over the experts that received tokens (CPU: fewer
        ops and no padding, and grouped GEMM has no fast CPU kernel).
        """
        grouped = x.is_cuda if self.grouped is None else self.grouped
        return self._forward_grouped(x, ids, weights) if grouped else self._forward_loop(x, ids, weights)

    def _forward_loop(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        slots = self.slot_of[ids.long()].view(-1)  # [T*K] local slot or -1
        order = slots.argsort(stable=True)  # not-held (-1) first, then grouped by slot
        counts = torch.bincount(slots + 1, minlength=len(self.expert_ids) + 1).tolist()
        order = order[counts[0] :]
        tokens = order // K  # [N] token of each held (token, k) pair, grouped by expert
        xs = x[tokens]  # [N, D]
        ys = torch.empty_like(xs)
        start = 0
        for slot, count in enumerate(counts[1:]):
            if count:
                gate_up = F.linear(xs[start : start + count], self.w13[slot])  # [n, 2I]
                act = F.silu(gate_up[:, : self.inter_dim]) * gate_up[:, self.inter_dim :]
                torch.mm(act, self.w2[slot].t(), out=ys[start : start + count])  # [n, D]
                start += count
        scaled = ys.float() * weights.reshape(-1)[order].float()[:, None]
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, tokens, scaled).to(x.dtype)

    def _forward_grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        E = len(self.expert_ids)
        slots = self.slot_of[ids.long()].view(-1)  # [T*K]
        held = slots >= 0
        key = torch.where(held, slots, E)  # not-held pairs sort last, into no group
        order = key.argsort(stable=True)  # [T*K]
        counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device).scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
        offsets = counts[:E].cumsum(0, dtype=torch.int32)  # [E] end row of each expert's group
        tokens = order // K
        xs = x[tokens]  # [T*K, D] rows grouped by expert
        gate_up = grouped_mm(xs, self.w13.transpose(1, 2), offsets)  # [T*K, 2I]
        act = F.silu(gate_up[:, : self.inter_dim]) * gate_up[:, self.inter_dim :]
        ys = grouped_mm(act, self.w2.transpose(1, 2), offsets)  # [T*K, D]
        w = torch.where(held, weights.reshape(-1).float(), 0.0)[order]  # [T*K]
        scaled = torch.where(held[order, None], ys.float() * w[:, None], 0.0)  # rows past the groups are garbage
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, tokens, scaled).to(x.dtype)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self(x, ids, weights)

    def combine(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


class MoE(nn.Module):
    """Gate + routed experts + shared experts. Without `with_routed_experts` the block holds no
    routed weights and a distributed runtime installs its own `experts` before use."""

    def __init__(self, cfg: ModelConfig, layer: int, with_routed_experts: bool = True):
        super().__init__()
        self.layer = layer
        self.gate = Gate(cfg)
        self.experts: RoutedExperts | None = (
            ExpertBank(list(range(cfg.n_routed_experts)), cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
            if with_routed_experts
            else None
        )
        self.shared = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [T, D]
        ids, weights = self.gate(h)
        pending = self.experts.dispatch(h, ids, weights)
        shared = self.shared(h) if self.shared is not None else None  # overlaps a remote dispatch
        out = self.experts.combine(pending)
        if shared is not None:
            out = out + shared
        return out.view(shape)
