"""The norm → FP8 prologue kernel (`codegen.triton.norm_cast`): bit-exact against `codegen.norm_reference` on
random data (TRITON_INTERPRET=1 on CPU, with the shim that makes the interpreter's conversions exact), close
to float64 math, and the sm_90a PTX it compiles to.

Random data, not dyadic: the row sums are a fixed binary tree in both the kernel and the reference (not
Triton's or torch's own reduction order), and every other step is one IEEE fp32 operation, so the two must
agree on any input, sums that round included."""
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

import triton_shim  # noqa: E402
from munit_compile.codegen import norm_reference as ref  # noqa: E402
from munit_compile.codegen.triton import norm_cast as nc  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_shim.install()

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SCALES = {E4M3: 2.0**6, E5M2: 2.0**13}  # |y| > 7 saturates
SMALL = dict(BLOCK_M=16, BLOCK_D=128, num_warps=4)  # 37 × 100 is ragged in both: 3 programs, 28 masked columns
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so equality also tells −0 from +0 and compares NaNs."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def rows(M: int, D: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Rows of different magnitudes (2^±6) and offsets, with outliers (×16) that normalize to large values;
    finite in FP16."""
    magnitude = torch.exp2(torch.randint(-6, 7, (M, 1), generator=gen).float())
    x = (torch.randn(M, D, generator=gen) + 3 * torch.randn(M, 1, generator=gen)) * magnitude
    x.view(-1)[::13] *= 16.0
    x = x.to(dtype)
    assert bool(torch.isfinite(x).all())
    return x


def affine(kind: str, D: int, gen: torch.Generator, dtype=torch.float32):
    weight = (1 + 0.5 * torch.randn(D, generator=gen)).to(dtype).to(DEVICE)
    bias = torch.randn(D, generator=gen).to(dtype).to(DEVICE) if kind == "layernorm" else None
    return weight, bias


def run_both(x, kind, config=SMALL, **options):
    return nc.norm_cast(x, kind, config=config, **options), ref.norm_cast(x, kind, **options)


def assert_same_bits(got: ref.NormCastResult, expected: ref.NormCastResult):
    for field in ("q_fp8", "q_fp8_t", "normalized_hp", "mean_fp32", "rstd_fp32"):
        g, e = getattr(got, field), getattr(expected, field)
        assert (g is None) == (e is None), field
        if g is None:
            continue
        assert g.dtype == e.dtype and g.shape == e.shape and g.is_contiguous(), field
        same = bits(g).cpu() == bits(e).cpu()
        assert bool(same.all()), f"{field}: {int((~same).sum())} of {same.numel()} differ"


# ---------------------------------------------------------------- bit-exact against the reference

@pytest.mark.parametrize("keep_normalized", [False, True], ids=["q", "q+y"])
@pytest.mark.parametrize("transposed_copy", [False, True], ids=["no_t", "t"])
@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("with_affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("kind", ref.KINDS)
def test_norm_cast_is_bit_exact_for_every_option(kind, with_affine, fp8_dtype, transposed_copy, keep_normalized):
    # Every combination on a 37 × 100 input (ragged M and D); the input dtype and the normalized output's
    # dtype rotate through bf16/fp16/fp32 across the cases.
    case = (ref.KINDS.index(kind), with_affine, fp8_dtype == E5M2, transposed_copy, keep_normalized)
    index = int("".join(str(int(c)) for c in case), 2)
    gen = torch.Generator().manual_seed(index)
    x = rows(37, 100, gen, DTYPES[index % 3]).to(DEVICE)
    weight, bias = affine(kind, 100, gen, DTYPES[(index + 1) % 3]) if with_affine else (None, None)
    got, expected = run_both(x, kind, weight=weight, bias=bias, eps=1e-5, scale=SCALES[fp8_dtype],
                             fp8_dtype=fp8_dtype, transposed_copy=transposed_copy, keep_normalized=keep_normalized,
                             normalized_dtype=DTYPES[(index + 2) % 3] if keep_normalized else None)
    assert_same_bits(got, expected)
    assert not bool(got.q_fp8.float().isnan().any())
    saturated = float((got.q_fp8.float().abs() == ref.FP8_MAX[fp8_dtype]).float().mean())
    assert 0 < saturated < 0.2, saturated  # some values saturate, most do not
    if transposed_copy:
        assert got.q_fp8_t.shape == (100, 37) and torch.equal(bits(got.q_fp8_t), bits(got.q_fp8).t())
    assert (got.mean_fp32 is None) == (kind == "rmsnorm")


@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (1, 7), (33, 3), (16, 256), (19, 1000)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind", ref.KINDS)
def test_norm_cast_is_bit_exact_on_edge_shapes_with_the_default_config(kind, dtype, shape):
    # One row, one column, exact powers of two, D = 1000 in a 1024-wide block; everything on.
    M, D = shape
    gen = torch.Generator().manual_seed(M * 1000 + D)
    x = rows(M, D, gen, dtype).to(DEVICE)
    weight, bias = affine(kind, D, gen, dtype)
    got, expected = run_both(x, kind, config=None, weight=weight, bias=bias, eps=1e-6, scale=SCALES[E4M3],
                             transposed_copy=True, keep_normalized=True)
    assert_same_bits(got, expected)


def test_norm_cast_reads_strided_input():
    gen = torch.Generator().manual_seed(1)
    x = rows(100, 37, gen).to(DEVICE).t()  # a transposed view: strides (1, 37)
    got, expected = run_both(x, "layernorm", weight=affine("layernorm", 100, gen)[0], scale=16.0, fp8_dtype=E5M2,
                             transposed_copy=True, keep_normalized=True)
    assert_same_bits(got, expected)


def test_norm_cast_on_zero_constant_and_negative_zero_rows():
    # var = 0 gives rstd = 1/√eps; a row of −0 has sum −0 in a tree of −0s: the sum's "+ 0" makes it +0
    # on every backend (numpy's reduction in the interpreter starts from +0, a GPU adds the two values).
    x = torch.randn(6, 64)
    x[0] = 0.0
    x[1] = -0.0
    x[2] = 3.0
    x[3, ::2] = -0.0
    x[3, 1::2] = 0.0
    for kind in ref.KINDS:
        got, expected = run_both(x.to(DEVICE), kind, config=dict(BLOCK_M=4, BLOCK_D=64, num_warps=4), eps=1e-5,
                                 transposed_copy=True, keep_normalized=True, normalized_dtype=torch.float32)
        assert_same_bits(got, expected)
        assert torch.equal(bits(got.q_fp8[1]).cpu(), bits(torch.full((64,), -0.0).to(E4M3)))  # −0 stays −0


def test_norm_cast_without_rows_returns_empty_results():
    result = nc.norm_cast(torch.zeros(0, 48, device=DEVICE), "layernorm", transposed_copy=True, keep_normalized=True)
    assert result.q_fp8.shape == (0, 48) and result.q_fp8_t.shape == (48, 0) and result.rstd_fp32.shape == (0,)


# ---------------------------------------------------------------- against float64 math

@pytest.mark.parametrize("kind", ref.KINDS)
@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_norm_cast_equals_float64_math_rounded_to_fp8_except_where_fp32_rounding_decides(kind, fp8_dtype):
    # Independent of the reference: the float64 norm × scale, saturated and rounded once to FP8. The kernel's
    # fp32 steps put y within a few fp32 ulps (2^-22 relative) of that, so the FP8 value can only differ
    # where y·scale lies that close to a rounding boundary: rare, and then by one FP8 step.
    gen = torch.Generator().manual_seed(21)
    x = rows(37, 100, gen)
    weight, bias = affine(kind, 100, gen)
    scale = SCALES[fp8_dtype]
    got = nc.norm_cast(x.to(DEVICE), kind, weight, bias, eps=1e-5, scale=scale, fp8_dtype=fp8_dtype,
                       config=SMALL)
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True) if kind == "layernorm" else torch.zeros_like(x64[:, :1])
    rstd = 1 / torch.sqrt(((x64 - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
    y = (x64 - mean) * rstd * weight.cpu().double() + (bias.cpu().double() if bias is not None else 0.0)
    fmax = ref.FP8_MAX[fp8_dtype]
    exact = (y * scale).clamp(-fmax, fmax).float().to(fp8_dtype)
    q = got.q_fp8.cpu()
    differ = bits(q) != bits(exact)
    assert float(differ.float().mean()) < 0.01
    steps = (bits(q).int() & 0x7F) - (bits(exact).int() & 0x7F)  # sign-magnitude codes: one step = 1
    assert bool(((steps.abs() <= 1) & (bits(q) >> 7 == bits(exact) >> 7)).all())
    assert torch.allclose(got.rstd_fp32.cpu().double(), rstd[:, 0], rtol=1e-6)
    if kind == "layernorm":
        assert torch.allclose(got.mean_fp32.cpu().double(), mean[:, 0], rtol=1e-6, atol=1e-6 * float(x64.abs().max()))


def test_reference_sqrt_is_correctly_rounded():
    # torch.sqrt on CPU is not (1 ulp off on ~17% of fp32 inputs with torch 2.13's AVX-512 kernels); numpy's
    # float32 sqrt is the IEEE instruction, as are the interpreter's `sqrt_rn` and the GPU's sqrt.rn.f32.
    every_ninth = torch.arange(0x3F800000, 0x40800000, 9, dtype=torch.int32).view(torch.float32)  # [1, 4)
    gen = torch.Generator().manual_seed(2)
    wide = torch.rand(100_000, generator=gen) * torch.exp2(torch.randint(-149, 128, (100_000,), generator=gen).float())
    edges = torch.tensor([0.0, -0.0, 1e-45, 1.1754942e-38, 3.4028235e38, math.inf])
    for v in (every_ninth, wide[torch.isfinite(wide)], edges):
        assert torch.equal(bits(ref.sqrt_rn(v)), bits(torch.from_numpy(np.sqrt(v.numpy()))))


# ---------------------------------------------------------------- negative controls: the checks can fail

# One row (a, −a, a, −a, ...): mean 0, variance a², so with eps = 0 and a a power of two, y = ±1 exactly and
# y·scale = ±scale exactly. TIES holds scales on a rounding tie of the format that rounds *up* to even.
TIES = {E4M3: (1.1875, 1.25, 1.125), E5M2: (1.375, 1.5, 1.25)}  # (scale, round-to-even result, one step down)


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_a_scale_one_ulp_low_or_a_wrong_eps_changes_the_fp8_bits(fp8_dtype):
    scale, even, below = TIES[fp8_dtype]
    x = (torch.tensor([1.0, -1.0]).repeat(24) * 2.0**-3).reshape(1, 48).to(DEVICE)
    config = dict(BLOCK_M=1, BLOCK_D=64, num_warps=4)
    got, expected = run_both(x, "layernorm", config=config, eps=0.0, scale=scale, fp8_dtype=fp8_dtype)
    assert_same_bits(got, expected)
    assert torch.equal(got.q_fp8.float().abs().cpu(), torch.full((1, 48), even))  # the tie, rounded to even
    one_ulp_low = float(torch.nextafter(torch.tensor(scale), torch.tensor(0.0)))
    for options in (dict(eps=0.0, scale=one_ulp_low), dict(eps=1e-6, scale=scale)):
        nudged = nc.norm_cast(x, "layernorm", config=config, fp8_dtype=fp8_dtype, **options)
        assert torch.equal(nudged.q_fp8.float().abs().cpu(), torch.full((1, 48), below)), options
        assert not torch.equal(bits(nudged.q_fp8), bits(got.q_fp8))


def test_the_summation_order_is_observable():
    # Other orders of the same sums (torch's own LayerNorm, a sequential Σ) give different fp32 results,
    # so the bit-exact tests pin the tree order, not just the math.
    gen = torch.Generator().manual_seed(3)
    x = rows(37, 100, gen)
    got = nc.norm_cast(x.to(DEVICE), "layernorm", keep_normalized=True, normalized_dtype=torch.float32, config=SMALL)
    y = got.normalized_hp.cpu()
    torch_ln = torch.nn.functional.layer_norm(x, (100,), eps=1e-5)
    assert not torch.equal(y, torch_ln) and torch.allclose(y, torch_ln, rtol=1e-5, atol=1e-5)
    sequential_mean = torch.stack([sum(row.tolist()[1:], torch.tensor(row[0].item())) for row in x]) / 100
    assert not torch.equal(got.mean_fp32.cpu(), sequential_mean.float())


# ---------------------------------------------------------------- argument checks

def _bad_calls():
    x = torch.randn(8, 16)
    return {
        "unknown kind 'batchnorm'; use one of ['layernorm', 'rmsnorm']": dict(x=x, kind="batchnorm"),
        "x must be 2-D [M, D] (normalized over D), got shape (2, 4, 16)": dict(x=x.reshape(2, 4, 16)),
        "x's last dim D=0 must be in [1, 16384]": dict(x=torch.randn(8, 0)),
        "x's last dim D=16385 must be in [1, 16384]": dict(x=torch.randn(1, 16385)),
        "x dtype must be one of ['torch.bfloat16', 'torch.float16', 'torch.float32'], got torch.float64":
            dict(x=x.double()),
        "weight must have shape (16,), got (8,)": dict(x=x, weight=torch.ones(8)),
        "bias dtype must be one of": dict(x=x, bias=torch.ones(16, dtype=torch.int32)),
        "rmsnorm takes no bias": dict(x=x, kind="rmsnorm", bias=torch.ones(16)),
        "eps must be a finite number ≥ 0, got -1e-05": dict(x=x, eps=-1e-5),
        "scale must be a finite positive number, got 0.0": dict(x=x, scale=0.0),
        "scale must be a finite positive number, got inf": dict(x=x, scale=math.inf),
        "fp8_dtype must be one of": dict(x=x, fp8_dtype=torch.bfloat16),
        "normalized_dtype must be one of": dict(x=x, keep_normalized=True, normalized_dtype=torch.float64),
    }


@pytest.mark.parametrize("message", list(_bad_calls()))
@pytest.mark.parametrize("implementation", ["kernel", "reference"])
def test_norm_cast_rejects_bad_arguments_with_a_clear_message(implementation, message):
    kwargs = dict(_bad_calls()[message])
    x, kind = kwargs.pop("x"), kwargs.pop("kind", "layernorm")
    norm_cast = nc.norm_cast if implementation == "kernel" else ref.norm_cast
    with pytest.raises(ValueError, match=re.escape(message)):
        norm_cast(x.to(DEVICE), kind, **{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                                         for k, v in kwargs.items()})


@pytest.mark.parametrize("config, message", [(dict(BLOCK_D=64), "config BLOCK_D must be a power of two ≥ D=100"),
                                             (dict(BLOCK_M=3), "config BLOCK_M must be a power of two, got 3")])
def test_norm_cast_rejects_a_config_that_cannot_hold_the_row(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        nc.norm_cast(torch.randn(4, 100, device=DEVICE), "rmsnorm", config=config)


# ---------------------------------------------------------------- sm_90a PTX

def _ptx(D: int, kind: str, fp8: str, transposed_copy: bool = True, keep_normalized: bool = True,
         options: dict | None = None) -> str:
    """PTX of `norm_cast_kernel` for sm_90a in `default_config(8192, D)`: BF16 input, weight (and bias), unit
    column stride, 16-aligned pointers, dims and row stride (what a launch with aligned shapes gives)."""
    cfg = nc.default_config(8192, D)
    kernel = triton_shim.compilable(nc.norm_cast_kernel)
    pointers = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "q_ptr": fp8, "qt_ptr": fp8, "y_ptr": "*bf16",
                "mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
    aligned = ["M", "D", "stride_xm"]
    meta = dict(LAYERNORM=kind == "layernorm", HAS_WEIGHT=True, HAS_BIAS=kind == "layernorm",
                TRANSPOSED_COPY=transposed_copy, KEEP_NORMALIZED=keep_normalized,
                FP8_MAX={"*fp8e4nv": 448.0, "*fp8e5": 57344.0}[fp8], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"])
    sig = {**pointers, **{n: "i32" for n in aligned}, "stride_xd": "constexpr", "eps": "fp32", "scale": "fp32",
           **{n: "constexpr" for n in meta}}
    order = list(kernel.arg_names)
    assert sorted(order) == sorted(sig), "the test's signature must name every kernel argument"
    sig = {n: sig[n] for n in order}
    divisible = {(order.index(n),): [["tt.divisibility", 16]] for n in [*pointers, *aligned]}
    helper = nc.pairwise_row_sum
    nc.pairwise_row_sum = triton_shim.compilable(helper)  # the kernel calls it through the module's globals
    try:
        with triton_shim.compiling():
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, attrs=divisible,
                                                constexprs={"stride_xd": 1, **meta}),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": cfg["num_warps"], **nc.COMPILE_OPTIONS, **(options or {})})
    finally:
        nc.pairwise_row_sum = helper
    return compiled.asm["ptx"]


@pytest.mark.parametrize("D, kind, fp8, cvt", [
    (4096, "layernorm", "*fp8e4nv", "cvt.rn.satfinite.e4m3x2.f32"),
    (768, "rmsnorm", "*fp8e4nv", "cvt.rn.satfinite.e4m3x2.f32"),
    (16384, "layernorm", "*fp8e5", "cvt.rn.satfinite.e5m2x2.f32"),
    (1000, "rmsnorm", "*fp8e5", "cvt.rn.satfinite.e5m2x2.f32"),
])
def test_norm_cast_ptx_for_sm90a_saturates_is_ieee_and_does_not_spill(D, kind, fp8, cvt):
    ptx = _ptx(D, kind, fp8)
    assert ".target sm_90a" in ptx
    assert cvt in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx
    # IEEE square root and division. Only the PTX shows this: the interpreter computes `tl.sqrt` and `/` with
    # numpy's IEEE float32 operations too, so the bit-exact tests would pass with the approximate versions.
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    assert "rsqrt" not in ptx and "sqrt.approx" not in ptx and "div.full" not in ptx
    assert "fma.rn.f32" not in ptx


def test_norm_cast_ptx_check_for_contraction_can_fail():
    # Negative control: with Triton's default FMA contraction LayerNorm's y·w + b becomes fma.rn.f32.
    assert "fma.rn.f32" in _ptx(768, "layernorm", "*fp8e4nv", options={"enable_fp_fusion": True})
