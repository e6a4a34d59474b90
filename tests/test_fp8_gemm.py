"""Block-scaled FP8 grouped GEMM and the 1x128 quantiser's Triton kernel (model/kernels/fp8_gemm.py).
The kernel tests need a CUDA GPU of compute capability 8.9+ with Triton and are skipped elsewhere;
run them with `pytest -m gpu tests/test_fp8_gemm.py`.
The fallback tests at the end run anywhere."""

from __future__ import annotations

import pytest
import torch

from model.kernels.fp8_gemm import quantize_1x128
from model.kernels import fp8_gemm
from model.fp8 import dequantize_weight, quantize_stacked
from model.kernels.fp8_gemm import GemmConfig, fp8_grouped_mm, fp8_grouped_mm_available

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (FP8 grouped GEMM)")
needs_fp8 = pytest.mark.skipif(not fp8_grouped_mm_available(), reason="needs Triton and a CUDA GPU of compute capability 8.9+")

CONFIGS = [
    None,  # pick_config's choice
    GemmConfig(block_m=16, block_n=64, num_warps=4, num_stages=4, swap_ab=True),
    GemmConfig(block_m=16, block_n=128, num_warps=4, num_stages=3, swap_ab=False),
    GemmConfig(block_m=32, block_n=128, num_warps=8, num_stages=4, swap_ab=True),
    GemmConfig(block_m=64, block_n=128, num_warps=4, num_stages=3, swap_ab=False),
]


def reference(xq, xs, wq, ws, offsets) -> torch.Tensor:
    """fp64 product of the dequantised activations and the dequantised weights, group by group."""
    x = xq.double() * xs.double().repeat_interleave(128, dim=1)
    out = torch.zeros(xq.shape[0], wq.shape[1], dtype=torch.float64, device=xq.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ dequantize_weight(wq[e], ws[e], torch.float64).T
        start = end
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_problem(counts, n, k, extra_rows=3, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    e = len(counts)
    w = torch.randn(e, n, k, device="cuda", generator=g) * 0.05
    w[1, :, :128] = 0  # a zero weight block: its scale is 1, its values 0
    wq, ws = quantize_stacked(w)
    m = sum(counts) + extra_rows  # rows past offsets[-1]: undefined, never compared
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    xq, xs = quantize_1x128(x)
    offsets = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    return xq, xs, wq, ws, offsets


@gpu
@needs_cuda
@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_1x128_round_trip_and_matches_torch(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(67, 2048, device="cuda", generator=g) * 4).to(dtype)
    x[3] = 0  # an all-zero row
    x[10, 256:384] = 0  # an all-zero tile
    x[11, :128] = 1e-30 if dtype == torch.float32 else 0  # a tiny tile (fp32 subnormal range)
    q, s = quantize_1x128(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (67, 16)
    assert torch.all(s[3] == 1) and torch.all(q[3].float() == 0)
    assert s[10, 2] == 1 and torch.all(q[10, 256:384].float() == 0)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() <= 448
    scaled = x.float() / s.repeat_interleave(128, dim=1)
    err = (q.float() - scaled).abs()
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 of the value for normals, 2^-10 absolute for subnormals
    assert torch.all(err <= torch.maximum(scaled.abs() / 16, torch.full_like(err, 2.0**-9)))
    deq = q.float() * s.repeat_interleave(128, dim=1)
    assert ((deq - x.float()).norm() / x.float().norm()).item() < 0.04
    q_ref, s_ref = quantize_1x128(x.cpu())  # PyTorch ops: what the transport puts on the wire
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8))


@gpu
@needs_cuda
@needs_fp8
def test_quantize_1x128_uneven_k_and_few_rows():
    x = torch.randn(3, 300, device="cuda")
    q, s = quantize_1x128(x)
    q_ref, s_ref = quantize_1x128(x.cpu())
    assert s.shape == (3, 3) and torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8))


@gpu
@needs_cuda
@needs_fp8
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "auto" if c is None else f"m{c.block_m}n{c.block_n}w{c.num_warps}s{c.num_stages}{'swap' if c.swap_ab else ''}")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_dequantised_reference(config, out_dtype):
    max_rows = 70
    # uneven groups: empty ones (first, middle, last), one row, one at exactly max_rows, several tiles
    counts = [0, 5, 33, 0, 1, max_rows, 17, 0]
    xq, xs, wq, ws, offsets = make_problem(counts, n=320, k=384)  # N not a multiple of 128
    out = fp8_grouped_mm(xq, xs, wq, ws, offsets, max_rows, out_dtype=out_dtype, config=config)
    assert out.shape == (xq.shape[0], 320) and out.dtype == out_dtype
    total = int(offsets[-1])
    ref = reference(xq, xs, wq, ws, offsets)[:total]
    err = rel_err(out[:total], ref)
    # fp32 out measured 1.3e-4 on an H200 (Hopper's FP8 MMA adds in reduced precision inside each
    # 128-wide K block; promoting to fp32 between blocks keeps it there); bf16 out adds its rounding
    assert err < (1e-3 if out_dtype == torch.float32 else 1e-2), err
    assert torch.isfinite(out[:total].float()).all()


@gpu
@needs_cuda
@needs_fp8
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_grouped_mm_deepseek_v2_lite_shapes(tokens):
    """w13 [64, 2816, 2048] and w2 [64, 2048, 1408] with top-6 random routing, bf16 out."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    e, top_k = 64, 6
    ids = torch.rand(tokens, e, device="cuda", generator=g).argsort(dim=1)[:, :top_k]
    counts = torch.bincount(ids.flatten(), minlength=e)
    offsets = counts.cumsum(0).to(torch.int32)
    m = tokens * top_k
    for n, k in [(2816, 2048), (2048, 1408)]:
        wq, ws = quantize_stacked(torch.randn(e, n, k, device="cuda", generator=g) * 0.02)
        xq, xs = quantize_1x128(torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16))
        out = fp8_grouped_mm(xq, xs, wq, ws, offsets, tokens)
        err = rel_err(out, reference(xq, xs, wq, ws, offsets))
        assert err < 1e-2, (n, k, err)


@gpu
@needs_cuda
@needs_fp8
def test_cuda_graph_replay_with_new_routing_equals_eager():
    e, n, k, tokens, top_k = 16, 256, 512, 24, 4
    m = tokens * top_k
    g = torch.Generator(device="cuda").manual_seed(7)
    wq, ws = quantize_stacked(torch.randn(e, n, k, device="cuda", generator=g) * 0.05)
    x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    offsets = torch.empty(e, device="cuda", dtype=torch.int32)

    def routing(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        scores = torch.rand(tokens, e, device="cuda", generator=gen)
        scores[: tokens // 2, 3] = 2.0  # a crowded expert: tokens // 2 rows at least
        ids = scores.argsort(dim=1, descending=True)[:, :top_k]  # distinct experts per token
        counts = torch.bincount(ids.flatten(), minlength=e)
        return counts.cumsum(0).to(torch.int32), torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)

    def step():
        xq, xs = quantize_1x128(x)
        return fp8_grouped_mm(xq, xs, wq, ws, offsets, tokens)

    new_offsets, new_x = routing(0)
    offsets.copy_(new_offsets)
    x.copy_(new_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    for seed in (1, 2, 3):
        new_offsets, new_x = routing(seed)
        offsets.copy_(new_offsets)  # in place: the graph reads the new routing
        x.copy_(new_x)
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
        xq, xs = quantize_1x128(x)
        assert rel_err(eager, reference(xq, xs, wq, ws, offsets)) < 1e-2


# ---- anywhere ---------------------------------------------------------------------------------


def test_cpu_quantize_fallback_round_trip():
    x = torch.randn(5, 300) * 3
    x[2] = 0
    q, s = quantize_1x128(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    assert torch.all(s[2] == 1) and torch.all(q[2].float() == 0)
    deq = q.float() * s.repeat_interleave(128, dim=1)[:, :300]
    assert ((deq - x).norm() / x.norm()).item() < 0.04


def test_not_available_off_cuda():
    assert not fp8_grouped_mm_available("cpu")
    with pytest.raises((RuntimeError, TypeError)):
        fp8_grouped_mm(
            torch.zeros(2, 128).to(torch.float8_e4m3fn), torch.ones(2, 1),
            torch.zeros(1, 128, 128).to(torch.float8_e4m3fn), torch.ones(1, 1, 1),
            torch.tensor([2], dtype=torch.int32), 2,
        )


def test_pick_config_is_static_and_valid():
    for m, n, k in [(6, 2816, 2048), (96, 2048, 1408), (384, 2816, 2048), (8192, 2816, 2048)]:
        cfg = fp8_gemm.pick_config(m, n, k, 64, min(m, 64))
        assert 128 % cfg.block_n == 0 and cfg.block_m in (16, 32, 64)
    # grid bound: each non-empty group wastes < 1 tile, at most min(E, M) groups are non-empty
    assert fp8_gemm.num_m_tiles(6, 64, 1, 16) == 6
    assert fp8_gemm.num_m_tiles(384, 64, 64, 16) == 24 + 64
