"""Mixture-of-Experts: the gate, a bank of routed experts, and the MoE block.

The block talks to its routed experts only through `dispatch` and `combine`, so a distributed
runtime can swap the local `ExpertBank` for one that sends the work to remote shards.
"""

from __future__ import annotations

import math
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


def group_by_key(key: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """key: [P] values in [0, n_keys) -> (order [P]: a stable permutation that groups equal keys
    in key order, counts [n_keys]). A counting sort from one-hot prefix sums, a few fusable
    elementwise kernels: argsort's radix sort took 27 us per MoE layer of a batch-64 decode step
    on an H200, longer than the layer's attention projections."""
    onehot = (key[:, None] == torch.arange(n_keys, device=key.device)).to(torch.int32)  # [P, n_keys]
    counts = onehot.sum(0, dtype=torch.int32)  # [n_keys]
    rank = (onehot.cumsum(0, dtype=torch.int32) * onehot).sum(1, dtype=torch.int32) - 1  # [P] place within its key
    starts = counts.cumsum(0, dtype=torch.int32) - counts  # [n_keys] first row of each key
    dest = (starts[key] + rank).long()  # [P]
    order = torch.empty_like(dest).scatter_(0, dest, torch.arange(key.numel(), device=key.device))
    return order, counts


class RoutedExperts(Protocol):
    """Where a MoE block's routed experts run: in this process or on remote shards."""

    # whether torch.compile can trace dispatch and combine into a decode graph
    traceable: bool

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> object: ...

    def combine(self, handle: object) -> torch.Tensor: ...


# rows per expert up to which the CPU loop multiplies weight-left (see _experts_one_by_one)
THIN_ROWS = 8
# tokens from which a compiled CPU graph sorts its (token, expert) pairs by expert (_forward_pairs)
SORTED_PAIRS_FROM = 4


class ExpertBank(nn.Module):
    """One layer's routed experts, all of them or a subset, addressed by logical expert id.

    Weights are stacked so an expert is a slice, not a module: w13 [E, 2I, D] holds gate and up
    projections together, w2 [E, D, I] the down projections. After `keep_fp8` (GPUs with FP8
    tensor cores) they stay float8_e4m3fn with DeepSeek's 128x128 block scales (w13_scale
    [E, 2I/128, D/128], w2_scale [E, D/128, I/128]) and the grouped path multiplies them with
    block-scaled FP8 GEMMs over activations quantised per 1x128 tile.
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
        self.grouped: bool | None = None  # None: one grouped GEMM on CUDA, a loop elsewhere
        self.build_slot_table(self.w13.device)

    def build_slot_table(self, device: torch.device | str) -> None:
        """slot_of[id] = local slot of a held expert, -1 otherwise; the last entry serves id -1."""
        slot = torch.full((self.n_routed_experts + 1,), -1, dtype=torch.long, device=device)
        slot[torch.tensor(self.expert_ids, dtype=torch.long, device=device)] = torch.arange(len(self.expert_ids), device=device)
        self.slot_of = slot

    def keep_fp8(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor) -> None:
        """Hold FP8 weights (shapes as in the class docstring) instead of dense ones."""
        from model.fp8_gemm import fp8_grouped_mm_available

        if not fp8_grouped_mm_available(w13.device):
            raise ValueError(f"FP8 expert GEMMs need Triton and a CUDA device of compute capability 8.9+ (got {w13.device})")
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.w13_scale, self.w2_scale = w13_scale.float(), w2_scale.float()
        self.grouped = True

    def absorb_shared(self, shared: MLP) -> None:
        """Take a shared-experts MLP [D -> S*I -> D] in as S more experts that every token uses
        with weight 1, so one grouped GEMM per projection serves shared and routed experts alike:
        splitting SwiGLU's hidden dimension into S slices and summing their outputs is the same
        MLP. On GPUs this drops the shared MLP's four kernels per layer; FP8 banks quantise the
        shared weights too (DeepSeek's FP8 checkpoints store them in FP8 as well)."""
        inter = self.inter_dim
        n = shared.w1.out_features // inter
        w1, w3 = shared.w1.weight.view(n, inter, -1), shared.w3.weight.view(n, inter, -1)  # [S, I, D]
        w2 = shared.w2.weight.view(-1, n, inter).transpose(0, 1)  # [S, D, I]
        dense13, dense2 = torch.cat([w1, w3], dim=1), w2
        if self.is_fp8:
            from model.fp8 import quantize_stacked

            q13, s13 = quantize_stacked(dense13)
            q2, s2 = quantize_stacked(dense2)
            self.keep_fp8(torch.cat([self.w13, q13]), torch.cat([self.w13_scale, s13]),
                          torch.cat([self.w2, q2]), torch.cat([self.w2_scale, s2]))
        else:
            self.w13 = nn.Parameter(torch.cat([self.w13, dense13.to(self.w13.dtype)]), requires_grad=False)
            self.w2 = nn.Parameter(torch.cat([self.w2, dense2.to(self.w2.dtype)]), requires_grad=False)
        self.shared_slots = n
        self.grouped = True

    def quantize_fp8(self) -> None:
        """Replace dense weights by their FP8 quantisation (DeepSeek's 128x128 blocks)."""
        from model.fp8 import quantize_stacked

        self.keep_fp8(*quantize_stacked(self.w13), *quantize_stacked(self.w2))

    @property
    def is_fp8(self) -> bool:
        return self.w13.dtype == torch.float8_e4m3fn

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, D]; ids: [T, K] logical ids (-1 or ids not held are skipped); weights: [T, K].

        Returns [T, D] = sum over held slots of weight * expert(x), accumulated in fp32.
        `grouped` picks one grouped GEMM over all experts (no host sync, fixed shapes: what a
        CUDA graph needs); a compiled CPU graph multiplies pair by pair (`_forward_pairs`); otherwise the pairs are sorted by expert on the host and only the
        experts that received tokens run (CPU: grouped GEMM has no fast kernel there).
        """
        if self.grouped is None and not x.is_cuda and torch.compiler.is_compiling():
            return self._forward_pairs(x, ids, weights)
        grouped = x.is_cuda if self.grouped is None else self.grouped
        return self._forward_grouped(x, ids, weights) if grouped else self._forward_sorted(x, ids, weights)

    def _forward_pairs(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every (token, expert) pair multiplied by its expert's weights as a product summed over
        the input dimension, with no grouping: in a compiled CPU graph each projection becomes one
        kernel that streams each pair's weights without gathering them (what a decode step of a
        few tokens wants: its pairs rarely share an expert). Past SORTED_PAIRS_FROM tokens the
        pairs are sorted by expert first (batch 16: ~8% off the compiled step)."""
        T, K = ids.shape
        slots = self.slot_of[ids.long()]  # [T, K] local slot or -1
        w = torch.where(slots >= 0, weights.float(), 0.0)  # pairs of experts not held add nothing
        if T <= SORTED_PAIRS_FROM:
            ys = self._pair_outputs(x[:, None, :], slots)  # [T, K, D]
        else:  # pairs of one expert in a row: the later ones find its weights in cache
            order = slots.view(-1).argsort()  # [T*K]
            sorted_ys = self._pair_outputs(x[order // K], slots.view(-1)[order])  # [T*K, D]
            ys = torch.empty_like(sorted_ys).index_put_((order,), sorted_ys).view(T, K, -1)  # back to (token, k)
        return (ys * w[..., None]).sum(1).to(x.dtype)

    def _pair_outputs(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """rows [..., D] (broadcast against slots' shape); slots [...] -> each slot's expert applied
        to its row, [..., D] fp32 (a slot of -1 computes slot 0's output, which its zero weight cancels)."""
        take = slots.clamp(min=0)
        gate_up = (self.w13[take].float() * rows[..., None, :].float()).sum(-1)  # [..., 2I]
        act = F.silu(gate_up[..., : self.inter_dim]) * gate_up[..., self.inter_dim :]  # [..., I]
        return (self.w2[take].float() * act[..., None, :]).sum(-1)  # [..., D]

    def _forward_sorted(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        slots = self.slot_of[ids.long()].view(-1)  # [T*K] local slot or -1
        order = slots.argsort(stable=True)  # not-held (-1) first, then grouped by slot
        counts = torch.bincount(slots + 1, minlength=len(self.expert_ids) + 1)
        skipped, *held = counts.tolist()
        order = order[skipped:]
        tokens = order // K  # [N] token of each held (token, k) pair, grouped by expert
        xs = x[tokens]  # [N, D]
        touched = sum(1 for n in held if n)
        if x.dtype == torch.float32 and 2 * touched >= len(held) and torch.get_num_threads() > 1:
            width = math.ceil(1.5 * len(order) / touched)  # rows per expert in the batched GEMMs
            ys = self._experts_padded(xs, slots[order], counts[1:], held, width)
        else:
            ys = self._experts_one_by_one(xs, held)
        scaled = ys.float() * weights.reshape(-1)[order].float()[:, None]
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, tokens, scaled).to(x.dtype)

    def _experts_one_by_one(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """xs: [N, D] rows grouped by slot, counts[slot] rows each -> [N, D], one GEMM pair per
        expert that received rows. On CPU in fp32, an expert with at most THIN_ROWS rows multiplies
        with the weight on the left and its rows as a transposed view: MKL streams a weight 1.2
        to 1.7x faster that way than through F.linear for 2 to 8 rows on one thread (F.linear
        packs the weight first; at 12 rows it wins), and a decode batch gives most experts that
        few rows. A single row gets a zero row beside it: MKL's one-column product streamed the
        weight ~1.5x slower than a two-column one (AVX-512 host, 2026-12-06)."""
        ys = torch.empty_like(xs)
        inter, start = self.inter_dim, 0
        for slot, count in enumerate(counts):
            if not count:
                continue
            rows, out = xs[start : start + count], ys[start : start + count]
            if count <= THIN_ROWS and xs.dtype == torch.float32 and not xs.is_cuda:
                if count == 1:
                    rows = F.pad(rows, (0, 0, 0, 1))  # [2, D]
                gate_up = torch.mm(self.w13[slot], rows.t())  # [2I, n]
                act = (F.silu(gate_up[:inter]) * gate_up[inter:]).t().contiguous()  # [n, I]
                out.copy_(torch.mm(self.w2[slot], act.t()).t()[:count])  # [D, n] -> [count, D]
            else:
                gate_up = F.linear(rows, self.w13[slot])  # [n, 2I]
                act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
                torch.mm(act, self.w2[slot].t(), out=out)  # [n, D]
            start += count
        return ys

    def _experts_padded(self, xs: torch.Tensor, row_slots: torch.Tensor, counts: torch.Tensor, counts_list: list[int], width: int) -> torch.Tensor:
        """As `_experts_one_by_one`, with the first `width` rows of every held expert (zero-padded)
        in two batched GEMMs over all held experts, and the few rows past `width` of the busiest
        experts one expert at a time. When most experts received rows, streaming every weight in
        one call beats a GEMM pair per expert (fp32 on 2 AMD cores: ~15-30 GB/s against ~8; on one
        thread the loop wins, so the caller keeps it there), while padding every expert to the
        busiest one's rows would waste more than it gains. row_slots: [N] slot of each row;
        counts / counts_list: [E] rows per slot."""
        E, D = self.w13.shape[0], xs.shape[1]
        rank = torch.arange(xs.shape[0], device=xs.device) - (counts.cumsum(0) - counts)[row_slots]  # [N] row within its expert
        batched = rank < width
        padded = xs.new_zeros(E, width, D)
        padded[row_slots[batched], rank[batched]] = xs[batched]
        # weights on the left, activations as transposed views: MKL's fast layout for thin
        # right-hand sides (a contiguous [E, K, n] operand ran ~3x slower)
        gate_up = torch.bmm(self.w13, padded.transpose(1, 2))  # [E, 2I, n]
        act = F.silu(gate_up[:, : self.inter_dim]) * gate_up[:, self.inter_dim :]  # [E, I, n]
        out = torch.bmm(self.w2, act.transpose(1, 2).contiguous().transpose(1, 2))  # [E, D, n]
        ys = torch.empty_like(xs)
        ys[batched] = out[row_slots[batched], :, rank[batched]]
        overflow = [max(n - width, 0) for n in counts_list]
        if any(overflow):
            rest = ~batched
            ys[rest] = self._experts_one_by_one(xs[rest], overflow)
        return ys

    def _forward_grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T = ids.shape[0]
        E = self.w13.shape[0]  # routed slots, then shared ones
        slots = self.slot_of[ids.long()]  # [T, K]
        if self.shared_slots:
            shared = torch.arange(E - self.shared_slots, E, device=x.device).expand(T, -1)
            slots = torch.cat([slots, shared], dim=1)
            weights = torch.cat([weights.float(), torch.ones(shared.shape, device=x.device)], dim=1)
        K = slots.shape[1]
        slots = slots.view(-1)  # [T*K]
        held = slots >= 0
        key = torch.where(held, slots, E)  # not-held pairs go last, into no group
        order, counts = group_by_key(key, E + 1)  # [T*K], [E+1]
        offsets = counts[:E].cumsum(0).to(torch.int32)  # [E] end row of each expert's group
        tokens = order // K
        xs = x[tokens]  # [T*K, D] rows grouped by expert
        gate_up = self._project(xs, self.w13, self.w13_scale, offsets, T)  # [T*K, 2I]
        act = F.silu(gate_up[:, : self.inter_dim]) * gate_up[:, self.inter_dim :]
        ys = self._project(act, self.w2, self.w2_scale, offsets, T)  # [T*K, D]
        w = torch.where(held, weights.reshape(-1).float(), 0.0)[order]  # [T*K]
        scaled = torch.where(held[order, None], ys.float() * w[:, None], 0.0)  # rows past the groups are garbage
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, tokens, scaled).to(x.dtype)

    @staticmethod
    def _project(rows: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, offsets: torch.Tensor, tokens: int) -> torch.Tensor:
        """rows [M, K] grouped by expert x w [E, N, K] -> [M, N]; a group never exceeds `tokens`
        rows (a token picks an expert at most once)."""
        if w.dtype != torch.float8_e4m3fn:
            return grouped_mm(rows, w.transpose(1, 2), offsets)
        from model.fp8_gemm import fp8_grouped_mm, quantize_1x128

        q, q_scale = quantize_1x128(rows)
        return fp8_grouped_mm(q, q_scale, w, scale, offsets, tokens, out_dtype=rows.dtype)

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
        """Serve the shared experts from the local bank's grouped GEMMs (`ExpertBank.absorb_shared`)."""
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
