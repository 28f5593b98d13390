"""`munit::fp8_linear` and `munit::fp8_gemm`: static-scaled FP8 GEMMs as torch custom ops.

Forward  y  = α·(q₄(x·s_x) @ q₄(W·s_w)ᵀ / (s_x·s_w) + b)         (E4M3 operands)
Backward dx = α·q₅(dy·s_g) @ q₄(W·s_w)    / (s_g·s_w)             (E5M2 grad, E4M3 weight)
         dW = α·q₅(dy·s_g)ᵀ @ q₄(x·s_x)   / (s_g·s_x),  db = α·Σ_rows dy
α is a static output multiplier (μS: 1/√fan_in), so dy, the gradient the op receives, is what is cast.
All scales are static powers of two fixed at compile time; accumulation is fp32.
The kernels come from `munit_compile.codegen` (the exact reference on every device for now).
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
) -> torch.Tensor:
    """y[..., N] = α·(x[..., K] @ w[N, K]ᵀ + bias) with static-scaled FP8 operands; output in x.dtype."""
    _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha)
    return kernels_for(x).fp8_linear(x, w, bias, x_scale, w_scale, fwd_format, alpha)


@fp8_linear.register_fake
def _fp8_linear_fake(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha=1.0):
    _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _fp8_linear_setup_context(ctx, inputs, output):
    x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, *rest = inputs
    ctx.alpha = rest[0] if rest else 1.0
    ctx.save_for_backward(x, w)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.scales = (x_scale, w_scale, grad_scale)
    ctx.formats = (fwd_format, grad_format)


def _fp8_linear_backward(ctx, grad_y):
    x, w = ctx.saved_tensors
    x_scale, w_scale, grad_scale = ctx.scales
    fwd_format, grad_format = ctx.formats
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
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


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


def _check_linear_args(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha=1.0):
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
