"""Triton kernels: bit-exact against `codegen.reference` (TRITON_INTERPRET=1 on CPU, with the shim that
makes the interpreter's conversions exact), and the sm_90a PTX they compile to (no GPU needed)."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest turns Triton's interpreter on for CPU runs"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import triton_shim  # noqa: E402
from munit_compile.codegen import reference  # noqa: E402
from munit_compile.ops.formats import cast_fp8  # noqa: E402
from munit_compile.codegen.triton import cast_transpose as ct  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8_FORMAT = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
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
    with triton_shim.compiling():
        compiled = triton.compile(ASTSource(fn=triton_shim.compilable(kernel), signature=signature,
                                            constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
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


def compile_gemm(kernel=None, config: dict | None = None, out: str = "*bf16", activation: str = "none",
                 gate: bool = False, residual: bool = False, transposed_copy: bool = False,
                 options: dict | None = None, q: str | None = None, **meta_extra):
    """`kernel` (default `fp8_gemm_kernel`) in `config` (default `DEFAULT_CONFIG`) compiled for sm_90a, E4M3
    operands, unit inner strides and 16-aligned pointers/dims/leading strides (what a launch with aligned
    shapes gives); q: the next GEMM's FP8 operand's pointer type, or None; meta_extra: the kernel's further
    constexprs (the persistent schedule's NUM_SMS, USE_TMA)."""
    pointers = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": out, "ct_ptr": out, "bias_ptr": "*fp32",
                "gate_ptr": "*bf16", "res_ptr": "*fp32", "q_ptr": q or out}
    aligned = ["M", "N", "K", "stride_am", "stride_bn", "stride_cm", "stride_ctn", "stride_gm", "stride_rm",
               "stride_qm"]
    unit = ["stride_ak", "stride_bk", "stride_cn", "stride_ctm", "stride_gn", "stride_rn", "stride_qn"]
    scalars = {"inv_scale": "fp32", "alpha": "fp32", "c_skip": "fp32", "c_branch": "fp32", "out_scale": "fp32",
               "q_scale": "fp32"}
    cfg = {**fp8_gemm.DEFAULT_CONFIG, **(config or {})}
    kernel = triton_shim.compilable(kernel or fp8_gemm.fp8_gemm_kernel)
    meta = {"HAS_BIAS": True, "ACTIVATION": triton_shim.compilable(fp8_gemm.ACTIVATIONS[activation]), "HAS_GATE": gate,
            "HAS_RESIDUAL": residual, "OUT_MAX": {"*fp8e4nv": 448.0, "*fp8e5": 57344.0}.get(out),
            "TRANSPOSED_COPY": transposed_copy, "Q_MAX": {"*fp8e4nv": 448.0, "*fp8e5": 57344.0}.get(q),
            **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPILOGUE_SPLIT")}, **meta_extra}
    sig = {**pointers, **{n: "i32" for n in aligned}, **{n: "constexpr" for n in unit}, **scalars,
           **{n: "constexpr" for n in meta}}
    order = list(kernel.arg_names)
    assert sorted(order) == sorted(sig), "the test's signature must name every kernel argument"
    sig = {n: sig[n] for n in order}
    divisible = {(order.index(n),): [["tt.divisibility", 16]] for n in [*pointers, *aligned]}
    with triton_shim.compiling(fp8_gemm):
        return triton.compile(ASTSource(fn=kernel, signature=sig, attrs=divisible,
                                        constexprs={**{n: 1 for n in unit}, **meta}),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                                       **fp8_gemm.COMPILE_OPTIONS, **(options or {})})


def _gemm_ptx(out: str = "*bf16", activation: str = "none", gate: bool = False, residual: bool = False,
              transposed_copy: bool = False, options: dict | None = None, q: str | None = None) -> str:
    """PTX of `fp8_gemm_kernel` in its default config for sm_90a (`compile_gemm`)."""
    return compile_gemm(None, None, out, activation, gate, residual, transposed_copy, options, q).asm["ptx"]


PTX_EPILOGUES = [  # (output pointer, its cvt or None, activation, gate, residual, transposed copy, FP8 q copy)
    ("*bf16", None, "none", False, False, False, None),
    ("*fp8e4nv", "cvt.rn.satfinite.e4m3x2.f32", "gelu", False, False, False, None),
    ("*fp8e4nv", "cvt.rn.satfinite.e4m3x2.f32", "gelu", False, False, True, None),
    ("*fp8e5", "cvt.rn.satfinite.e5m2x2.f32", "silu", True, True, True, None),
    ("*bf16", None, "gelu_tanh", True, True, False, None),
    ("*bf16", "cvt.rn.satfinite.e4m3x2.f32", "silu", True, False, False, "*fp8e4nv"),  # SwiGLU → down's operand
]


@pytest.mark.parametrize("out, cvt, activation, gate, residual, transposed_copy, q", PTX_EPILOGUES)
def test_fp8_gemm_default_config_ptx_uses_wgmma_with_e4m3_and_does_not_spill(out, cvt, activation, gate, residual,
                                                                            transposed_copy, q):
    ptx = _gemm_ptx(out, activation, gate, residual, transposed_copy, q=q)
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx and ".e4m3.e4m3" in ptx
    assert cvt is None or cvt in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx
    # No contraction of the epilogue's a·b + c into one rounding (libdevice's own FMAs are the .ftz ones).
    assert "fma.rn.f32" not in ptx


def test_fp8_gemm_ptx_check_for_contraction_can_fail():
    # Negative control for the assertion above: with Triton's default FMA contraction the residual's
    # c_skip·r + c_branch·y becomes fma.rn.f32, one rounding fewer than the reference.
    ptx = _gemm_ptx("*bf16", "none", residual=True, options={"enable_fp_fusion": True})
    assert "fma.rn.f32" in ptx


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


# ---------------------------------------------------------------- fused epilogue: act, gate, residual, FP8 out

from munit_compile.codegen import epilogue  # noqa: E402

OUT_SCALES = {torch.float8_e4m3fn: 2.0**8, torch.float8_e5m2: 2.0**15}  # |y| > 1.75 saturates
OUTPUTS = [  # (out_dtype, transposed_copy)
    (torch.bfloat16, False), (torch.float32, False), (torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True),
    (torch.float8_e5m2, True)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so equality also tells −0 from +0 (torch.equal would not)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def epilogue_case(mnk, gen, gate_dtype=None, residual_dtype=None, bias=True):
    """Dyadic FP8 operands (the accumulator is exact in any summation order) and random epilogue inputs."""
    M, N, K = mnk
    a, b_t = dyadic_fp8((M, K), "e4m3", gen), dyadic_fp8((N, K), "e4m3", gen)
    side = lambda dtype: None if dtype is None else torch.randn(M, N, generator=gen).to(dtype).to(DEVICE)  # noqa: E731
    return dict(a_q=a.to(DEVICE), b_t_q=b_t.to(DEVICE), inv_scale=2.0**-3,
                bias=torch.randn(N, generator=gen).to(DEVICE) if bias else None,
                gate=side(gate_dtype), residual=side(residual_dtype))


def run_both(case: dict, alpha: float, out_dtype, *, config=SMALL_TILES, **options):
    """(kernel result, reference result), each a tuple (out,) or (out, outᵀ)."""
    args = (case["a_q"], case["b_t_q"], case["inv_scale"], case["bias"], alpha, out_dtype)
    side = dict(gate=case["gate"], residual=case["residual"])
    if case["residual"] is not None:
        side.update(c_skip=math.sqrt(0.7), c_branch=math.sqrt(0.3))  # fixed τ = 0.3
    if out_dtype in OUT_SCALES:
        side.update(out_scale=OUT_SCALES[out_dtype])
    side.update(options)
    got = fp8_gemm.scaled_mm(*args, config, **side)
    expected = reference.scaled_mm(*args, **side)
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    return as_tuple(got), as_tuple(expected)


def assert_same_bits(got: tuple, expected: tuple):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and g.is_contiguous()
        same = bits(g) == bits(e)
        assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} differ, e.g. {g[~same][:4]} vs {e[~same][:4]}"


@pytest.mark.parametrize("out_dtype, transposed_copy", OUTPUTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("residual", [None, torch.float32], ids=["no_residual", "residual"])
@pytest.mark.parametrize("gate", [None, torch.bfloat16], ids=["no_gate", "gate"])
@pytest.mark.parametrize("activation", sorted(epilogue.ACTIVATIONS))
def test_fp8_gemm_fused_epilogue_is_bit_exact(activation, gate, residual, out_dtype, transposed_copy):
    # 37×45×40 on 32³ tiles: ragged in M, N and K. Every combination of the epilogue's options.
    gen = torch.Generator().manual_seed(11)
    case = epilogue_case((37, 45, 40), gen, gate, residual)
    got, expected = run_both(case, 2 / 3, out_dtype, activation=activation, transposed_copy=transposed_copy)
    assert_same_bits(got, expected)
    if out_dtype in OUT_SCALES:  # some values saturate, most do not
        saturated = float((got[0].float().abs() == epilogue.FP8_MAX[out_dtype]).float().mean())
        assert 0 < saturated < 0.5
    if transposed_copy:
        assert got[1].shape == (45, 37) and torch.equal(bits(got[1]), bits(got[0]).t())


@pytest.mark.parametrize("q_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["q_e4m3", "q_e5m2"])
@pytest.mark.parametrize("out_dtype, residual", [(torch.bfloat16, None), (torch.float32, torch.float32)],
                         ids=["bf16", "fp32_residual"])
@pytest.mark.parametrize("activation", ["none", "silu", "gelu_tanh"])
def test_fp8_gemm_also_writes_the_next_gemms_fp8_operand_bit_exactly(activation, out_dtype, residual, q_dtype):
    """q = sat(y·q_scale) from the fp32 y the output is rounded from (one rounding, not FP8 of BF16 of y)."""
    gen = torch.Generator().manual_seed(17)
    case = epilogue_case((37, 45, 40), gen, torch.bfloat16, residual)
    got, expected = run_both(case, 2 / 3, out_dtype, activation=activation, q_dtype=q_dtype, q_scale=4.0)
    assert_same_bits(got, expected)
    (out, q), y = got, reference.scaled_mm(**{**case, "alpha": 2 / 3}, out_dtype=torch.float32, activation=activation,
                                           **({"c_skip": math.sqrt(0.7), "c_branch": math.sqrt(0.3)} if residual else {}))
    assert q.dtype == q_dtype and torch.equal(bits(q), bits(cast_fp8(y, FP8_FORMAT[q_dtype], 4.0)))
    saturated = float((q.float().abs() == epilogue.FP8_MAX[q_dtype]).float().mean())
    assert saturated < 0.5 and 0 < float((q.float() != 0).float().mean())


@pytest.mark.parametrize("mnk", [(1, 45, 40), (70, 1, 24), (33, 47, 80), (64, 64, 64), (100, 37, 16)])
@pytest.mark.parametrize("activation, alpha", [("silu", 48.0), ("gelu", 48.0), ("gelu_tanh", 48.0), ("relu", 0.125)])
def test_fp8_gemm_fused_epilogue_is_bit_exact_on_ragged_shapes_and_saturating_activations(mnk, activation, alpha):
    # Everything on, on edge shapes (one row, one column, exact multiples); α = 48 drives the activations
    # into their tails (exp(−x) overflows to inf for silu, erf/tanh round to ±1), out_scale 1/16 keeps the
    # large FP8 outputs unsaturated.
    gen = torch.Generator().manual_seed(sum(mnk))
    case = epilogue_case(mnk, gen, torch.bfloat16, torch.float32)
    got, expected = run_both(case, alpha, torch.float8_e4m3fn, activation=activation, transposed_copy=True,
                             out_scale=2.0**-4)
    assert_same_bits(got, expected)


@pytest.mark.parametrize("gate, residual", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_fp8_gemm_fused_epilogue_reads_gate_and_residual_in_any_float_dtype(gate, residual, out_dtype):
    gen = torch.Generator().manual_seed(3)
    case = epilogue_case((37, 45, 40), gen, gate, residual, bias=False)
    got, expected = run_both(case, 1.0, out_dtype, activation="gelu_tanh")
    assert_same_bits(got, expected)


def test_fp8_gemm_fused_epilogue_reads_strided_gate_and_residual():
    gen = torch.Generator().manual_seed(4)
    case = epilogue_case((37, 45, 40), gen)
    case["gate"] = torch.randn(45, 37, generator=gen).to(DEVICE).t()  # strides (1, 37)
    case["residual"] = torch.randn(37, 90, generator=gen).bfloat16().to(DEVICE)[:, ::2]  # strides (90, 2)
    got, expected = run_both(case, 0.5, torch.float8_e5m2, activation="silu", transposed_copy=True)
    assert_same_bits(got, expected)


def test_reference_epilogue_without_options_is_the_old_scaled_mm():
    # Backward compatibility: the default keywords reproduce ((acc·inv_scale + bias)·α).to(out_dtype).
    gen = torch.Generator().manual_seed(6)
    case = epilogue_case((20, 30, 48), gen)
    acc = case["a_q"].float() @ case["b_t_q"].float().t()
    for out_dtype in (torch.bfloat16, torch.float64):  # the reference takes any float output, as before
        old = ((acc * 0.125 + case["bias"]) * 0.75).to(out_dtype)
        assert torch.equal(reference.scaled_mm(case["a_q"], case["b_t_q"], 0.125, case["bias"], 0.75, out_dtype), old)


# Negative controls: each shows that the bit-exact comparison above can fail.

INTERPRETER_NUMERICS = {  # libdevice name -> the interpreter's own function (what tl.exp / tl.math.erf compute)
    "exp": lambda x: torch.from_numpy(np.exp(x.numpy())),
    "erf": lambda x: torch.from_numpy(interpreter.np_erf_fp32(x.numpy())),
    "tanh": lambda x: torch.from_numpy(np.tanh(x.numpy())),
}


@pytest.mark.skipif(DEVICE != "cpu", reason="about the CPU interpreter")
@pytest.mark.parametrize("activation, function", [("silu", "exp"), ("gelu", "erf"), ("gelu_tanh", "tanh")])
def test_activation_mismatches_with_the_interpreters_own_transcendentals(monkeypatch, activation, function):
    # Without the shim's torch routing (numpy's float32 exp/tanh, math.erf rounded from float64), the
    # kernel's fp32 output differs from the reference: the exactness tests see 1-ulp differences.
    monkeypatch.setitem(triton_shim.LIBDEVICE, function, INTERPRETER_NUMERICS[function])
    gen = torch.Generator().manual_seed(8)
    case = epilogue_case((64, 64, 64), gen)
    (got,), (expected,) = run_both(case, 1.0, torch.float32, activation=activation)
    differ = int((bits(got) != bits(expected)).sum())
    assert differ > 0
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)  # ... and only in the last bits


def test_epilogue_op_order_and_coefficients_are_observable():
    # x·sigmoid(x) = x·(1/(1+e^−x)) is the same real number as the kernel's x/(1+e^−x), not the same float;
    # and a coefficient off by one fp32 ulp changes the output. The exactness tests pin both.
    gen = torch.Generator().manual_seed(9)
    case = epilogue_case((64, 64, 64), gen, None, torch.float32)
    (got,), _ = run_both(case, 1.0, torch.float32, activation="silu")
    y = (case["a_q"].float() @ case["b_t_q"].float().t()) * case["inv_scale"] + case["bias"]
    other_order = math.sqrt(0.7) * case["residual"] + math.sqrt(0.3) * (y * (1.0 / (1.0 + torch.exp(-y))))
    assert not torch.equal(got, other_order)
    c_branch = torch.tensor(math.sqrt(0.3), dtype=torch.float32)
    off_by_one_ulp = float(torch.nextafter(c_branch, torch.tensor(1.0)))
    (nudged,), _ = run_both(case, 1.0, torch.float32, activation="silu", c_branch=off_by_one_ulp)
    assert not torch.equal(got, nudged)


# Argument checks: a ValueError that names the argument and the accepted values.

def _bad_calls():
    a, b = torch.zeros(8, 16, dtype=torch.float8_e4m3fn), torch.zeros(4, 16, dtype=torch.float8_e4m3fn)
    return {
        "unknown activation 'swish'; use one of ['gelu', 'gelu_tanh', 'none', 'relu', 'silu']":
            dict(a_q=a, b_t_q=b, activation="swish"),
        "gate must have shape (8, 4), got (4, 8)": dict(a_q=a, b_t_q=b, gate=torch.zeros(4, 8)),
        "residual dtype must be one of": dict(a_q=a, b_t_q=b, residual=torch.zeros(8, 4, dtype=torch.int32)),
        "bias must have shape (4,), got (8,)": dict(a_q=a, b_t_q=b, bias=torch.zeros(8)),
        "weights a residual tensor": dict(a_q=a, b_t_q=b, c_skip=0.5),
        "out_dtype must be one of": dict(a_q=a, b_t_q=b, out_dtype=torch.int8),
        "applies to FP8 outputs only": dict(a_q=a, b_t_q=b, out_scale=4.0),
        "out_scale must be a finite positive number": dict(a_q=a, b_t_q=b, out_dtype=torch.float8_e4m3fn,
                                                           out_scale=0.0),
        "transposed_copy writes the FP8 copy": dict(a_q=a, b_t_q=b, transposed_copy=True),
        "needs FP8 operands": dict(a_q=a.float(), b_t_q=b),
        "needs a[M,K] and b_t[N,K]": dict(a_q=a, b_t_q=b[:, :8]),
    }


@pytest.mark.parametrize("message", list(_bad_calls()))
def test_scaled_mm_rejects_bad_arguments_with_a_clear_message(message):
    kwargs = _bad_calls()[message]
    a_q, b_t_q = kwargs.pop("a_q"), kwargs.pop("b_t_q")
    with pytest.raises(ValueError, match=re.escape(message)):
        fp8_gemm.scaled_mm(a_q.to(DEVICE), b_t_q.to(DEVICE), 1.0, kwargs.pop("bias", None), **kwargs)
