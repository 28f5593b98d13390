"""Triton kernels: bit-exact against `codegen.reference` (TRITON_INTERPRET=1 on CPU, with the shim that
makes the interpreter's conversions exact), and the sm_90a PTX they compile to (no GPU needed)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest turns Triton's interpreter on for CPU runs"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import triton_shim  # noqa: E402
from munit_compile.codegen import reference  # noqa: E402
from munit_compile.codegen.triton import cast_transpose as ct  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_shim.install()


def hard_values(shape, gen) -> torch.Tensor:
    """Normal values over 2^±12 in magnitude, plus entries past the FP8 range and exact zeros."""
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-12, 12, shape, generator=gen).float())
    x.view(-1)[::7] *= 1e6  # saturate
    x.view(-1)[::11] = 0.0
    return x


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("shape", [(1, 1), (65, 130), (100, 37), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cast_transpose_is_bit_exact(fmt, shape, dtype):
    gen = torch.Generator().manual_seed(hash((fmt, shape)) % 2**31)
    x = hard_values(shape, gen).to(dtype).to(DEVICE)
    scale = 2.0 ** int(torch.randint(-3, 4, (1,), generator=gen))
    q, qt = ct.cast_transpose(x, scale, fmt, blocks=(32, 32))
    q_ref, qt_ref = reference.cast_transpose(x, scale, fmt)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8), qt_ref.view(torch.uint8))
    assert qt.is_contiguous() and qt.shape == (shape[1], shape[0])


def test_cast_transpose_reads_strided_input():
    gen = torch.Generator().manual_seed(1)
    x = hard_values((48, 80), gen).to(DEVICE).t()  # a transposed view: strides (1, 80)
    q, qt = ct.cast_transpose(x, 0.5, "e5m2", blocks=(32, 32))
    q_ref, qt_ref = reference.cast_transpose(x, 0.5, "e5m2")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(qt.view(torch.uint8), qt_ref.view(torch.uint8))


@pytest.mark.parametrize("fmt, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_shim_conversions_match_torch_including_ties_and_saturation(fmt, dtype):
    import triton.language as tl

    gen = torch.Generator().manual_seed(2)
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = ((grid[1:] + grid[:-1]) / 2)  # exactly halfway between neighbours: round to even
    x = torch.cat([ties, torch.randn(10_000, generator=gen) * 100, torch.tensor([1e9, -1e9])]).float()
    spec_max = 448.0 if fmt == "e4m3" else 57344.0
    expected = x.clamp(-spec_max, spec_max).to(dtype).view(torch.uint8).numpy()
    got = triton_shim.convert(x.numpy(), tl.float32, ct.TL_FP8[fmt])
    assert (got == expected).all()


def _ptx(kernel, signature: dict, constexprs: dict) -> str:
    fn = kernel.fn if not isinstance(kernel, triton.runtime.jit.JITFunction) else kernel
    jit = triton.runtime.jit.JITFunction(fn) if not isinstance(fn, triton.runtime.jit.JITFunction) else fn
    compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    return compiled.asm["ptx"]


@pytest.mark.parametrize("fmt, cvt", [("e4m3", "cvt.rn.satfinite.e4m3x2.f32"), ("e5m2", "cvt.rn.satfinite.e5m2x2.f32")])
def test_cast_transpose_ptx_for_sm90a_saturates_and_does_not_spill(fmt, cvt):
    signature = {"x_ptr": "*fp32", "q_ptr": "*fp8e4nv" if fmt == "e4m3" else "*fp8e5",
                 "qt_ptr": "*fp8e4nv" if fmt == "e4m3" else "*fp8e5", "M": "i32", "N": "i32",
                 "stride_xm": "i32", "stride_xn": "i32", "scale": "fp32", "fmax": "fp32"}
    constexprs = {"BLOCK_M": ct.DEFAULT_BLOCKS[0], "BLOCK_N": ct.DEFAULT_BLOCKS[1], "FP8": ct.TL_FP8[fmt]}
    ptx = _ptx(ct.cast_transpose_kernel, signature, constexprs)
    assert ".target sm_90a" in ptx
    assert cvt in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx


# ---------------------------------------------------------------- FP8 GEMM with epilogue

from munit_compile.codegen.triton import fp8_gemm  # noqa: E402

GRID_STEPS = {"e4m3": (15, 8.0), "e5m2": (7, 4.0)}  # |m| ≤ 15 (7) in steps of 1/8 (1/4): exact in the format


def dyadic_fp8(shape, fmt, gen) -> torch.Tensor:
    """Random FP8 values on a grid where every product and every partial sum is exact in fp32, so the
    result cannot depend on the order the kernel sums in (which differs from torch's matmul)."""
    top, denominator = GRID_STEPS[fmt]
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    return (torch.randint(-top, top + 1, shape, generator=gen).float() / denominator).to(dtype)


SMALL_TILES = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)


@pytest.mark.parametrize("mnk", [(33, 47, 80), (130, 70, 200), (64, 64, 64), (1, 16, 16)])
@pytest.mark.parametrize("formats", [("e4m3", "e4m3"), ("e5m2", "e4m3")])
@pytest.mark.parametrize("bias, alpha, out_dtype", [(False, 1.0, torch.float32), (True, 0.125, torch.bfloat16),
                                                     (True, 1 / 3, torch.float32)])
def test_fp8_gemm_epilogue_is_bit_exact(mnk, formats, bias, alpha, out_dtype):
    M, N, K = mnk
    gen = torch.Generator().manual_seed(M * 1000 + N + K)
    a, b_t = dyadic_fp8((M, K), formats[0], gen).to(DEVICE), dyadic_fp8((N, K), formats[1], gen).to(DEVICE)
    b = (torch.randn(N, generator=gen)).to(DEVICE) if bias else None
    inv_scale = 2.0 ** -3
    out = fp8_gemm.scaled_mm(a, b_t, inv_scale, b, alpha, out_dtype, config=SMALL_TILES)
    expected = reference.scaled_mm(a, b_t, inv_scale, b, alpha, out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, expected), (out - expected).abs().max()


def test_fp8_gemm_matches_the_high_precision_product_to_fp8_rounding():
    # Independent of the reference: against a float64 matmul of the unquantized data (relative
    # error of the product of two E4M3 roundings, 2·2^-4, plus accumulation).
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(70, 96, generator=gen), torch.randn(50, 96, generator=gen)
    qx, qw = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    out = fp8_gemm.scaled_mm(qx.to(DEVICE), qw.to(DEVICE), 1.0, None, 1.0, torch.float32, config=SMALL_TILES).cpu()
    exact = x.double() @ w.double().t()
    assert ((out.double() - exact).norm() / exact.norm()).item() < 0.08


def test_fp8_gemm_default_config_ptx_uses_wgmma_with_e4m3_and_does_not_spill():
    import triton.language as tl

    sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "bias_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "stride_am": "i32", "stride_ak": "constexpr", "stride_bn": "i32", "stride_bk": "constexpr",
           "stride_cm": "i32", "stride_cn": "constexpr", "inv_scale": "fp32", "alpha": "fp32",
           **{k: "constexpr" for k in ("HAS_BIAS", "OUT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}}
    cfg = fp8_gemm.DEFAULT_CONFIG
    constexprs = {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "HAS_BIAS": True, "OUT": tl.bfloat16,
                  **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}}
    divisible = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 11)}  # what a launch with aligned shapes gives
    kernel = fp8_gemm.fp8_gemm_kernel
    fn = kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else triton.runtime.jit.JITFunction(kernel.fn)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=divisible),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and ".e4m3.e4m3" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx


@pytest.mark.parametrize("alpha", [1.0, 0.125])
def test_fp8_linear_through_the_triton_kernels_equals_the_reference_forward_and_backward(monkeypatch, alpha):
    import munit_compile.ops  # noqa: F401  (registers munit::fp8_linear)

    gen = torch.Generator().manual_seed(7)
    x0 = dyadic_fp8((3, 21, 48), "e4m3", gen).float()
    w0 = dyadic_fp8((40, 48), "e4m3", gen).float()
    b0 = dyadic_fp8((40,), "e4m3", gen).float()
    dy = dyadic_fp8((3, 21, 40), "e5m2", gen).float()
    results = {}
    for kernels in ("triton", "reference"):
        monkeypatch.setenv("MUNIT_KERNELS", kernels)
        x, w, b = (t.clone().to(DEVICE).requires_grad_() for t in (x0, w0, b0))
        y = torch.ops.munit.fp8_linear(x, w, b, 1.0, 1.0, 1.0, "e4m3", "e5m2", alpha)
        y.backward(dy.to(DEVICE))
        results[kernels] = (y.detach(), x.grad, w.grad, b.grad)
    for got, expected in zip(results["triton"], results["reference"]):
        assert torch.equal(got, expected)
    assert results["triton"][0].abs().sum() > 0 and results["triton"][2].abs().sum() > 0
