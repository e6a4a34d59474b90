"""FP8 1x128 dispatch quantiser: exactness, the per-block error bound, edge cases, wire bytes.

Bound under test (derived in model/fp8.py): with s = amax/448 per 128-channel
block, e4m3's 3 mantissa bits give a round-to-nearest error of at most half a step, so
    |x - dequant(quant(x))| <= max(|x| * 2^-4, s * 2^-10)    for every element,
which is at most amax/16 (the |x| = amax case) anywhere in the block.
"""

from __future__ import annotations

import math

import pytest
import torch

from services.wire import codec, dtypes
from services.transport import ucx_framing as wire

FP32_SLACK = 1 + 2 ** -20       # x/s and q*s are rounded once more in float32


def _all_finite_e4m3() -> torch.Tensor:
    """Every finite float8_e4m3fn value, as float32 (bit patterns 0x7F / 0xFF are NaN)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)]


def _bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    s = scales.repeat_interleave(dtypes.FP8_GROUP, dim=-1)[..., :x.shape[-1]]
    return torch.maximum(x.abs() * 2 ** -4, s * 2 ** -10) * FP32_SLACK


@pytest.mark.parametrize("power_of_two_scale", [1.0, 2.0 ** -6, 2.0 ** 5])
def test_e4m3_representable_values_round_trip_exactly(power_of_two_scale):
    gen = torch.Generator().manual_seed(0)
    values = _all_finite_e4m3()
    x = values[torch.randint(0, values.numel(), (16, 384), generator=gen)]
    x[:, ::dtypes.FP8_GROUP] = 448.0          # every block's amax is 448, so its scale is exactly 1
    x = x * power_of_two_scale         # ... or exactly this power of two
    q, scales = codec.quantize_1x128(x)
    assert torch.equal(scales, torch.full((16, 3), power_of_two_scale))
    assert torch.equal(codec.dequantize_1x128(q, scales), x)


@pytest.mark.parametrize("hidden", [64, 128, 200, 7168])
def test_error_stays_within_the_e4m3_bound_of_each_block(hidden):
    gen = torch.Generator().manual_seed(hidden)
    # magnitudes spanning 1e-6 .. 1e3 inside the same block reach e4m3's subnormal range
    x = torch.randn(32, hidden, generator=gen) * torch.logspace(-6, 3, hidden)[torch.randperm(hidden, generator=gen)]
    q, scales = codec.quantize_1x128(x)
    err = (codec.dequantize_1x128(q, scales) - x).abs()
    bound = _bound(x, scales)
    assert bool((err <= bound).all()), f"worst err/bound {float((err / bound).max()):.3f}"
    assert float((err / bound).max()) > 0.5          # the bound is tight, not vacuous
    amax = x.abs().amax(-1, keepdim=True)
    assert bool((err <= amax / 16).all())


def test_block_scale_is_amax_over_448_and_a_partial_last_block_uses_only_its_channels():
    x = torch.zeros(2, 200)
    x[0, :128] = torch.linspace(-7.0, 3.0, 128)
    x[0, 128:] = torch.linspace(0.0, 0.5, 72)         # the partial block: 72 real channels
    x[1, 5] = -896.0
    q, scales = codec.quantize_1x128(x)
    assert q.shape == (2, 200) and q.dtype == torch.float8_e4m3fn
    assert scales.shape == (2, 2) and scales.dtype == torch.float32
    torch.testing.assert_close(scales, torch.tensor([[7 / 448, 0.5 / 448], [2.0, 1.0]]))


def test_zeros_and_all_zero_blocks_come_back_as_zeros_without_nan():
    x = torch.zeros(3, 256)
    x[1, 200] = 1e-30                     # a block whose amax is far below e4m3's range
    q, scales = codec.quantize_1x128(x)
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    assert scales[0].tolist() == [1.0, 1.0]
    out = codec.dequantize_1x128(q, scales)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[0], torch.zeros(256)) and torch.equal(out[2], torch.zeros(256))
    assert float(out[1, 200]) == pytest.approx(1e-30, rel=2 ** -4)


@pytest.mark.parametrize("bad, name", [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf"),
                                       (float("-inf"), "0 NaN and 1 Inf")])
def test_non_finite_input_is_rejected_with_a_clear_error(bad, name):
    x = torch.randn(4, 256)
    x[2, 130] = bad
    with pytest.raises(ValueError, match=rf"{name} values \(first at index \[2, 130\]\).*non-finite"):
        codec.encode_hidden(x, "fp8")
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode_hidden(x.bfloat16(), "fp8")


def test_encode_decode_hidden_cover_every_dispatch_dtype():
    x = torch.randn(5, 200)
    for dtype, wire_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        sent, scales = codec.encode_hidden(x, dtype)
        assert sent.dtype == wire_dtype and (scales is not None) == (dtype == "fp8")
        back = codec.decode_hidden(sent, scales, torch.float32)
        tolerance = {"fp32": 0.0, "bf16": 2 ** -8, "fp8": 2 ** -4}[dtype]
        assert float(((back - x).abs() / x.abs().amax(-1, keepdim=True)).max()) <= tolerance
    fp32_wire, _ = codec.encode_hidden(x, "fp32")
    assert fp32_wire.data_ptr() == x.data_ptr()        # fp32 dispatch does not copy
    with pytest.raises(ValueError, match="need their scales"):
        codec.decode_hidden(codec.quantize_1x128(x)[0], None, torch.float32)
    with pytest.raises(ValueError, match="not one of fp32, bf16, fp8"):
        codec.encode_hidden(x, "int8")


@pytest.mark.parametrize("hidden", [7168, 64, 8])
def test_fp8_sends_at_most_0_27x_the_activation_bytes_of_fp32(hidden):
    """hidden 7168: DeepSeek-V3; 64: the tiny test checkpoints; 8: the gate test's toy model."""
    per_token = {d: dtypes.hidden_bytes_per_token(hidden, d) for d in ("fp32", "bf16", "fp8")}
    assert per_token["fp32"] == 4 * hidden and per_token["bf16"] == 2 * hidden
    assert per_token["fp8"] == hidden + 4 * math.ceil(hidden / 128)
    if hidden >= 64:
        assert per_token["fp8"] <= 0.27 * per_token["fp32"]
    else:  # one fp32 scale per token costs 4 bytes: below 64 channels that alone passes 0.27x
        assert per_token["fp8"] > 0.27 * per_token["fp32"]
    # the accounting matches what the encoder really produces
    x = torch.randn(3, hidden)
    for dtype, expected in per_token.items():
        sent, scales = codec.encode_hidden(x, dtype)
        nbytes = sent.nbytes + (scales.nbytes if scales is not None else 0)
        assert nbytes == 3 * expected


def test_ucx_frame_bytes_follow_the_per_token_accounting():
    tokens, hidden, topk = 100, 7168, 8
    ids, weights = torch.zeros(tokens, topk, dtype=torch.int32), torch.ones(tokens, topk)
    sizes = {}
    for dtype in ("fp32", "bf16", "fp8"):
        sent, scales = codec.encode_hidden(torch.randn(tokens, hidden), dtype)
        frame = wire.encode_request(1, 3, ids, weights, sent, scales, torch.bfloat16)
        payload = frame.nbytes - wire.HEADER.size
        assert payload == tokens * dtypes.dispatch_bytes_per_token(hidden, topk, dtype)
        sizes[dtype] = frame.nbytes
    assert sizes["fp8"] <= 0.27 * sizes["fp32"]
