"""Block-scaled FP8 grouped GEMM for routed experts (DeepSeek-V3 style), in Triton.

    xq, xs = quantize_1x128(x)                   # model.fp8: x [M, K] -> e4m3 [M, K], fp32 [M, ceil(K/128)]
    out = fp8_grouped_mm(xq, xs, wq, ws, offsets, max_rows_per_group)   # -> [M, N]

Activations carry one scale per 1x128 tile, weights one per 128x128 block in the checkpoint's
[E, N, K] layout (`ws` is DeepSeek's `weight_scale_inv`: real = fp8 * scale, see model/fp8.py).
The kernel multiplies fp8 x fp8 on the tensor cores one 128-wide K block at a time and promotes
each partial product into an fp32 accumulator with both scales applied, as DeepSeek-V3 does.

Both kernels are safe inside a CUDA graph: the launch grid depends only on shapes and on the
static `max_rows_per_group`, never on the routing; each program reads its expert's rows from
`offsets` on the device and exits when its tile is empty. A launch config is a pure function of
the static shapes (no autotuning at call time).

Triton is imported lazily: this module imports on machines without it, and
`fp8_grouped_mm_available()` says whether the kernels can run. Without Triton or CUDA,
`model.fp8.quantize_1x128` runs its PyTorch ops and `fp8_grouped_mm` raises.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from model import fp8

BLOCK = fp8.BLOCK  # quantisation block: 1x128 for activations, 128x128 for weights


@dataclass(frozen=True)
class GemmConfig:
    """One launch config. BLOCK_K is always 128 (one scale per K step).

    swap_ab: compute each tile transposed (W_tile @ X_tile^T), so the weight's N dimension
    feeds the MMA's wide M side and the few token rows its narrow N side: the decode layout.
    """

    block_m: int = 16
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = True


# --------------------------------------------------------------------------------------------
# availability


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


_TRITON: bool | None = None  # probed once; a plain global, since torch.compile traces the readers


def _triton_importable() -> bool:
    global _TRITON
    if _TRITON is None:
        _TRITON = _probe_triton()
    return _TRITON


def fp8_grouped_mm_available(device: torch.device | str | int | None = None) -> bool:
    """True when Triton imports and `device` (default: the current CUDA device) is a CUDA GPU of
    compute capability 8.9+ (Ada, Hopper and newer have FP8 tensor cores)."""
    if device is not None:
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if device.type != "cuda":
            return False
    if not torch.cuda.is_available():
        return False
    try:
        major, minor = torch.cuda.get_device_capability(device)
    except Exception:
        return False
    return (major, minor) >= (8, 9) and _triton_importable()


def runs_triton(t: torch.Tensor) -> bool:
    """Whether `t` goes through the Triton kernels: CUDA tensors, or any under TRITON_INTERPRET=1
    (Triton's CPU interpreter, for checking the kernels' logic without a GPU)."""
    return (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _triton_importable()


# --------------------------------------------------------------------------------------------
# kernels (built on first use, so that importing this module needs no Triton)

_K = None  # namespace of jitted kernels once built


def _kernels():
    global _K
    if _K is not None:
        return _K
    import triton
    import triton.language as tl

    globals()["triton"], globals()["tl"] = triton, tl  # the jitted bodies resolve these as globals

    @triton.jit
    def quant_1x128_kernel(
        x_ptr, q_ptr, s_ptr,
        M, K,
        stride_xm, stride_qm, stride_sm,
        BLOCK_ROWS: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        kb = tl.program_id(1)
        rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = kb * 128 + tl.arange(0, 128)
        rmask = rows < M
        if EVEN_K:
            mask = rmask[:, None]
        else:
            mask = rmask[:, None] & (cols < K)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
        q = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows64 * stride_sm + kb, scale, mask=rmask)

    @triton.jit
    def grouped_mm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offs_ptr,
        N, K, E,
        stride_am, stride_asm,
        stride_be, stride_bn,
        stride_bse, stride_bsn,
        stride_cm,
        E_POW2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP_AB: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # Map this program's M tile to (expert, tile within the expert's group) from offsets:
        # experts' tiles are numbered consecutively, expert after expert.
        eidx = tl.arange(0, E_POW2)
        emask = eidx < E
        ends = tl.load(offs_ptr + eidx, mask=emask, other=0)
        starts = tl.load(offs_ptr + eidx - 1, mask=emask & (eidx > 0), other=0)
        ntiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(ntiles, 0)
        e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
        if e >= E:
            return
        sel = eidx == e
        first_tile = tl.sum(tl.where(sel, tile_end - ntiles, 0), 0)
        row_start = tl.sum(tl.where(sel, starts, 0), 0)
        row_end = tl.sum(tl.where(sel, ends, 0), 0)

        rows = row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = a_ptr + rows64[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
        as_ptrs = as_ptr + rows64 * stride_asm  # [BM]
        b_base = b_ptr + e.to(tl.int64) * stride_be
        bs_ptr_t = bs_ptr + e.to(tl.int64) * stride_bse + ((pid_n * BLOCK_N) // 128) * stride_bsn
        if SWAP_AB:
            b_ptrs = b_base + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :]  # [BN, BK]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            b_ptrs = b_base + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BK, BN]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        for k0 in range(0, K, BLOCK_K):
            kb = k0 // BLOCK_K
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            a_s = tl.load(as_ptrs + kb, mask=rmask, other=0.0)
            b_s = tl.load(bs_ptr_t + kb)
            if SWAP_AB:
                if EVEN_N:
                    b = tl.load(b_ptrs)
                else:
                    b = tl.load(b_ptrs, mask=nmask[:, None], other=0.0)
                acc += tl.dot(b, tl.trans(a)) * (a_s[None, :] * b_s)
            else:
                if EVEN_N:
                    b = tl.load(b_ptrs)
                else:
                    b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
                acc += tl.dot(a, b) * (a_s[:, None] * b_s)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        out = acc.to(c_ptr.dtype.element_ty)
        if SWAP_AB:
            c_ptrs = c_ptr + rows64[None, :] * stride_cm + offs_n[:, None]
            tl.store(c_ptrs, out, mask=rmask[None, :] & nmask[:, None])
        else:
            c_ptrs = c_ptr + rows64[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, out, mask=rmask[:, None] & nmask[None, :])

    class _NS:
        pass

    ns = _NS()
    ns.quant = quant_1x128_kernel
    ns.gemm = grouped_mm_kernel
    ns.triton = triton
    _K = ns
    return ns


# --------------------------------------------------------------------------------------------
# activations


def quantize_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.fp8.quantize_1x128`, through the Triton kernel where it runs (`runs_triton`): one
    launch and no host sync on CUDA, the same bytes."""
    if not runs_triton(x) or not x.is_floating_point() or x.dtype == torch.float8_e4m3fn or x.dim() == 0:
        return fp8.quantize_1x128(x)
    *lead, hidden = x.shape
    q, scales = quantize_1x128_triton(x.reshape(-1, hidden))
    return q.view(*lead, hidden), scales.view(*lead, -(-hidden // BLOCK))


def quantize_1x128_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.fp8.quantize_1x128` for x [M, K] in one kernel launch, no host sync: the same
    arithmetic (IEEE division, round-to-nearest-even cast), so the same bytes."""
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    groups = -(-k // BLOCK)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    kern = _kernels()
    block_rows = 16 if m >= 16 else 8 if m >= 8 else 4 if m >= 4 else 2 if m >= 2 else 1
    grid = (triton_cdiv(m, block_rows), groups)
    kern.quant[grid](x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0),
                     BLOCK_ROWS=block_rows, EVEN_K=(k % BLOCK == 0), num_warps=4 if block_rows >= 8 else 2)
    return q, s


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# grouped GEMM


def pick_config(m: int, n: int, k: int, num_experts: int, max_rows_per_group: int) -> GemmConfig:
    """Launch config from static shapes only (so it is fixed across CUDA-graph replays).

    Decode (few rows per expert): BLOCK_M 16 with the swapped layout (wgmma, N tile on the MMA's
    M side), BLOCK_N 64, the best or near it of the configs tried on DeepSeek-V2-Lite experts
    (docs/performance.md). Larger batches: bigger BLOCK_M so each weight tile serves more rows
    (tested for correctness, not tuned)."""
    rows_per_expert = m / max(1, min(num_experts, m))
    if rows_per_expert <= 16 or max_rows_per_group <= 16:
        return GemmConfig(block_m=16, block_n=64 if n <= 4096 else 128, num_warps=4, num_stages=4, swap_ab=True)
    if rows_per_expert <= 32:
        return GemmConfig(block_m=32, block_n=64 if n <= 4096 else 128, num_warps=4, num_stages=4, swap_ab=True)
    return GemmConfig(block_m=64, block_n=128, num_warps=4, num_stages=4, swap_ab=False)


def num_m_tiles(m: int, num_experts: int, max_rows_per_group: int, block_m: int) -> int:
    """Static bound on the M tiles of all groups together: each non-empty group wastes less than
    one tile, there are at most min(E, m) of them, and no group exceeds max_rows_per_group."""
    by_rows = m // block_m + min(num_experts, m)
    by_groups = num_experts * triton_cdiv(max(0, max_rows_per_group), block_m)
    return max(0, min(by_rows, by_groups))


def fp8_grouped_mm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    offsets: torch.Tensor,
    max_rows_per_group: int,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """out[r] = (xq[r] * xs[r]) @ (wq[e] * ws[e]).T for the rows r of expert e's group.

    xq: [M, K] float8_e4m3fn, rows grouped by expert; xs: [M, K/128] float32 (model.fp8.quantize_1x128).
    wq: [E, N, K] float8_e4m3fn; ws: [E, ceil(N/128), K/128] float32 (weight_scale_inv).
    offsets: [E] int32 on the device, end row of each group (torch._grouped_mm's `offs`);
    groups are rows [offsets[e-1], offsets[e]). Rows past offsets[-1] are left undefined.
    max_rows_per_group: a static bound on every group's row count (e.g. the token count);
    groups larger than it may be left partly uncomputed. K must be a multiple of 128.
    Returns [M, N] in out_dtype (bf16, fp16 or fp32). No host sync; CUDA-graph safe.
    """
    if not runs_triton(xq):
        raise RuntimeError("fp8_grouped_mm needs a CUDA device and Triton (see fp8_grouped_mm_available)")
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_grouped_mm: xq and wq must be float8_e4m3fn, got {xq.dtype} and {wq.dtype}")
    if xq.dim() != 2 or wq.dim() != 3:
        raise ValueError(f"fp8_grouped_mm: expected xq [M, K] and wq [E, N, K], got {tuple(xq.shape)} and {tuple(wq.shape)}")
    m, k = xq.shape
    e, n, kw = wq.shape
    if kw != k:
        raise ValueError(f"fp8_grouped_mm: K mismatch, xq {tuple(xq.shape)} vs wq {tuple(wq.shape)}")
    if k % BLOCK:
        raise ValueError(f"fp8_grouped_mm: K={k} must be a multiple of {BLOCK}")
    if tuple(xs.shape) != (m, k // BLOCK):
        raise ValueError(f"fp8_grouped_mm: xs has shape {tuple(xs.shape)}, expected {(m, k // BLOCK)}")
    if tuple(ws.shape) != (e, triton_cdiv(n, BLOCK), k // BLOCK):
        raise ValueError(f"fp8_grouped_mm: ws has shape {tuple(ws.shape)}, expected {(e, triton_cdiv(n, BLOCK), k // BLOCK)}")
    if offsets.dtype != torch.int32 or tuple(offsets.shape) != (e,):
        raise ValueError(f"fp8_grouped_mm: offsets must be int32 [{e}], got {offsets.dtype} {tuple(offsets.shape)}")
    if xs.dtype != torch.float32 or ws.dtype != torch.float32:
        raise TypeError(f"fp8_grouped_mm: scales must be float32, got {xs.dtype} and {ws.dtype}")
    if xq.stride(1) != 1:
        xq = xq.contiguous()
    if wq.stride(2) != 1:
        raise ValueError("fp8_grouped_mm: wq must be contiguous along K")
    ws = ws.contiguous()
    xs = xs.contiguous()
    offsets = offsets.contiguous()

    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    cfg = config or pick_config(m, n, k, e, max_rows_per_group)
    if cfg.block_n > BLOCK or BLOCK % cfg.block_n:
        raise ValueError(f"fp8_grouped_mm: block_n={cfg.block_n} must divide {BLOCK}")
    tiles_m = num_m_tiles(m, e, max_rows_per_group, cfg.block_m)
    if tiles_m == 0 or n == 0:
        return out
    kern = _kernels()
    grid = (tiles_m, triton_cdiv(n, cfg.block_n))
    kern.gemm[grid](
        xq, xs, wq, ws, out, offsets,
        n, k, e,
        xq.stride(0), xs.stride(0),
        wq.stride(0), wq.stride(1),
        ws.stride(0), ws.stride(1),
        out.stride(0),
        E_POW2=max(2, 1 << (e - 1).bit_length()),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=BLOCK,
        SWAP_AB=cfg.swap_ab,
        EVEN_N=(n % cfg.block_n == 0),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
