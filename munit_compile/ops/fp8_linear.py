"""`munit::fp8_linear`, `munit::fp8_linear_q` and `munit::fp8_gemm`: static-scaled FP8 GEMMs as custom ops.

Forward  z  = α·(q₄(x·s_x) @ q₄(W·s_w)ᵀ / (s_x·s_w) + b)         (E4M3 operands, fp32; x_q: q₄(x·s_x) given)
         h  = act(z)·g                                         (act: `epilogue.ACTIVATIONS`; gate g optional)
         y  = c_skip·r + c_branch·h, rounded once to out_dtype   (residual r optional; else y = c_branch·h)
         fp8_linear_q also returns y_q = q(y·s_q) from the same fp32 y: the next GEMM's operand
Backward dh = c_branch·dy,  dg = dh·act(z),  dr = c_skip·dy
         dz = m·act′(z)·(dh·g)                                 (fp32; m = grad_multiplier)
         dx = m_x·α·q₅(dz·s_g) @ q₄(W·s_w)    / (s_g·s_w)      (E5M2 grad, E4M3 weight; m_x = x_grad_multiplier)
         dW = α·q₅(dz·s_g)ᵀ @ q₄(x·s_x)       / (s_g·s_x),  db = α·Σ_rows dz
α is a static output multiplier (μS: 1/√fan_in), so dz, the gradient of the GEMM's output, is what is cast;
m and m_x are folded `munit::grad_scale` constants (μS's unit backward). All scales are static powers of
two fixed at compile time; accumulation is fp32. `passes.fuse` sets the epilogue arguments; the kernels
come from `codegen.select.kernels_for`: Triton on CUDA, the exact reference elsewhere.

Saved for backward: q₄(x·s_x) (x_q when given: 1 byte per element instead of x), W, the bias and the gate.
With an activation or a gate, backward RECOMPUTES z (one more forward FP8 GEMM from the saved copy)
rather than returning z as a second output to be saved:
- memory: nothing M×N is saved; the unfused pair also saves z (the activation's input, M×N): a 4× MLP's
  up projection saves 4·d_model per token per layer less. (Inductor's min-cut partitioner may instead
  save z and recompute act(z); then fusion still removes the activation kernel and a rounding.)
- exactness: act′ is evaluated at the exact fp32 z the forward used, not at a copy rounded to x.dtype.
- cost: the forward GEMM runs again in backward (4 GEMMs instead of 3 for that layer), in FP8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from munit_compile.codegen import epilogue, reference
from munit_compile.codegen.select import kernels_for
from munit_compile.ops.formats import FP8_FORMATS, check_scale, fp8_format

FP8_DTYPES = {spec.dtype for spec in FP8_FORMATS.values()}
LINEAR_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.library.custom_op("munit::fp8_gemm", mutates_args=())
def fp8_gemm(
    a: torch.Tensor,
    b_t: torch.Tensor,
    a_scale: float,
    b_scale: float,
    a_format: str,
    b_format: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[M,K] x [N,K] -> [M,N]: (q(a·s_a) @ q(b_t·s_b)ᵀ)/(s_a·s_b) in out_dtype (no autograd: a backward GEMM).
    An operand already in its format's FP8 dtype is taken as q(·s) itself (a saved FP8 copy)."""
    _check_gemm_args(a, b_t, a_scale, b_scale, a_format, b_format)
    return kernels_for(a).fp8_gemm(a, b_t, a_scale, b_scale, a_format, b_format, out_dtype)


@fp8_gemm.register_fake
def _fp8_gemm_fake(a, b_t, a_scale, b_scale, a_format, b_format, out_dtype):
    _check_gemm_args(a, b_t, a_scale, b_scale, a_format, b_format)
    return a.new_empty((a.shape[0], b_t.shape[0]), dtype=out_dtype)


@torch.library.custom_op("munit::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: float,
    w_scale: float,
    grad_scale: float,
    fwd_format: str,
    grad_format: str,
    alpha: float = 1.0,
    activation: str = "none",
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    c_skip: float = 1.0,
    c_branch: float = 1.0,
    x_q: torch.Tensor | None = None,
    grad_multiplier: float = 1.0,
    x_grad_multiplier: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y[..., N] = c_skip·r + c_branch·act(α·(x[..., K] @ w[N, K]ᵀ + bias))·gate (r = 0 without a residual),
    static-scaled FP8 operands (x_q: x's FP8 copy, already cast); output in out_dtype (default x.dtype;
    autocast's dtype when the replaced GEMM ran under autocast), promoted with the residual's. Backward
    multiplies the gradient of the pre-activation z by grad_multiplier before its cast, and x's gradient by
    x_grad_multiplier (each a folded `munit::grad_scale`, on the output and on the input)."""
    return _forward(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha, activation, gate,
                    residual, c_skip, c_branch, x_q, grad_multiplier, x_grad_multiplier, out_dtype)


def _forward(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha, activation, gate, residual,
             c_skip, c_branch, x_q, grad_multiplier, x_grad_multiplier, out_dtype, q_dtype=None, q_scale=1.0):
    """fp8_linear's forward (with q_dtype: fp8_linear_q's (y, y_q)) on the kernels for x's device."""
    _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha, activation, gate,
                       residual, c_skip, c_branch, x_q, grad_multiplier, x_grad_multiplier, out_dtype)
    return kernels_for(x).fp8_linear(x, w, bias, x_scale, w_scale, fwd_format, alpha, activation,
                                     reference.linear_out_dtype(x, residual, out_dtype), gate=gate,
                                     residual=residual, c_skip=c_skip, c_branch=c_branch, x_q=x_q,
                                     q_dtype=q_dtype, q_scale=q_scale)


@fp8_linear.register_fake
def _fp8_linear_fake(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha=1.0, activation="none",
                     gate=None, residual=None, c_skip=1.0, c_branch=1.0, x_q=None, grad_multiplier=1.0,
                     x_grad_multiplier=1.0, out_dtype=None):
    _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha, activation, gate,
                       residual, c_skip, c_branch, x_q, grad_multiplier, x_grad_multiplier, out_dtype)
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=reference.linear_out_dtype(x, residual, out_dtype))


def _with_fp8_copy_schema(schema: str) -> str:
    """fp8_linear's schema with q_scale and q_format appended and (y, y_q) returned: the two ops can't drift."""
    arguments = schema[schema.index("(") + 1:schema.rindex(") -> ")]
    return f'({arguments}, float q_scale=1., str q_format="e4m3") -> (Tensor, Tensor)'


def bind_q_args(args: tuple, kwargs: dict) -> list:
    """fp8_linear_q's arguments in schema order, defaults filled in (its kernel takes *args, **kwargs)."""
    schema = torch.ops.munit.fp8_linear_q.default._schema.arguments
    return [args[i] if i < len(args) else kwargs.get(a.name, a.default_value) for i, a in enumerate(schema)]


@torch.library.custom_op("munit::fp8_linear_q", mutates_args=(),
                         schema=_with_fp8_copy_schema(str(torch.ops.munit.fp8_linear.default._schema)))
def fp8_linear_q(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_linear's arguments, then q_scale, q_format -> (y, y_q): `fp8_linear`'s y, and y_q = sat(y·q_scale)
    in FP8 q_format from the same fp32 y, written by the same epilogue: the next GEMM's operand
    (`passes.fuse`'s gemm_fp8_output). y_q has no gradient."""
    *linear, q_scale, q_format = bind_q_args(args, kwargs)
    check_scale(q_scale, "munit::fp8_linear_q q_scale")
    return _forward(*linear, q_dtype=fp8_format(q_format).dtype, q_scale=q_scale)


@fp8_linear_q.register_fake
def _fp8_linear_q_fake(*args, **kwargs):
    *linear, q_scale, q_format = bind_q_args(args, kwargs)
    y = _fp8_linear_fake(*linear)
    check_scale(q_scale, "munit::fp8_linear_q q_scale")
    return y, y.new_empty(y.shape, dtype=fp8_format(q_format).dtype)


@dataclass(frozen=True)
class _Epilogue:
    """What backward needs to know of the forward's epilogue (the op's non-tensor arguments)."""

    alpha: float = 1.0
    activation: str = "none"
    has_gate: bool = False
    residual_dtype: torch.dtype | None = None
    c_skip: float = 1.0
    c_branch: float = 1.0
    grad_multiplier: float = 1.0

    @property
    def needs_z(self) -> bool:
        """act′(z) or act(z) (the gate's gradient) is needed: backward recomputes z (module docstring)."""
        return self.activation != "none" or self.has_gate


def _fp8_linear_setup_context(ctx, inputs, output):
    x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, *rest = inputs
    alpha, activation, gate, residual, c_skip, c_branch, x_q, grad_multiplier, x_grad_multiplier, _ = (
        *rest, *_LINEAR_DEFAULTS[len(rest):])
    ctx.x_grad_multiplier = x_grad_multiplier
    ctx.epilogue = _Epilogue(alpha, activation, gate is not None, None if residual is None else residual.dtype,
                             c_skip, c_branch, grad_multiplier)
    # backward reads x only through its FP8 cast: with x_q given, that copy (1 byte/element) is what is saved
    ctx.save_for_backward(x if x_q is None else x_q, w, bias, gate)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.scales = (x_scale, w_scale, grad_scale)
    ctx.formats = (fwd_format, grad_format)


def _epilogue_backward(ctx, x_saved, w, bias, gate, grad_y):
    """(dz, d_gate, d_residual) from dy for y = c_skip·r + c_branch·act(z)·gate (z recomputed in fp32)."""
    ep = ctx.epilogue
    grad_residual = None if ep.residual_dtype is None else _scaled(grad_y, ep.c_skip, ep.residual_dtype)
    grad_h = grad_y if ep.c_branch == 1.0 else grad_y.to(torch.float32) * ep.c_branch
    if not ep.needs_z:
        return grad_h, None, grad_residual
    x_scale, w_scale, _ = ctx.scales
    z = kernels_for(x_saved).fp8_linear(x_saved, w, bias, x_scale, w_scale, ctx.formats[0], ep.alpha, "none",
                                        torch.float32)
    grad_h, grad_gate = grad_h.to(torch.float32), None
    if gate is not None:
        grad_gate = (grad_h * epilogue.ACTIVATIONS[ep.activation](z)).to(gate.dtype)
        grad_h = grad_h * gate.to(torch.float32)
    grad_z = grad_h if ep.activation == "none" else ACTIVATION_GRADS[ep.activation](grad_h, z)
    return grad_z, grad_gate, grad_residual


def _fp8_linear_q_setup_context(ctx, inputs, output):
    _fp8_linear_setup_context(ctx, inputs[:-2], output[0])
    ctx.mark_non_differentiable(output[1])


def _fp8_linear_q_backward(ctx, grad_y, grad_q):
    return (*_fp8_linear_backward(ctx, grad_y), None, None)


def _fp8_linear_backward(ctx, grad_y):
    x_saved, w, bias, gate = ctx.saved_tensors
    x_scale, w_scale, grad_scale = ctx.scales
    fwd_format, grad_format = ctx.formats
    x_shape, x_dtype = ctx.x_meta
    grad_z, grad_gate, grad_residual = _epilogue_backward(ctx, x_saved, w, bias, gate, grad_y)
    if ctx.epilogue.grad_multiplier != 1.0:
        grad_z = grad_z * ctx.epilogue.grad_multiplier
    g2 = grad_z.reshape(-1, grad_z.shape[-1])
    x2 = x_saved.reshape(-1, x_shape[-1])
    alpha = ctx.epilogue.alpha
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        alpha_x = alpha * ctx.x_grad_multiplier
        grad_x = _scaled(fp8_gemm(g2, w.t(), grad_scale, w_scale, grad_format, fwd_format, _acc(x_dtype, alpha_x)),
                         alpha_x, x_dtype)
        grad_x = grad_x.reshape(x_shape)
    if ctx.needs_input_grad[1]:
        grad_w = _scaled(fp8_gemm(g2.t(), x2.t(), grad_scale, x_scale, grad_format, fwd_format, _acc(w.dtype, alpha)), alpha, w.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = (g2.to(torch.float32).sum(0) * alpha).to(ctx.bias_dtype)
    return (grad_x, grad_w, grad_b, None, None, None, None, None, None, None, grad_gate, grad_residual, None, None,
            None, None, None, None)


# fp8_linear's arguments after grad_format, with their defaults: (alpha, activation, gate, residual, c_skip,
# c_branch, x_q, grad_multiplier, x_grad_multiplier, out_dtype); `passes.fuse` reads the names from the schema
_LINEAR_DEFAULTS = (1.0, "none", None, None, 1.0, 1.0, None, 1.0, 1.0, None)

# activation -> (dy, z) -> act′(z)·dy, both fp32: aten's own backward formulas, the ones autograd uses for
# the unfused aten.gelu / aten.silu / aten.relu (so fused and unfused backward differ only by z's rounding)
ACTIVATION_GRADS = {
    "relu": lambda dy, z: torch.ops.aten.threshold_backward(dy, z, 0),
    "gelu": lambda dy, z: torch.ops.aten.gelu_backward(dy, z, approximate="none"),
    "gelu_tanh": lambda dy, z: torch.ops.aten.gelu_backward(dy, z, approximate="tanh"),
    "silu": lambda dy, z: torch.ops.aten.silu_backward(dy, z),
}


def _acc(dtype: torch.dtype, alpha: float) -> torch.dtype:
    """Where α is applied after the GEMM, keep its fp32 result so the output is rounded once."""
    return dtype if alpha == 1.0 else torch.float32


def _scaled(t: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """α·t in dtype, rounded once (t itself when α = 1)."""
    return t.to(dtype) if alpha == 1.0 else (t.to(torch.float32) * alpha).to(dtype)


fp8_linear.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup_context)
fp8_linear_q.register_autograd(_fp8_linear_q_backward, setup_context=_fp8_linear_q_setup_context)


def _check_gemm_args(a, b_t, a_scale, b_scale, a_format, b_format):
    if a.dim() != 2 or b_t.dim() != 2 or a.shape[1] != b_t.shape[1]:
        raise ValueError(
            f"munit::fp8_gemm needs a[M,K] and b_t[N,K] with equal K, got {tuple(a.shape)} and {tuple(b_t.shape)}"
        )
    fp8_format(a_format), fp8_format(b_format)
    if a_format == "e5m2" and b_format == "e5m2":
        raise ValueError("munit::fp8_gemm: E5M2 x E5M2 is not allowed; one operand must be E4M3")
    check_scale(a_scale, "munit::fp8_gemm a_scale")
    check_scale(b_scale, "munit::fp8_gemm b_scale")
    for name, t, fmt in (("a", a, a_format), ("b_t", b_t, b_format)):
        if t.dtype in FP8_DTYPES and t.dtype != fp8_format(fmt).dtype:
            raise ValueError(f"munit::fp8_gemm: {name} is already FP8 ({t.dtype}) but its format is {fmt!r}")


def _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha=1.0,
                       activation="none", gate=None, residual=None, c_skip=1.0, c_branch=1.0, x_q=None,
                       grad_multiplier=1.0, x_grad_multiplier=1.0, out_dtype=None):
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"munit::fp8_linear needs x[..., K] and w[N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"munit::fp8_linear bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
    if not (x.dtype.is_floating_point and w.dtype.is_floating_point):
        raise ValueError(f"munit::fp8_linear needs float inputs, got {x.dtype} and {w.dtype}")
    fp8_format(fwd_format), fp8_format(grad_format)
    if fwd_format == "e5m2" and grad_format == "e5m2":
        raise ValueError("munit::fp8_linear: E5M2 x E5M2 backward GEMMs are not allowed; use fwd_format='e4m3'")
    check_scale(x_scale, "munit::fp8_linear x_scale")
    check_scale(w_scale, "munit::fp8_linear w_scale")
    check_scale(grad_scale, "munit::fp8_linear grad_scale")
    if not (isinstance(alpha, float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"munit::fp8_linear alpha must be a finite positive float, got {alpha!r}")
    if activation != "none" and activation not in ACTIVATION_GRADS:
        raise ValueError(f"munit::fp8_linear: unknown activation {activation!r}; use one of "
                         f"{['none', *sorted(ACTIVATION_GRADS)]}")
    out_shape = (*x.shape[:-1], w.shape[0])
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None and (tuple(t.shape) != out_shape or not t.dtype.is_floating_point):
            raise ValueError(f"munit::fp8_linear {name} must be a float tensor of the output's shape {out_shape}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if residual is None and c_skip != 1.0:
        raise ValueError(f"munit::fp8_linear: c_skip={c_skip} weights a residual add; pass residual")
    for name, c in (("c_skip", c_skip), ("c_branch", c_branch), ("grad_multiplier", grad_multiplier),
                    ("x_grad_multiplier", x_grad_multiplier)):
        if not (isinstance(c, float) and math.isfinite(c)):
            raise ValueError(f"munit::fp8_linear {name} must be a finite float, got {c!r}")
    if out_dtype is not None and out_dtype not in LINEAR_OUT_DTYPES:
        raise ValueError(f"munit::fp8_linear out_dtype must be one of {[str(d) for d in LINEAR_OUT_DTYPES]}, "
                         f"got {out_dtype}")
    if x_q is not None and (tuple(x_q.shape) != tuple(x.shape) or x_q.dtype != fp8_format(fwd_format).dtype):
        raise ValueError(f"munit::fp8_linear x_q must be x's {fwd_format} copy: shape {tuple(x.shape)}, dtype "
                         f"{fp8_format(fwd_format).dtype}; got {x_q.dtype} {tuple(x_q.shape)}")
