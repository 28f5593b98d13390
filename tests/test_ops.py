"""munit::fp8_linear / munit::fp8_gemm against independent float64 references and torch's own FP8 GEMM."""
import pytest
import torch
import torch.nn.functional as F

import munit_compile  # noqa: F401  (registers the ops)
from munit_compile.ops import cast_fp8, power_of_two_scale

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MAX = {E4M3: 448.0, E5M2: 57344.0}
FMT = {"e4m3": E4M3, "e5m2": E5M2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def quantize64(t, dtype, scale):
    """Independent simulated FP8: scale, saturate, round to the format, back to float64, unscale."""
    clamped = torch.clamp(t.double() * scale, -MAX[dtype], MAX[dtype])
    return clamped.to(dtype).double() / scale


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_cast_saturates_instead_of_overflowing(fmt):
    dtype = FMT[fmt]
    t = torch.tensor([1e9, -1e9, 3.0, -0.5])
    out = cast_fp8(t, fmt, 1.0).float()
    assert out.tolist()[:2] == [MAX[dtype], -MAX[dtype]]
    assert torch.isfinite(out).all()
    assert out[2:].tolist() == [3.0, -0.5]


def test_scale_must_be_power_of_two():
    x, w = torch.randn(4, 16), torch.randn(16, 16)
    with pytest.raises(ValueError, match="power of two"):
        torch.ops.munit.fp8_linear(x, w, None, 3.0, 1.0, 1.0, "e4m3", "e5m2")
    with pytest.raises(ValueError, match="positive"):
        torch.ops.munit.fp8_linear(x, w, None, 1.0, -2.0, 1.0, "e4m3", "e5m2")


def test_power_of_two_scale_brings_rms_near_one():
    for std in [1e-6, 3e-3, 0.7, 1.0, 5.0, 1e4]:
        s = power_of_two_scale(std)
        assert 2 ** -0.5 <= std * s <= 2 ** 0.5
        assert s == 2.0 ** round(-torch.log2(torch.tensor(std, dtype=torch.float64)).item())
    with pytest.raises(ValueError, match="std"):
        power_of_two_scale(0.0)


def test_reference_gemm_equals_torch_scaled_mm_on_cpu():
    a, b_t = torch.randn(48, 64) * 3, torch.randn(32, 64) * 0.02
    sa, sb = 0.25, 64.0
    ours = torch.ops.munit.fp8_gemm(a, b_t, sa, sb, "e4m3", "e4m3", torch.float32)
    a8, b8 = cast_fp8(a, "e4m3", sa), cast_fp8(b_t, "e4m3", sb)
    theirs = torch._scaled_mm(
        a8, b8.t(), scale_a=torch.tensor(1 / sa), scale_b=torch.tensor(1 / sb), out_dtype=torch.float32
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("a_fmt, b_fmt", [("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e4m3", "e5m2")])
def test_gemm_matches_float64_simulation(a_fmt, b_fmt):
    a, b_t = torch.randn(40, 96) * 1e-3, torch.randn(24, 96) * 5
    sa, sb = 1024.0, 0.25
    out = torch.ops.munit.fp8_gemm(a, b_t, sa, sb, a_fmt, b_fmt, torch.float32)
    expected = quantize64(a, FMT[a_fmt], sa) @ quantize64(b_t, FMT[b_fmt], sb).t()
    assert rel_err(out, expected) < 1e-6


def test_gemm_rejects_e5m2_times_e5m2_and_bad_shapes():
    a = torch.randn(8, 16)
    with pytest.raises(ValueError, match="E5M2 x E5M2"):
        torch.ops.munit.fp8_gemm(a, a, 1.0, 1.0, "e5m2", "e5m2", torch.float32)
    with pytest.raises(ValueError, match="equal K"):
        torch.ops.munit.fp8_gemm(a, torch.randn(8, 32), 1.0, 1.0, "e4m3", "e4m3", torch.float32)
    with pytest.raises(ValueError, match="unknown FP8 format"):
        torch.ops.munit.fp8_gemm(a, a, 1.0, 1.0, "e4m3", "int8", torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_linear_forward_and_backward_match_simulated_fp8(dtype, with_bias):
    x = (torch.randn(3, 20, 64) * 0.05).to(dtype).requires_grad_()
    w = (torch.randn(48, 64) * 2.0).to(dtype).requires_grad_()
    b = torch.randn(48).to(dtype).requires_grad_() if with_bias else None
    sx, sw, sg = 16.0, 0.5, 2.0**12
    y = torch.ops.munit.fp8_linear(x, w, b, sx, sw, sg, "e4m3", "e5m2")
    assert y.dtype == dtype and y.shape == (3, 20, 48)
    gy = (torch.randn(3, 20, 48) * 3e-4).to(dtype)
    y.backward(gy)

    xq, wq = quantize64(x.detach(), E4M3, sx), quantize64(w.detach(), E4M3, sw)
    gq = quantize64(gy, E5M2, sg)
    y_ref = xq @ wq.t() + (b.detach().double() if with_bias else 0)
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert rel_err(y.detach(), y_ref) < tol
    assert rel_err(x.grad, gq @ wq) < tol
    assert rel_err(w.grad, gq.reshape(-1, 48).t() @ xq.reshape(-1, 64)) < tol
    if with_bias:
        assert rel_err(b.grad, gy.double().sum((0, 1))) < tol


def test_fp8_linear_is_within_fp8_tolerance_of_fp32_and_scales_matter():
    x = torch.randn(256, 128) * 1e-3   # far below E4M3's smallest normal (2^-6) without a scale
    w = torch.randn(64, 128) * 0.02
    exact = F.linear(x.double(), w.double())
    scaled = torch.ops.munit.fp8_linear(x, w, None, 1024.0, 64.0, 1.0, "e4m3", "e5m2")
    unscaled = torch.ops.munit.fp8_linear(x, w, None, 1.0, 1.0, 1.0, "e4m3", "e5m2")
    assert 1e-3 < rel_err(scaled, exact) < 0.06   # E4M3 has a 3-bit mantissa: ~2-4 % relative error
    assert rel_err(unscaled, exact) > 0.5         # without scales most of x underflows


def test_opcheck_passes_for_every_op():
    x, w, b = torch.randn(2, 5, 32), torch.randn(16, 32), torch.randn(16)
    for grad in (False, True):
        args = [t.clone().requires_grad_(grad) for t in (x, w, b)]
        torch.library.opcheck(torch.ops.munit.fp8_linear, (*args, 2.0, 0.5, 1024.0, "e4m3", "e5m2"))
        torch.library.opcheck(torch.ops.munit.fp8_linear, (args[0], args[1], None, 1.0, 1.0, 1.0, "e4m3", "e5m2"))
    torch.library.opcheck(torch.ops.munit.fp8_gemm, (torch.randn(8, 32), torch.randn(16, 32), 4.0, 1.0, "e5m2", "e4m3", torch.bfloat16))
