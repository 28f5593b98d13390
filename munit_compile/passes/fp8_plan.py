"""Choose static FP8 casts for every eligible GEMM and rewrite it into `munit::fp8_linear`.

    before: linear = aten.linear.default(x, w, b)                      # or addmm(b, x, w_kn) (GPT-2 Conv1D)
    after:  linear = munit.fp8_linear.default(x, w, b, s_x, s_w, s_g, "e4m3", "e5m2")

Eligibility is a table of checks, each returning None (fine) or the reason the GEMM stays in high
precision. Scales are s = 2^round(−log2 rms): activations and gradients from the variance analysis,
weights from the parameter's measured σ at compile time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from munit_compile.config import Config
from munit_compile.ir import META_BWD, META_FWD, META_PLAN, META_ROLE, concrete_shape, tensor_of
from munit_compile.ops.formats import fp8_format, power_of_two_scale
from munit_compile.passes import gaussian
from munit_compile.passes.rules.shape import PASS_THROUGH
from munit_compile.passes.values import Moments, Unknown

log = logging.getLogger("munit_compile")
aten = torch.ops.aten

FP8_ELIGIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GemmOperands:
    """A GEMM seen as y = x @ wᵀ + bias, w being [n, k] (`w_transposed`: the graph holds w as [k, n])."""

    x: fx.Node
    w: fx.Node
    bias: fx.Node | None
    k: int
    n: int
    w_transposed: bool


@dataclass(frozen=True)
class GemmDecision:
    """What the plan decided for one GEMM: FP8 with its static scales, or high precision and why."""

    node: str
    fp8: bool
    reason: str = ""
    x_format: str | None = None
    x_scale: float | None = None
    w_format: str | None = None
    w_scale: float | None = None
    grad_format: str | None = None
    grad_scale: float | None = None
    x_underflow: float | None = None     # predicted share of scaled x below its format's smallest normal
    grad_underflow: float | None = None  # the same for the scaled output gradient
    fused_kernel: str | None = None      # the kernel it runs as ("fp8_gemm", "fp8_gemm+gelu", ...; passes.fuse)


def _linear_operands(node: fx.Node) -> GemmOperands | None:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    n, k = concrete_shape(tensor_of(w).shape)
    return GemmOperands(x, w, bias, k, n, w_transposed=False)


def _addmm_operands(node: fx.Node) -> GemmOperands | None:
    """addmm(b, x, w_kn) with β = α = 1 and a 1-D bias is a linear layer (transformers' Conv1D)."""
    bias, x, w = node.args[0], node.args[1], node.args[2]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    b = tensor_of(bias)
    k, n = concrete_shape(tensor_of(w).shape)
    if b is None or concrete_shape(b.shape) != (n,):
        return None
    return GemmOperands(x, w, bias, k, n, w_transposed=True)


_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.mT.default, aten.adjoint.default)


def _matmul_operands(node: fx.Node) -> GemmOperands | None:
    """x @ W.T (or W.t(), W.mT) with W a 2-D parameter is a bias-free linear layer (e.g. Falcon)."""
    x, w_t = node.args[0], node.args[1]
    if not (isinstance(w_t, fx.Node) and w_t.target in _TRANSPOSES):
        return None
    w = w_t.args[0]
    if tensor_of(w) is None or tensor_of(w).dim() != 2 or w.meta.get(META_ROLE) != "parameter":
        return None
    n, k = concrete_shape(tensor_of(w).shape)
    return GemmOperands(x, w, None, k, n, w_transposed=False)


# op -> a function giving the GEMM as y = x @ wᵀ + bias, or None to decline (not a weight GEMM)
GEMM_OPERANDS = {
    aten.linear.default: _linear_operands,
    aten.addmm.default: _addmm_operands,
    aten.matmul.default: _matmul_operands,
}


# ---------------------------------------------------------------- eligibility checks

def _check_dtype(g: GemmOperands, ctx) -> str | None:
    dtypes = {tensor_of(g.x).dtype, tensor_of(g.w).dtype}
    if not dtypes <= set(FP8_ELIGIBLE_DTYPES):
        return f"dtype {sorted(map(str, dtypes))} is not float32/bfloat16/float16"
    return None


def _check_multiples(g: GemmOperands, ctx) -> str | None:
    m = ctx.config.gemm_multiple
    if g.k % m or g.n % m:
        return f"shape not FP8-eligible: K={g.k} and N={g.n} must be multiples of {m}"
    return None


def _check_not_vocabulary(g: GemmOperands, ctx) -> str | None:
    if g.w in ctx.embedding_tables:
        return "LM head (weight tied to the embedding) stays in high precision"
    if g.n in ctx.vocab_sizes and feeds_output_or_loss(ctx.node, g.n):
        return "LM head (N = vocabulary size, feeds the loss/logits) stays in high precision"
    return None


_LOSS_OPS = (aten.cross_entropy_loss.default, aten.log_softmax.int, aten._log_softmax.default)
# Ops that end an LM head's path to the loss: a model's hidden width can equal its vocabulary (byte
# models at d 256), and the residual stream then also "keeps the last dim n" up to the loss.
_NOT_HEAD_PATH = frozenset({
    *GEMM_OPERANDS, aten.mm.default, aten.bmm.default, aten.scaled_dot_product_attention.default,
    *(getattr(aten, norm).default for norm in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
                                               "group_norm", "native_group_norm") if hasattr(aten, norm)),
})
_MERGES = (aten.add.Tensor, aten.sub.Tensor)  # x + f(x): a residual merge, not logit post-processing


def _continues_head_path(user: fx.Node, n: int) -> bool:
    if user.target in _NOT_HEAD_PATH:
        return False
    if user.target in _MERGES and sum(isinstance(a, fx.Node) for a in user.args[:2]) == 2:
        return False
    val = user.meta.get("val")
    keeps_vocab = isinstance(val, torch.Tensor) and val.dim() >= 1 and concrete_shape(val.shape)[-1] == n
    return user.target in PASS_THROUGH or keeps_vocab


def feeds_output_or_loss(node: fx.Node, n: int) -> bool:
    """Whether `node` reaches a graph output or a loss through ops that keep its last dim `n` (views,
    dtype casts, logit scaling, soft-capping), never through a GEMM, attention, norm or residual add."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user.op == "output" or user.target in _LOSS_OPS:
                return True
            if user not in seen and _continues_head_path(user, n):
                seen.add(user)
                frontier.append(user)
    return False


def _check_weight_is_parameter(g: GemmOperands, ctx) -> str | None:
    if g.w.op != "placeholder" or g.w.meta.get(META_ROLE) != "parameter":
        return "weight is not a parameter (no static weight scale)"
    return None


def _check_scales_known(g: GemmOperands, ctx) -> str | None:
    for what, value in (("input", g.x.meta.get(META_FWD)), ("weight", g.w.meta.get(META_FWD)),
                        ("output gradient", ctx.out.meta.get(META_BWD))):
        if isinstance(value, Unknown):
            return f"{what} scale unknown: {value}"
        if not isinstance(value, Moments) or not value.m2 > 0:
            return f"{what} scale not predicted (no {'gradient reaches this GEMM' if what == 'output gradient' else 'statistics'})"
    return None


ELIGIBILITY_CHECKS = (
    _check_dtype,
    _check_multiples,
    _check_not_vocabulary,
    _check_weight_is_parameter,
    _check_scales_known,
)


@dataclass
class _CheckContext:
    config: Config
    embedding_tables: frozenset  # weight nodes of the graph's embeddings
    vocab_sizes: frozenset       # their row counts
    node: fx.Node | None = None
    out: fx.Node | None = None  # the GEMM, or the static multiplier after it: its gradient is the GEMM's grad_out
    alpha: float = 1.0
    underflow_cache: dict = field(default_factory=dict)

    @staticmethod
    def of(gm: fx.GraphModule, config: Config) -> "_CheckContext":
        tables = frozenset(
            n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding.default
        )
        return _CheckContext(config, tables, frozenset(concrete_shape(tensor_of(t).shape)[0] for t in tables))


def plan_fp8(gm: fx.GraphModule, config: Config) -> list[GemmDecision]:
    """Rewrite eligible GEMMs in place; return one decision per GEMM (FP8 or why not)."""
    ctx = _CheckContext.of(gm, config)
    decisions = []
    for node in list(gm.graph.nodes):
        operands_of = GEMM_OPERANDS.get(node.target) if node.op == "call_function" else None
        if operands_of is None:
            continue
        operands = operands_of(node)
        if operands is None:  # not a weight GEMM (e.g. attention's q @ kᵀ): activations stay as they are
            continue
        ctx.node = node
        ctx.out, ctx.alpha = output_multiplier(node)
        reason = next((r for r in (check(operands, ctx) for check in ELIGIBILITY_CHECKS) if r), None)
        if not config.fp8:
            reason = "FP8 disabled in Config (fp8=False)"
        decision = GemmDecision(node.name, False, reason) if reason else _rewrite(gm, node, operands, ctx)
        node.meta[META_PLAN] = decision
        decisions.append(decision)
    gm.graph.lint()
    gm.recompile()
    return decisions


_SCALAR_MULS = (aten.mul.Tensor, aten.mul.Scalar)


def output_multiplier(node: fx.Node) -> tuple[fx.Node, float]:
    """(the node whose value is the GEMM's output, its static multiplier): `mul(gemm, c)` as the GEMM's
    only user is folded into the FP8 op (α = c, e.g. μS's 1/√fan_in); otherwise (node, 1.0)."""
    if len(node.users) == 1:
        (user,) = node.users
        if user.target in _SCALAR_MULS and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, float) and not isinstance(other, bool) and other > 0:
                return user, float(other)
    return node, 1.0


UNDERFLOW_SAMPLES = 1 << 15


def underflow_fraction(value: Moments, scale: float, fmt: str, cache: dict | None = None) -> float | None:
    """Share of nonzero elements whose |x·scale| falls below the format's smallest normal (they lose
    precision as subnormals or flush to zero), from the value's distribution shape; None if unknown.
    Gaussian: closed form; a known non-Gaussian shape (activations, products): seeded sampling,
    memoized in `cache` per (value, threshold) while the values are alive (GEMMs share inputs)."""
    threshold = fp8_format(fmt).min_normal / scale
    if value.sampler is None and value.gaussian and not value.row_constant:
        return gaussian.below_fraction(value.mean, value.std, threshold)
    cache = {} if cache is None else cache
    key = (id(value), threshold)
    if key not in cache:
        cache[key] = _sampled_underflow(value, threshold)
    return cache[key]


def _sampled_underflow(value: Moments, threshold: float) -> float | None:
    samples = value.draw(UNDERFLOW_SAMPLES, torch.Generator().manual_seed(0))
    if samples is None:
        return None
    magnitude = samples.abs()
    return ((magnitude > 0) & (magnitude < threshold)).double().mean().item()


def _rewrite(gm: fx.GraphModule, node: fx.Node, g: GemmOperands, ctx: _CheckContext) -> GemmDecision:
    config = ctx.config
    x_scale = power_of_two_scale(g.x.meta[META_FWD].rms)
    w_scale = power_of_two_scale(g.w.meta[META_FWD].rms)
    out, alpha = ctx.out, ctx.alpha
    grad_scale = power_of_two_scale(out.meta[META_BWD].rms)
    with gm.graph.inserting_before(node):
        w = g.w
        if g.w_transposed:
            w = gm.graph.call_function(aten.t.default, (g.w,))
            w.meta["val"] = tensor_of(g.w).t()
            w.meta[META_FWD] = g.w.meta[META_FWD]
        args = (g.x, w, g.bias, x_scale, w_scale, grad_scale, config.forward_format, config.grad_format)
        # the GEMM's own output dtype (autocast's, where it ran under autocast; x may be fp32 then)
        out_dtype = tensor_of(out).dtype
        kwargs = {"out_dtype": out_dtype} if out_dtype != tensor_of(g.x).dtype else {}
        fp8 = gm.graph.call_function(torch.ops.munit.fp8_linear.default, args + ((alpha,) if alpha != 1.0 else ()),
                                     kwargs)
    fp8.meta.update(out.meta)
    decision = GemmDecision(
        node.name, True, "",
        config.forward_format, x_scale, config.forward_format, w_scale, config.grad_format, grad_scale,
        underflow_fraction(g.x.meta[META_FWD], x_scale, config.forward_format, ctx.underflow_cache),
        underflow_fraction(out.meta[META_BWD], grad_scale, config.grad_format, ctx.underflow_cache),
        fused_kernel="fp8_gemm",
    )
    fp8.meta[META_PLAN] = decision  # passes.fuse finds the decision of the op it fuses here
    out.replace_all_uses_with(fp8)
    if out is not node:
        gm.graph.erase_node(out)
    gm.graph.erase_node(node)
    return decision
