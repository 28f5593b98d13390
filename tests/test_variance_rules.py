"""The variance rules against Monte Carlo: predicted RMS of values and gradients vs a real run.

Each test builds a small function, traces it to pre-dispatch ATen with `make_fx(pre_dispatch=True)`,
runs `propagate` on it, then runs the function eagerly (or, for the cross-entropy seed, the traced
graph via `measure_rms`) on the same fresh random float64 inputs with a random upstream gradient of
RMS 1 (what `grad_output_std=1.0` seeds) and compares `node.meta["munit_fwd"].rms` and
`node.meta["munit_bwd"].rms` with what autograd measured. No expected value is hard-coded: every
reference number is measured.

Operands are `nn.Parameter`s on purpose. A plain float input is measured *and kept as a concrete tensor*,
so everything computed only from plain inputs is constant-folded exactly and no rule runs (that path
has its own tests below). Parameters are measured (sample μ, σ) but not folded, so their consumers go
through the rules under test.

Tolerances are per rule family and stated where they are used: exact Gaussian integrals and exact
independence formulas get 2 % plus 5 Monte Carlo standard errors of the measured RMS (the suite
makes thousands of comparisons: at 4, a 1-in-15000 draw fails it now and then); approximations get
the bound we observed over the tested domain, with room for sampling noise. Cases an earlier
version of a rule got wrong are kept as regression tests (see "regressions").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from munit_compile.ir import META_BWD, META_FWD, op_name
from munit_compile.measure import measure_rms
from munit_compile.passes.values import Moments, NotFloat, Unknown
from munit_compile.passes.variance import propagate

aten = torch.ops.aten
DTYPE = torch.float64
NUMEL = 1 << 16  # elements per elementwise operand: Monte Carlo error on an RMS well under 1 %

# Hypothesis draws the distribution parameters and a seed; the data comes from our own generator, so
# conftest's autouse seeding fixture is irrelevant (hence the suppressed function-scoped-fixture check).
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
RULE_SETTINGS = settings(max_examples=25, **_SETTINGS)
FEW_SETTINGS = settings(max_examples=10, **_SETTINGS)
seeds = st.integers(0, 2**31 - 1)
sigmas = st.floats(0.1, 4.0)
means = st.floats(-1.0, 1.0)


# ---------------------------------------------------------------- helpers

def param(gen: torch.Generator, *shape: int, mean: float = 0.0, std: float = 1.0) -> torch.nn.Parameter:
    """A float64 parameter with iid N(mean, std²) entries."""
    return torch.nn.Parameter(mean + std * torch.randn(*shape, generator=gen, dtype=DTYPE))


def unit_normal(gen: torch.Generator, shape) -> torch.Tensor:
    """N(0, 1) noise rescaled to RMS exactly 1: the upstream gradient `grad_output_std=1.0` stands for."""
    dy = torch.randn(shape, generator=gen, dtype=DTYPE)
    return dy / dy.pow(2).mean().sqrt()


def analyse(f, inputs, grad_output_std: float | None = 1.0) -> fx.GraphModule:
    """Trace `f` to pre-dispatch ATen and annotate it with the analytic forward/backward statistics."""
    gm = make_fx(f, pre_dispatch=True)(*inputs)
    propagate(gm, inputs, grad_output_std=grad_output_std)
    return gm


@dataclass
class Sample:
    """The measured RMS of a tensor's elements and the Monte Carlo standard error of that RMS."""

    rms: float
    stderr: float

    @staticmethod
    def of(t: torch.Tensor) -> "Sample":
        sq = t.detach().to(DTYPE).pow(2).flatten()
        m2, se_m2 = sq.mean().item(), sq.std().item() / math.sqrt(sq.numel())
        rms = math.sqrt(m2)
        return Sample(rms, se_m2 / (2 * rms) if rms > 0 else 0.0)

    @property
    def noise(self) -> float:
        """An absolute tolerance for sampling noise: 5 standard errors."""
        return 5 * self.stderr


def run_eager(f, inputs, gen: torch.Generator) -> tuple[Sample, list[Sample]]:
    """Measured (output, [grad of each input]) for loss = Σ f(inputs)·dy, dy of RMS 1."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = f(*leaves)
    out.backward(unit_normal(gen, out.shape))
    return Sample.of(out), [Sample.of(t.grad) for t in leaves]


def op_node(gm: fx.GraphModule, target, index: int = 0) -> fx.Node:
    """The `index`-th call of `target` in the graph."""
    found = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    assert len(found) > index, f"no {op_name(target)} #{index} in\n{gm.graph}"
    return found[index]


def output_node(gm: fx.GraphModule) -> fx.Node:
    """The node the graph returns (a single tensor)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert isinstance(out, fx.Node), out
    return out


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def predicted(node: fx.Node, key: str = META_FWD) -> float:
    value = node.meta.get(key)
    assert isinstance(value, Moments), f"{node.name}: expected Moments under {key}, got {value!r}"
    return value.rms


def check(what: str, pred: float, meas: float, factor: float, floor: float = 0.0) -> float:
    """Assert pred/meas lies in [1/factor, factor], or |pred − meas| ≤ floor (noise, values near 0).

    Returns the ratio predicted / measured.
    """
    ratio = pred / meas if meas > 0 else (math.inf if pred > 0 else 1.0)
    ok = (1 / factor <= ratio <= factor) or abs(pred - meas) <= floor
    assert ok, (f"{what}: predicted {pred:.5g}, measured {meas:.5g} "
                f"(ratio {ratio:.4f}, allowed ×{factor:.3g} or ±{floor:.2g})")
    return ratio


def check_sample(what: str, pred: float, meas: Sample, factor: float, floor: float = 0.0) -> float:
    """`check` against a measured Sample: the tolerance also admits its sampling noise."""
    return check(what, pred, meas.rms, factor, floor + meas.noise)


def check_graph(what: str, gm: fx.GraphModule, out: Sample, grads: list[Sample], fwd_factor: float,
                bwd_factors, floor: float = 0.0):
    """Predicted output rms and input-grad rms of `gm` vs eager measurements (None skips a grad)."""
    check_sample(f"{what}: output", predicted(output_node(gm)), out, fwd_factor, floor)
    for node, g, factor in zip(placeholders(gm), grads, bwd_factors):
        if factor is not None:
            check_sample(f"{what}: d {node.name}", predicted(node, META_BWD), g, factor, floor)


# ---------------------------------------------------------------- elementwise: exact Gaussian integrals

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": lambda x: F.silu(x),
    "relu": lambda x: torch.relu(x),
    "tanh": lambda x: torch.tanh(x),
    "sigmoid": lambda x: torch.sigmoid(x),
    "softplus": lambda x: F.softplus(x),
    "softplus_beta2": lambda x: F.softplus(x, beta=2.0),
    "square": lambda x: torch.square(x),
    "abs": lambda x: torch.abs(x),
    "clamp": lambda x: torch.clamp(x, -0.5, 1.0),
}
STEP_DERIVATIVES = ("relu", "abs", "clamp")  # f' is an indicator or a sign: closed forms

# The activation rules are Gauss–Hermite quadratures of f(X)² and f'(X)² with X ~ N(μ̂, σ̂²) at the
# sample moments of the input, meant to be exact: 2 % plus noise. The 1e-3·σ floor is the resolution
# of 64k samples in a far tail (relu at μ = −1, σ = 0.1: every sample is 0, the prediction ~1e-13).
# Observed (200 examples per activation): ratios within [0.989, 1.009]. ReLU uses its closed form.
EXACT = 1.02


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@RULE_SETTINGS
@given(mean=means, std=sigmas, seed=seeds)
def test_activation_forward_and_backward(name, mean, std, seed):
    gen = torch.Generator().manual_seed(seed)
    x = param(gen, NUMEL, mean=mean, std=std)
    gm = analyse(ACTIVATIONS[name], [x])
    out, (dx,) = run_eager(ACTIVATIONS[name], [x], gen)
    what = f"{name}(N({mean:.3g}, {std:.3g}²))"
    # an indicator f': below ~4 samples in NUMEL inside its support, the measured rms is 0 or noise
    floor = 2 / math.sqrt(NUMEL) if name in STEP_DERIVATIVES else 1e-3 * std
    check_graph(what, gm, out, [dx], EXACT, [EXACT], floor=floor)


@pytest.mark.parametrize("fn", [torch.cos, torch.sin], ids=["cos", "sin"])
@RULE_SETTINGS
@given(mean=st.floats(-3.0, 3.0), std=sigmas, seed=seeds)
def test_cos_sin_closed_form(fn, mean, std, seed):
    # E cos X = e^{−σ²/2} cos μ, E cos² X = (1 + e^{−2σ²} cos 2μ)/2, …: exact for Gaussian X.
    gen = torch.Generator().manual_seed(seed)
    x = param(gen, NUMEL, mean=mean, std=std)
    f = lambda x: fn(x)
    out, (dx,) = run_eager(f, [x], gen)
    check_graph(f"{fn.__name__}(N({mean:.3g}, {std:.3g}²))", analyse(f, [x]), out, [dx], EXACT, [EXACT])


@RULE_SETTINGS
@given(mean=means, std=sigmas, power=st.sampled_from([2, 3]), seed=seeds)
def test_pow_exact(mean, std, power, seed):
    # x², x³ of a Gaussian: closed form (p = 2) or quadrature of a polynomial (p = 3), exact. E x⁶ is
    # heavy-tailed, which the standard-error term of the tolerance accounts for.
    gen = torch.Generator().manual_seed(seed)
    x = param(gen, NUMEL, mean=mean, std=std)
    f = lambda x: x**power
    out, (dx,) = run_eager(f, [x], gen)
    check_graph(f"x**{power}, x ~ N({mean:.3g}, {std:.3g}²)", analyse(f, [x]), out, [dx], EXACT, [EXACT])


# ---------------------------------------------------------------- elementwise: independent operands

@RULE_SETTINGS
@given(ma=means, sa=sigmas, mb=means, sb=sigmas, alpha=st.floats(-2.0, 2.0).filter(lambda a: abs(a) > 0.05),
       op=st.sampled_from(["add", "mul"]), seed=seeds)
def test_add_with_alpha_and_mul_of_independent_tensors(ma, sa, mb, sb, alpha, op, seed):
    # a + α·b and a·b for independent a, b: μ and m2 are exact (m2a + α²m2b + 2αμaμb; m2a·m2b), and so
    # are the grads (da = dy, db = α·dy; da = b·dy, db = a·dy). The sample moments of a and b are
    # measured, so only their tiny sample correlation is unmodelled: 2 % plus noise.
    gen = torch.Generator().manual_seed(seed)
    a, b = param(gen, NUMEL, mean=ma, std=sa), param(gen, NUMEL, mean=mb, std=sb)
    f = (lambda a, b: torch.add(a, b, alpha=alpha)) if op == "add" else (lambda a, b: a * b)
    out, grads = run_eager(f, [a, b], gen)
    # Floor: a + α·b can nearly cancel (μa ≈ −αμb, small σ), leaving an RMS of sample-correlation size.
    check_graph(f"{op}, alpha={alpha:.3g}", analyse(f, [a, b]), out, grads, EXACT, [EXACT, EXACT],
                floor=3e-3 * (sa + abs(alpha) * sb))


@FEW_SETTINGS
@given(ma=means, sa=sigmas, mb=means, sb=sigmas, seed=seeds)
def test_broadcast_operand_grads_sum_over_copies(ma, sa, mb, sb, seed):
    # b of shape [256] broadcast over 256 rows: its gradient is a sum of 256 independent terms.
    gen = torch.Generator().manual_seed(seed)
    a, b = param(gen, 256, 256, mean=ma, std=sa), param(gen, 256, mean=mb, std=sb)
    for op, f in (("add", lambda a, b: a + b), ("mul", lambda a, b: a * b)):
        out, grads = run_eager(f, [a, b], gen)
        check_graph(f"broadcast {op}", analyse(f, [a, b]), out, grads, EXACT, [EXACT, EXACT])


def gelu_tanh_written_out(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# Eight ATen ops. Two combine *correlated* operands that the rules treat as independent:
#   x + 0.044715·x³        (add drops the cross term 2c·E[x⁴])
#   0.5x · (1 + tanh(…))   (mul uses E[a²]·E[b²] instead of E[a²b²])
# and x's gradient is a sum over three paths whose m2 are added (no cancellation). Observed over
# μ ∈ [−1, 1], σ ∈ [0.1, 4] on a grid: forward ratio in [0.82, 2.04] (worst at μ = −1, σ ≈ 0.7: the
# output is small and one-sided, the product of independent factors is not), gradient ratio in
# [0.80, 7.4] (worst at μ ≈ −0.77, σ = 0.1, where GELU' crosses zero and the true gradient nearly
# cancels). So √2 does not hold for the forward (hypothesis runs of 120–200 draws found up to 2.05,
# gradient up to 5.8); we test the observed bounds with a little room, 2.2 and 8.
GELU_WRITTEN_OUT_FWD, GELU_WRITTEN_OUT_BWD = 2.2, 8.0


@RULE_SETTINGS
@given(mean=means, std=sigmas, seed=seeds)
def test_gelu_tanh_written_out(mean, std, seed):
    gen = torch.Generator().manual_seed(seed)
    x = param(gen, NUMEL, mean=mean, std=std)
    gm = analyse(gelu_tanh_written_out, [x])
    assert len([n for n in gm.graph.nodes if n.op == "call_function"]) == 8
    torch.testing.assert_close(gelu_tanh_written_out(x.detach()), F.gelu(x.detach(), approximate="tanh"))
    out, (dx,) = run_eager(gelu_tanh_written_out, [x], gen)
    check_graph(f"written-out gelu_tanh(N({mean:.3g}, {std:.3g}²))", gm, out, [dx],
                GELU_WRITTEN_OUT_FWD, [GELU_WRITTEN_OUT_BWD])


# ---------------------------------------------------------------- normalizations

RMSNORM_VARIANTS = {
    "written_out": lambda x, w: x * torch.rsqrt(torch.mean(x**2, -1, keepdim=True) + 1e-6) * w,
    "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
}


@pytest.mark.parametrize("variant", list(RMSNORM_VARIANTS))
@RULE_SETTINGS
@given(mean=means, std=sigmas, w_mean=means, w_std=st.floats(0.1, 2.0), seed=seeds)
def test_rms_norm(variant, mean, std, w_mean, w_std, seed):
    # Forward: x/rms(x) has second moment exactly 1 in every row (Σ_i x_i²/mean(x²) = D), times m2w.
    # Backward: both forms predict dx ≈ w·dy/rms. They drop the projection −x̂·mean(x̂·w·dy)/rms (the
    #   written-out graph even adds that path as an independent contribution); with D = 256 that is
    #   ~1/D of the variance, under 1 %. dw = Σ_rows x̂·dy is exact. All within 2 % plus noise.
    gen = torch.Generator().manual_seed(seed)
    x, w = param(gen, 256, 256, mean=mean, std=std), param(gen, 256, mean=w_mean, std=w_std)
    f = RMSNORM_VARIANTS[variant]
    out, grads = run_eager(f, [x, w], gen)
    check_graph(f"{variant} rms_norm", analyse(f, [x, w]), out, grads, EXACT, [EXACT, EXACT])


def test_rms_norm_written_out_matches_fused():
    # The decomposition and the fused op give the same forward prediction for the same input.
    gen = torch.Generator().manual_seed(1)
    x, w = param(gen, 64, 512, mean=0.3, std=2.0), param(gen, 512, mean=1.0, std=0.2)
    preds = {variant: predicted(output_node(analyse(f, [x, w]))) for variant, f in RMSNORM_VARIANTS.items()}
    assert preds["written_out"] == pytest.approx(preds["F.rms_norm"], rel=1e-6), preds


@RULE_SETTINGS
@given(mean=means, std=sigmas, w_mean=means, w_std=st.floats(0.1, 2.0), b_mean=means,
       b_std=st.floats(0.0, 2.0), seed=seeds)
def test_layer_norm_with_random_affine(mean, std, w_mean, w_std, b_mean, b_std, seed):
    # Forward: x̂ has mean 0 and variance 1 per row, so y = x̂·w + b has m2 = m2w + m2b (exact).
    # dx: the rule keeps w·dy/σ and drops both projections (mean and x̂ directions), ~2/D of the
    #   variance for D = 256. dw = Σ_rows x̂·dy and db = Σ_rows dy are exact. 2 % plus noise.
    gen = torch.Generator().manual_seed(seed)
    x = param(gen, 256, 256, mean=mean, std=std)
    w, b = param(gen, 256, mean=w_mean, std=w_std), param(gen, 256, mean=b_mean, std=b_std)
    f = lambda x, w, b: F.layer_norm(x, (256,), w, b)
    out, grads = run_eager(f, [x, w, b], gen)
    check_graph("layer_norm", analyse(f, [x, w, b]), out, grads, EXACT, [EXACT, EXACT, EXACT])


# ---------------------------------------------------------------- GEMMs

# GEMM rules are exact in expectation for iid operands, but one draw of the operands is not iid
# across the output: with a mean-dominated operand the output (and a grad) is nearly constant along
# one axis, so the effective sample count is the number of rows or of columns, not of elements (and
# a per-element standard error does not see it). With ≥ 1024 of each, that noise is ≲ 2.2 % (1 sd)
# on an RMS: hence 10 %. Observed over 60 draws per case: ratios within [0.95, 1.05].
GEMM = 1.10
gemm_sigmas = st.floats(0.1, 4.0)
small_means = st.floats(-0.5, 0.5)


@FEW_SETTINGS
@given(x_mean=small_means, x_std=gemm_sigmas, w_mean=st.floats(-1.0, 1.0), w_std=gemm_sigmas,
       b_mean=means, b_std=st.floats(0.0, 2.0), seed=seeds)
def test_linear_with_bias(x_mean, x_std, w_mean, w_std, b_mean, b_std, seed):
    # w_mean is in units of the weight's std (w_std/√k): weights are near zero-mean, inputs need not be.
    gen = torch.Generator().manual_seed(seed)
    x = param(gen, 16, 128, 128, mean=x_mean, std=x_std)
    w_scale = w_std / math.sqrt(128)
    w = param(gen, 1024, 128, mean=w_mean * w_scale, std=w_scale)
    b = param(gen, 1024, mean=b_mean, std=b_std)
    f = lambda x, w, b: F.linear(x, w, b)
    gm = analyse(f, [x, w, b])
    assert output_node(gm).target is aten.linear.default
    out, grads = run_eager(f, [x, w, b], gen)
    check_graph("linear", gm, out, grads, GEMM, [GEMM, GEMM, GEMM])


@FEW_SETTINGS
@given(x_std=gemm_sigmas, w_std=gemm_sigmas, alpha=st.floats(0.1, 2.0), beta=st.floats(0.1, 2.0), seed=seeds)
def test_addmm(x_std, w_std, alpha, beta, seed):
    gen = torch.Generator().manual_seed(seed)
    b, x = param(gen, 1024), param(gen, 2048, 128, std=x_std)
    w = param(gen, 128, 1024, std=w_std / math.sqrt(128))
    f = lambda b, x, w: torch.addmm(b, x, w, beta=beta, alpha=alpha)
    gm = analyse(f, [b, x, w])
    assert output_node(gm).target is aten.addmm.default
    out, grads = run_eager(f, [b, x, w], gen)
    check_graph(f"addmm alpha={alpha:.3g} beta={beta:.3g}", gm, out, grads, GEMM, [GEMM, GEMM, GEMM])


MATMULS = {  # ≥ 1024 rows and ≥ 1024 columns in all, over the batch
    "bmm": (torch.bmm, aten.bmm.default, (8, 128, 128), (8, 128, 128)),
    "matmul_batched": (torch.matmul, aten.matmul.default, (8, 128, 128), (8, 128, 128)),
    "matmul_broadcast_rhs": (torch.matmul, aten.matmul.default, (8, 128, 128), (128, 1024)),
    "mm": (torch.mm, aten.mm.default, (1024, 128), (128, 1024)),
}


@pytest.mark.parametrize("case", list(MATMULS))
@FEW_SETTINGS
@given(a_mean=small_means, a_std=gemm_sigmas, b_std=gemm_sigmas, seed=seeds)
def test_matmul_family(case, a_mean, a_std, b_std, seed):
    fn, target, a_shape, b_shape = MATMULS[case]
    gen = torch.Generator().manual_seed(seed)
    a, b = param(gen, *a_shape, mean=a_mean, std=a_std), param(gen, *b_shape, std=b_std / math.sqrt(a_shape[-1]))
    f = lambda a, b: fn(a, b)
    gm = analyse(f, [a, b])
    assert output_node(gm).target is target
    out, grads = run_eager(f, [a, b], gen)
    check_graph(case, gm, out, grads, GEMM, [GEMM, GEMM])


# ---------------------------------------------------------------- softmax and attention

# The rules take E Σ_j p_j² and E[Σp² − 2Σp³ + (Σp²)²] for n logits of variance s² from a seeded
# Monte Carlo on a log-spaced grid of n, treat queries, keys and upstream gradients as independent,
# and let the means of k and v cancel where softmax centres them. Tested: forward within 1.2,
# gradients within 1.3 (observed [0.87, 1.11]), over logit σ up to 3 (softmax) and q/k σ up to 1.5, mean(v) up to ±2 and
# mean(k) up to ±1 (SDPA).
ATTN_FWD, ATTN_BWD = 1.2, 1.3


@pytest.mark.parametrize("n", [16, 64, 256])
@FEW_SETTINGS
@given(std=st.floats(0.1, 3.0), seed=seeds)
def test_softmax(n, std, seed):
    gen = torch.Generator().manual_seed(seed)
    x = param(gen, NUMEL // n, n, std=std)
    f = lambda x: F.softmax(x, -1)
    out, grads = run_eager(f, [x], gen)
    check_graph(f"softmax n={n} σ={std:.3g}", analyse(f, [x]), out, grads, ATTN_FWD, [ATTN_BWD])


def sdpa_case(gen, seq: int, causal: bool, qk_std: float, v_mean: float, v_std: float, k_mean: float = 0.0):
    shape = (2, 4, seq, 64)
    q, k = param(gen, *shape, std=qk_std), param(gen, *shape, mean=k_mean, std=qk_std)
    v = param(gen, *shape, mean=v_mean, std=v_std)
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    gm = analyse(f, [q, k, v])
    assert output_node(gm).target is aten.scaled_dot_product_attention.default
    return gm, *run_eager(f, [q, k, v], gen)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq", [16, 64, 256])
@FEW_SETTINGS
@given(qk_std=st.floats(0.5, 1.5), v_mean=st.floats(-2.0, 2.0), v_std=st.floats(0.5, 2.0),
       k_mean=st.floats(-1.0, 1.0), seed=seeds)
def test_sdpa(causal, seq, qk_std, v_mean, v_std, k_mean, seed):
    gen = torch.Generator().manual_seed(seed)
    gm, out, grads = sdpa_case(gen, seq, causal, qk_std, v_mean, v_std, k_mean)
    check_graph(f"sdpa causal={causal} seq={seq} qk σ={qk_std:.3g}", gm, out, grads, ATTN_FWD, [ATTN_BWD] * 3)


# ---------------------------------------------------------------- regressions: cases earlier rules got wrong

# relu' is a step: Gauss–Hermite gave E[f'²] 0.740 instead of Φ(0.5) = 0.691 (now closed form);
# tanh'² = sech⁴ was narrower than 96 nodes' spacing at σ = 4 (0.118 vs 0.132; now 160 nodes).
@pytest.mark.parametrize("name, mean, std", [("relu", 0.5, 1.0), ("relu", -0.5, 1.0), ("tanh", 0.0, 4.0)])
def test_former_quadrature_errors(name, mean, std):
    gen = torch.Generator().manual_seed(0)
    x = param(gen, NUMEL, mean=mean, std=std)
    out, (dx,) = run_eager(ACTIVATIONS[name], [x], gen)
    check_graph(f"{name}(N({mean}, {std}²))", analyse(ACTIVATIONS[name], [x]), out, [dx], EXACT, [EXACT])


FORMER_ATTENTION_ERRORS = {  # case: (description, the quantity an earlier rule got wrong)
    # min(e^{s²}/n, 1) overestimated Σp² once e^{s²} is comparable to n: forward ×2.3.
    "softmax_large_logits": ("softmax n=64, logits σ=2", "output"),
    # logit variance 5 ≥ log 16 saturated Σp² at 1 for every query: dq (and dk) predicted exactly 0.
    "sdpa_large_logits": ("sdpa seq=16, q, k σ=1.5", "q"),
    # dq/dk used m2(v) instead of var(v): dq ×2.4 for v ~ N(2, 1).
    "sdpa_v_mean": ("sdpa seq=64, v ~ N(2, 1)", "q"),
    # the logit variance over keys is d·m2(q)·var(k) and dq = scale·Σ_j dS_ij (k_j − k̄): the rule
    # used m2(k) for both: dq ×2.2 (forward ×1.43) for k ~ N(1, 0.8²).
    "sdpa_k_mean": ("sdpa seq=64, k ~ N(1, 0.8²)", "q"),
}


@pytest.mark.parametrize("case", list(FORMER_ATTENTION_ERRORS))
def test_former_attention_errors(case):
    what, quantity = FORMER_ATTENTION_ERRORS[case]
    gen = torch.Generator().manual_seed(0)
    if case == "softmax_large_logits":
        x = param(gen, 1024, 64, std=2.0)
        f = lambda x: F.softmax(x, -1)
        gm, (out, grads) = analyse(f, [x]), run_eager(f, [x], gen)
    elif case == "sdpa_k_mean":
        shape = (2, 4, 64, 64)
        q, k, v = param(gen, *shape, std=0.8), param(gen, *shape, mean=1.0, std=0.8), param(gen, *shape)
        f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
        gm, (out, grads) = analyse(f, [q, k, v]), run_eager(f, [q, k, v], gen)
    elif case == "sdpa_v_mean":
        gm, out, grads = sdpa_case(gen, 64, False, 1.0, 2.0, 1.0)
    else:
        gm, out, grads = sdpa_case(gen, 16, False, 1.5, 0.0, 1.0)
    if quantity == "output":
        check_sample(f"{what}: output", predicted(output_node(gm)), out, ATTN_FWD)
    else:
        index = "qkv".index(quantity)
        check_sample(f"{what}: d {quantity}", predicted(placeholders(gm)[index], META_BWD), grads[index], ATTN_BWD)


# ---------------------------------------------------------------- unknown, not-float, constants

@pytest.mark.parametrize("op, target", [
    (lambda x: torch.cumsum(x, -1), aten.cumsum.default),
    (lambda x: torch.special.erfinv(x), aten.special_erfinv.default),
], ids=["cumsum", "erfinv"])
def test_unknown_names_its_op_and_propagates(op, target):
    gen = torch.Generator().manual_seed(0)
    x, w = param(gen, 8, 16, std=0.3), param(gen, 4, 16)
    gm = analyse(lambda x, w: F.linear(op(x), w), [x, w])
    source, linear = op_node(gm, target), op_node(gm, aten.linear.default)
    assert linear.args[0] is source  # the linear's input is the op without a rule
    for node in (source, linear):
        value = node.meta[META_FWD]
        assert isinstance(value, Unknown), f"{node.name}: {value!r}"
        assert value.op == op_name(target), value
    # Backward: the gradients behind the unknown value are Unknown too, never a guess.
    for node in placeholders(gm):
        assert isinstance(node.meta.get(META_BWD), Unknown), (node.name, node.meta.get(META_BWD))


def test_integer_tensors_are_not_float():
    gen = torch.Generator().manual_seed(0)
    x, table = param(gen, 32, 10), param(gen, 10, 8, std=0.5)
    gm = analyse(lambda x, table: F.embedding(torch.argmax(x, -1), table), [x, table])
    assert isinstance(op_node(gm, aten.argmax.default).meta[META_FWD], NotFloat)
    # a lookup keeps the table's moments
    assert op_node(gm, aten.embedding.default).meta[META_FWD] == placeholders(gm)[1].meta[META_FWD]


def rotary_like_table() -> torch.Tensor:
    pos = torch.arange(64).to(DTYPE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).to(DTYPE) / 32))
    return torch.cos(pos[:, None] * inv_freq[None, :]) * 2.0 + 0.5


def test_constant_subgraph_is_folded_exactly():
    # A table built from torch.arange only is folded at compile time: its moments are the measured
    # ones, exactly, not a Gaussian approximation; and it carries no gradient.
    gen = torch.Generator().manual_seed(0)
    x = param(gen, 64, 16)
    gm = analyse(lambda x: x * rotary_like_table(), [x])
    assert isinstance(op_node(gm, aten.arange.default).meta[META_FWD], NotFloat)
    table = op_node(gm, aten.add.Tensor)
    value, expected = table.meta[META_FWD], rotary_like_table()
    assert isinstance(value, Moments) and torch.equal(value.concrete, expected)
    assert value.mean == pytest.approx(expected.mean().item(), rel=1e-12)
    assert value.m2 == pytest.approx(expected.pow(2).mean().item(), rel=1e-12)
    assert META_BWD not in table.meta


def test_plain_float_inputs_are_folded():
    # A non-parameter float input is measured and kept: ops on it fold to the exact measured moments.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen, dtype=DTYPE) * 2 + 0.5
    value = output_node(analyse(lambda x: F.gelu(x), [x])).meta[META_FWD]
    assert value.m2 == pytest.approx(F.gelu(x).pow(2).mean().item(), rel=1e-12)


# ---------------------------------------------------------------- cross-entropy seed for logits outputs

@pytest.mark.parametrize("logits_shape", [(512, 1000), (4, 128, 256), (2, 64, 50)])
def test_cross_entropy_seed_for_logits_output(logits_shape):
    # A graph that returns logits only is seeded with d(mean CE)/d logits at init: m2 = (1−1/V)/V/N².
    # Measured (with measure_rms on the traced graph): the real gradient of F.cross_entropy at small
    # random logits (std 0.02) and random targets. 10 %.
    *lead, vocab = logits_shape
    tokens = math.prod(lead)
    gen = torch.Generator().manual_seed(0)
    h, w = param(gen, *lead, 64), param(gen, vocab, 64, std=0.02 / 8)
    gm = analyse(lambda h, w: F.linear(h, w), [h, w], grad_output_std=None)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    measured = measure_rms(gm, [h, w], loss_fn=lambda logits: F.cross_entropy(logits.reshape(-1, vocab), targets))
    logits = output_node(gm)
    meas_value, meas_grad = measured[logits.name]
    assert meas_value == pytest.approx(0.02, rel=0.1)  # the logits are indeed small
    assert predicted(logits, META_BWD) ** 2 == pytest.approx((1 - 1 / vocab) / vocab / tokens**2, rel=1e-12)
    check(f"CE seed for logits {tuple(logits_shape)}", predicted(logits, META_BWD), meas_grad, 1.10)


# ---------------------------------------------------------------- constants made from a tensor


def test_constant_like_ops_are_constants():
    gen = torch.Generator().manual_seed(0)
    x = param(gen, 64, 64)
    f = lambda x: x * torch.ones_like(x) * 3.0 + torch.zeros_like(x) + x.new_full((64, 64), 2.0)
    gm = analyse(f, [x])
    out, _ = run_eager(f, [x], gen)
    check_sample("x·ones·3 + zeros + full(2)", predicted(output_node(gm)), out, EXACT)
