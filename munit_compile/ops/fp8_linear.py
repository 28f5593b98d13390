"""`munit::fp8_linear` and `munit::fp8_gemm`: static-scaled FP8 GEMMs as torch custom ops.

Forward  z  = α·(q₄(x·s_x) @ q₄(W·s_w)ᵀ / (s_x·s_w) + b)         (E4M3 operands, fp32)
         y  = act(z), rounded once to x.dtype                      (act: `epilogue.ACTIVATIONS`, default "none")
Backward dz = act′(z)·dy                                           (fp32; dz = dy for "none")
         dx = α·q₅(dz·s_g) @ q₄(W·s_w)    / (s_g·s_w)             (E5M2 grad, E4M3 weight)
         dW = α·q₅(dz·s_g)ᵀ @ q₄(x·s_x)   / (s_g·s_x),  db = α·Σ_rows dz
α is a static output multiplier (μS: 1/√fan_in), so dz, the gradient of the GEMM's output, is what is cast.
All scales are static powers of two fixed at compile time; accumulation is fp32.
The kernels come from `codegen.select.kernels_for`: Triton on CUDA, the exact reference elsewhere.

The activation (`passes.fuse` folds `act(fp8_linear(...))` into it) is applied to the fp32 pre-activation
in the GEMM's epilogue, so the output is rounded once instead of twice (z to x.dtype, then act(z)).
Backward needs act′(z). The op RECOMPUTES z in backward (one more forward FP8 GEMM, from the x and W it
saves anyway) rather than returning z as a second output to be saved:
- memory: it saves x, W and the bias (N elements), nothing M×N. The unfused pair also saves z (the
  activation's input, M×N in x.dtype): fused saves M·N elements less per fused GEMM (a 4× MLP's up
  projection: 4·d_model per token per layer). Measured with saved-tensor hooks under aot_eager, tiny GPT
  (d 64, 2 layers, 4×64 tokens, fp32): 2.53 MB saved fused vs 3.05 MB unfused, the 2 × 256·256·4 B of z
  less 2 × 1 KB of bias. (Inductor's min-cut partitioner may instead save z and recompute y = act(z) for
  the next GEMM; then both save one M×N tensor and fusion removes the activation kernel and a rounding.)
- exactness: act′ is evaluated at the exact fp32 z the forward used, not at a copy rounded to x.dtype,
  and the op keeps one output, so every existing call, fake and graph stays valid.
- cost: the forward GEMM runs again in backward (4 GEMMs instead of 3 for that layer), in FP8.
"""
from __future__ import annotations

import math

import torch

from munit_compile.codegen import reference
from munit_compile.codegen.select import kernels_for
from munit_compile.ops.formats import check_scale, fp8_format


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
    """[M,K] x [N,K] -> [M,N]: (q(a·s_a) @ q(b_t·s_b)ᵀ)/(s_a·s_b) in out_dtype (no autograd: a backward GEMM)."""
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
) -> torch.Tensor:
    """y[..., N] = act(α·(x[..., K] @ w[N, K]ᵀ + bias)) with static-scaled FP8 operands; output in x.dtype."""
    _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha, activation)
    return kernels_for(x).fp8_linear(x, w, bias, x_scale, w_scale, fwd_format, alpha, activation)


@fp8_linear.register_fake
def _fp8_linear_fake(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha=1.0, activation="none"):
    _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha, activation)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _fp8_linear_setup_context(ctx, inputs, output):
    x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, *rest = inputs
    ctx.alpha = rest[0] if rest else 1.0
    ctx.activation = rest[1] if len(rest) > 1 else "none"
    # with an activation, backward recomputes z = α·(x Wᵀ + b): it needs the bias as well
    ctx.save_for_backward(*((x, w, bias) if ctx.activation != "none" else (x, w)))
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.scales = (x_scale, w_scale, grad_scale)
    ctx.formats = (fwd_format, grad_format)


def _fp8_linear_backward(ctx, grad_y):
    x, w, *bias = ctx.saved_tensors
    x_scale, w_scale, grad_scale = ctx.scales
    fwd_format, grad_format = ctx.formats
    if ctx.activation != "none":  # dz = act′(z)·dy at the fp32 pre-activation z, recomputed (module docstring)
        z = kernels_for(x).fp8_linear(x, w, bias[0], x_scale, w_scale, fwd_format, ctx.alpha, "none", torch.float32)
        grad_y = ACTIVATION_GRADS[ctx.activation](grad_y.to(torch.float32), z)
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    alpha = ctx.alpha
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _scaled(fp8_gemm(g2, w.t(), grad_scale, w_scale, grad_format, fwd_format, _acc(x.dtype, alpha)), alpha, x.dtype)
        grad_x = grad_x.reshape(x.shape)
    if ctx.needs_input_grad[1]:
        grad_w = _scaled(fp8_gemm(g2.t(), x2.t(), grad_scale, x_scale, grad_format, fwd_format, _acc(w.dtype, alpha)), alpha, w.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = (g2.to(torch.float32).sum(0) * alpha).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


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
    return t if alpha == 1.0 else (t * alpha).to(dtype)


fp8_linear.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup_context)


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


def _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha=1.0,
                       activation="none"):
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
