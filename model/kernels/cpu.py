"""CPU compute: expert loops for eager steps, weight-streaming products for compiled decode graphs,
and the oneDNN-prepacked LM head.

A CPU decode step is bound by reading weights. Eagerly, the routed experts are sorted by expert
on the host so each touched expert's weights are read once (`sorted_experts`). Inside a graph
compiled by torch.compile (model/compiled_decode.py) every weight is multiplied as a product
summed over its input dimension (`StreamingLinear`, `pair_experts`), which inductor turns into
one kernel streaming the weight at a multiple of MKL's small-M GEMM bandwidth. Where the rules'
numbers come from: docs/performance.md, "Where the kernels' rules come from".
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import LMHead
from model.moe import ExpertBank

# rows per expert up to which the eager loop multiplies weight-left: MKL streams a weight faster
# that way than through F.linear for 2 to 8 rows (docs/performance.md)
THIN_ROWS = 8
# tokens from which a compiled graph sorts its (token, expert) pairs by expert, so that pairs of
# one expert follow each other and find its weights in cache (docs/performance.md)
SORTED_PAIRS_FROM = 4
# rows up to which a compiled graph multiplies by a weight as a streamed product: beyond it
# oneDNN's packed GEMMs win (docs/performance.md)
STREAMED_ROWS = 4


# ---- routed experts ------------------------------------------------------------------------


def sorted_experts(bank: ExpertBank, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`ExpertBank.forward` for eager steps: the (token, expert) pairs sorted by expert on the
    host, and only the experts that received tokens run (grouped GEMMs have no fast CPU kernel)."""
    T, K = ids.shape
    slots = bank.slot_of[ids.long()].view(-1)  # [T*K] local slot or -1
    order = slots.argsort(stable=True)  # not-held (-1) first, then grouped by slot
    counts = torch.bincount(slots + 1, minlength=len(bank.expert_ids) + 1)
    skipped, *held = counts.tolist()
    order = order[skipped:]
    tokens = order // K  # [N] token of each held (token, k) pair, grouped by expert
    xs = x[tokens]  # [N, D]
    touched = sum(1 for n in held if n)
    if x.dtype == torch.float32 and 2 * touched >= len(held) and torch.get_num_threads() > 1:
        width = math.ceil(1.5 * len(order) / touched)  # rows per expert in the batched GEMMs
        ys = _experts_padded(bank, xs, slots[order], counts[1:], held, width)
    else:
        ys = _experts_one_by_one(bank, xs, held)
    scaled = ys.float() * weights.reshape(-1)[order].float()[:, None]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, scaled).to(x.dtype)


def _experts_one_by_one(bank: ExpertBank, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """xs: [N, D] rows grouped by slot, counts[slot] rows each -> [N, D], one GEMM pair per
    expert that received rows. In fp32, an expert with at most THIN_ROWS rows multiplies with the
    weight on the left and its rows as a transposed view (F.linear packs the weight first, which
    only pays off for more rows), and a single row gets a zero row beside it (MKL's one-column
    product streams the weight slower than a two-column one)."""
    ys = torch.empty_like(xs)
    inter, start = bank.inter_dim, 0
    for slot, count in enumerate(counts):
        if not count:
            continue
        rows, out = xs[start : start + count], ys[start : start + count]
        if count <= THIN_ROWS and xs.dtype == torch.float32:
            if count == 1:
                rows = F.pad(rows, (0, 0, 0, 1))  # [2, D]
            gate_up = torch.mm(bank.w13[slot], rows.t())  # [2I, n]
            act = (F.silu(gate_up[:inter]) * gate_up[inter:]).t().contiguous()  # [n, I]
            out.copy_(torch.mm(bank.w2[slot], act.t()).t()[:count])  # [D, n] -> [count, D]
        else:
            gate_up = F.linear(rows, bank.w13[slot])  # [n, 2I]
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            torch.mm(act, bank.w2[slot].t(), out=out)  # [n, D]
        start += count
    return ys


def _experts_padded(bank: ExpertBank, xs: torch.Tensor, row_slots: torch.Tensor, counts: torch.Tensor,
                    counts_list: list[int], width: int) -> torch.Tensor:
    """As `_experts_one_by_one`, with the first `width` rows of every held expert (zero-padded)
    in two batched GEMMs over all held experts, and the few rows past `width` of the busiest
    experts one expert at a time. When most experts received rows, streaming every weight in one
    call beats a GEMM pair per expert on two or more threads (on one the loop wins, so the caller
    keeps it there), while padding every expert to the busiest one's rows would waste more than it
    gains. row_slots: [N] slot of each row; counts / counts_list: [E] rows per slot."""
    E, D = bank.w13.shape[0], xs.shape[1]
    rank = torch.arange(xs.shape[0], device=xs.device) - (counts.cumsum(0) - counts)[row_slots]  # [N] row within its expert
    batched = rank < width
    padded = xs.new_zeros(E, width, D)
    padded[row_slots[batched], rank[batched]] = xs[batched]
    # weights on the left, activations as transposed views: MKL's fast layout for thin
    # right-hand sides (a contiguous [E, K, n] operand ran several times slower)
    gate_up = torch.bmm(bank.w13, padded.transpose(1, 2))  # [E, 2I, n]
    act = F.silu(gate_up[:, : bank.inter_dim]) * gate_up[:, bank.inter_dim :]  # [E, I, n]
    out = torch.bmm(bank.w2, act.transpose(1, 2).contiguous().transpose(1, 2))  # [E, D, n]
    ys = torch.empty_like(xs)
    ys[batched] = out[row_slots[batched], :, rank[batched]]
    overflow = [max(n - width, 0) for n in counts_list]
    if any(overflow):
        rest = ~batched
        ys[rest] = _experts_one_by_one(bank, xs[rest], overflow)
    return ys


def pair_experts(bank: ExpertBank, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`ExpertBank.forward` for compiled graphs: every (token, expert) pair multiplied by its
    expert's weights as a product summed over the input dimension, with no grouping, so each
    projection becomes one kernel that streams each pair's weights without gathering them (what a
    decode step of a few tokens wants: its pairs rarely share an expert). From SORTED_PAIRS_FROM
    tokens on, the pairs are sorted by expert first."""
    T, K = ids.shape
    slots = bank.slot_of[ids.long()]  # [T, K] local slot or -1
    w = torch.where(slots >= 0, weights.float(), 0.0)  # pairs of experts not held add nothing
    if T <= SORTED_PAIRS_FROM:
        ys = _pair_outputs(bank, x[:, None, :], slots)  # [T, K, D]
    else:  # pairs of one expert in a row: the later ones find its weights in cache
        order = slots.view(-1).argsort()  # [T*K]
        sorted_ys = _pair_outputs(bank, x[order // K], slots.view(-1)[order])  # [T*K, D]
        ys = torch.empty_like(sorted_ys).index_put_((order,), sorted_ys).view(T, K, -1)  # back to (token, k)
    return (ys * w[..., None]).sum(1).to(x.dtype)


def _pair_outputs(bank: ExpertBank, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """rows [..., D] (broadcast against slots' shape); slots [...] -> each slot's expert applied
    to its row, [..., D] fp32 (a slot of -1 computes slot 0's output, which its zero weight cancels)."""
    take = slots.clamp(min=0)
    gate_up = (bank.w13[take].float() * rows[..., None, :].float()).sum(-1)  # [..., 2I]
    act = F.silu(gate_up[..., : bank.inter_dim]) * gate_up[..., bank.inter_dim :]  # [..., I]
    return (bank.w2[take].float() * act[..., None, :]).sum(-1)  # [..., D]


# ---- linears and the LM head ---------------------------------------------------------------


def _streamed(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [.., in] @ weight [out, in].T as (w * x).sum(-1), which inductor turns into one kernel
    streaming the weight."""
    # a view of x's storage, so inductor stores x once rather than recomputing its producers (an
    # RMSNorm, say) for every output row inside the streaming loop
    x = x.as_strided(x.shape, x.stride())
    return (weight.float() * x[..., None, :].float()).sum(-1).to(x.dtype)  # [.., out]


class StreamingLinear(nn.Linear):
    """nn.Linear inside a compiled CPU graph: up to STREAMED_ROWS rows, the weight is streamed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() <= STREAMED_ROWS:
            return _streamed(self.weight, x)
        return super().forward(x)


class StreamingLMHead(LMHead):
    """`LMHead` inside a compiled CPU graph, streamed as `StreamingLinear` is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() <= STREAMED_ROWS:
            return _streamed(self.weight, x).float()
        return super().forward(x)


class PackedLMHead(LMHead):
    """`LMHead` on a oneDNN-prepacked fp32 copy of its weight, for eager CPU steps: MKL's sgemm
    handles this wide, short shape badly. oneDNN packs bf16 only on AVX-512/AVX-NE-CONVERT CPUs,
    so a bf16 model's head also runs in fp32 here (one extra fp32 copy of the head; logits are
    fp32 anyway). Repacks when the weight changes (new tensor or in-place write)."""

    _packed_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if self._packed_key != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().float(), None)
            self._packed_key = key
        return torch.ops.mkldnn._linear_pointwise(x.float(), self._packed, None, "none", [], "")


def install(model: nn.Module, on_cpu: bool) -> None:
    """The LM head for the model's device: prepacked on CPU (where oneDNN is built in), plain
    elsewhere, so that installing again after a move undoes an earlier choice."""
    packed = on_cpu and torch.backends.mkldnn.is_available()
    for module in model.modules():
        if type(module) in (LMHead, PackedLMHead):
            module.__class__ = PackedLMHead if packed else LMHead


@contextlib.contextmanager
def compiled_variants(model: nn.Module):
    """While tracing a compiled CPU decode graph: streaming linears and head, and `pair_experts`
    for banks that run `sorted_experts`. Restored afterwards, so eager steps of the same model
    (prefill, larger batches) keep their kernels. A graph holds what it traced: the decoder
    enters this around each guarded step (see model/compiled_decode.py)."""
    classes = {nn.Linear: StreamingLinear, LMHead: StreamingLMHead, PackedLMHead: StreamingLMHead}
    swapped, computes = [], []
    for module in model.modules():
        if type(module) in classes:
            swapped.append((module, type(module)))
            module.__class__ = classes[type(module)]
        elif isinstance(module, ExpertBank) and module.compute is sorted_experts:
            computes.append(module)
            module.compute = pair_experts
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
        for bank in computes:
            bank.compute = sorted_experts
