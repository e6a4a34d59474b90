"""Mixture-of-Experts: the gate, a bank of routed experts, and the MoE block.

The block talks to its routed experts only through `dispatch` and `combine`, so a distributed
runtime can swap the local `ExpertBank` for one that sends the work to remote shards.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.fp8 import dequantize_weight, quantize_stacked
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


class RoutedExperts(Protocol):
    """Where a MoE block's routed experts run: in this process or on remote shards."""

    # whether torch.compile can trace dispatch and combine into a decode graph
    traceable: bool

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> object: ...

    def combine(self, handle: object) -> torch.Tensor: ...


class ExpertBank(nn.Module):
    """One layer's routed experts, all of them or a subset, addressed by logical expert id.

    Weights are stacked so an expert is a slice, not a module: w13 [E, 2I, D] holds gate and up
    projections together, w2 [E, D, I] the down projections. After `keep_fp8` they stay
    float8_e4m3fn with DeepSeek's 128x128 block scales (w13_scale [E, 2I/128, D/128], w2_scale
    [E, D/128, I/128]).

    `forward` runs `compute(bank, x, ids, weights)`: `reference` below unless a kernel from
    model/kernels was installed when the bank was loaded (or a decoder built), which computes the
    same sum faster on its hardware.
    """

    traceable = True

    def __init__(self, expert_ids: list[int], n_routed_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.expert_ids = sorted(expert_ids)
        self.n_routed_experts = n_routed_experts
        self.inter_dim = inter_dim
        self.w13 = nn.Parameter(torch.empty(len(self.expert_ids), 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(len(self.expert_ids), dim, inter_dim))
        self.register_buffer("slot_of", None, persistent=False)
        self.register_buffer("w13_scale", None, persistent=False)
        self.register_buffer("w2_scale", None, persistent=False)
        self.shared_slots = 0  # trailing slots every token uses with weight 1 (see absorb_shared)
        self.compute: Callable[[ExpertBank, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = ExpertBank.reference
        self.build_slot_table(self.w13.device)

    def build_slot_table(self, device: torch.device | str) -> None:
        """slot_of[id] = local slot of a held expert, -1 otherwise; the last entry serves id -1."""
        slot = torch.full((self.n_routed_experts + 1,), -1, dtype=torch.long, device=device)
        slot[torch.tensor(self.expert_ids, dtype=torch.long, device=device)] = torch.arange(len(self.expert_ids), device=device)
        self.slot_of = slot

    def keep_fp8(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor) -> None:
        """Hold FP8 weights (shapes as in the class docstring) instead of dense ones. A kernel
        chosen for the dense ones no longer applies: `compute` is the reference until the next
        choice (model.kernels.install)."""
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.w13_scale, self.w2_scale = w13_scale.float(), w2_scale.float()
        self.compute = ExpertBank.reference

    def absorb_shared(self, shared: MLP) -> None:
        """Take a shared-experts MLP [D -> S*I -> D] in as S more experts that every token uses
        with weight 1, so one grouped GEMM per projection serves shared and routed experts alike:
        splitting SwiGLU's hidden dimension into S slices and summing their outputs is the same
        MLP. FP8 banks quantise the shared weights too (DeepSeek's FP8 checkpoints store them in
        FP8 as well). As with `keep_fp8`, `compute` is the reference until the next choice."""
        inter = self.inter_dim
        n = shared.w1.out_features // inter
        w1, w3 = shared.w1.weight.view(n, inter, -1), shared.w3.weight.view(n, inter, -1)  # [S, I, D]
        w2 = shared.w2.weight.view(-1, n, inter).transpose(0, 1)  # [S, D, I]
        dense13, dense2 = torch.cat([w1, w3], dim=1), w2
        if self.is_fp8:
            q13, s13 = quantize_stacked(dense13)
            q2, s2 = quantize_stacked(dense2)
            self.keep_fp8(torch.cat([self.w13, q13]), torch.cat([self.w13_scale, s13]),
                          torch.cat([self.w2, q2]), torch.cat([self.w2_scale, s2]))
        else:
            self.w13 = nn.Parameter(torch.cat([self.w13, dense13.to(self.w13.dtype)]), requires_grad=False)
            self.w2 = nn.Parameter(torch.cat([self.w2, dense2.to(self.w2.dtype)]), requires_grad=False)
        self.shared_slots = n
        self.compute = ExpertBank.reference

    def quantize_fp8(self) -> None:
        """Replace dense weights by their FP8 quantisation (DeepSeek's 128x128 blocks)."""
        self.keep_fp8(*quantize_stacked(self.w13), *quantize_stacked(self.w2))

    @property
    def is_fp8(self) -> bool:
        return self.w13.dtype == torch.float8_e4m3fn

    def pairs(self, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights) [T, K] -> (local slots, fp32 weights) [T, K + S]: -1 for ids not held
        here, then the S shared slots (see absorb_shared) that every token uses with weight 1."""
        slots = self.slot_of[ids.long()]  # [T, K]
        if not self.shared_slots:
            return slots, weights.float()
        E, T = self.w13.shape[0], ids.shape[0]
        shared = torch.arange(E - self.shared_slots, E, device=ids.device).expand(T, -1)  # [T, S]
        ones = torch.ones(shared.shape, device=ids.device)
        return torch.cat([slots, shared], dim=1), torch.cat([weights.float(), ones], dim=1)

    def expert_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, D], w2 [D, I]) of one slot, dense."""
        if not self.is_fp8:
            return self.w13[slot], self.w2[slot]
        return (dequantize_weight(self.w13[slot], self.w13_scale[slot], torch.float32),
                dequantize_weight(self.w2[slot], self.w2_scale[slot], torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, D]; ids: [T, K] logical ids (-1 or ids not held are skipped); weights: [T, K].
        Returns [T, D] = sum over held slots of weight * expert(x), accumulated in fp32."""
        return self.compute(self, x, ids, weights)

    def reference(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward` read plainly: each held expert applied to the tokens routed to it."""
        T, D = x.shape
        slots, weights = self.pairs(ids, weights)  # [T, K + S] each
        out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
        for slot in range(self.w13.shape[0]):
            token, k = (slots == slot).nonzero(as_tuple=True)  # [n] each: the pairs routed to this slot
            if token.numel() == 0:
                continue
            w13, w2 = self.expert_weights(slot)
            gate_up = F.linear(x[token].to(w13.dtype), w13)  # [n, 2I]
            act = F.silu(gate_up[:, : self.inter_dim]) * gate_up[:, self.inter_dim :]  # [n, I]
            y = F.linear(act, w2)  # [n, D]
            out.index_add_(0, token, y.float() * weights[token, k, None])
        return out.to(x.dtype)

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

    def absorb_shared_into_experts(self) -> None:
        """Serve the shared experts from the local bank (`ExpertBank.absorb_shared`)."""
        if isinstance(self.experts, ExpertBank) and self.shared is not None:
            self.experts.absorb_shared(self.shared)
            self.shared = None

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
