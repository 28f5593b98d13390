"""Exact reference implementations of munit's fused ops (any device; the CPU path).

Each function states the math it computes; the Triton kernels must agree with these bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch

from munit_compile.codegen import epilogue
from munit_compile.ops.formats import cast_fp8, fp8_format


def fp8_gemm(
    a: torch.Tensor,
    b_t: torch.Tensor,
    a_scale: float,
    b_scale: float,
    a_format: str,
    b_format: str,
    out_dtype: torch.dtype,
    *,
    cast: Callable | None = None,
    gemm: Callable | None = None,
) -> torch.Tensor:
    """out[M,N] = (q(a·s_a) @ q(b_t·s_b)ᵀ) / (s_a·s_b), fp32 accumulation, rounded once to out_dtype.

    a is [M,K], b_t is [N,K] ("TN": both K-major, as Hopper FP8 wgmma wants), q() the saturating FP8 cast.
    cast(t, fmt, s) and gemm default to `quantized` and `scaled_mm`; the Triton path passes its kernels.
    """
    cast, gemm = cast or quantized, gemm or scaled_mm
    return gemm(cast(a, a_format, a_scale), cast(b_t, b_format, b_scale), 1.0 / (a_scale * b_scale),
                out_dtype=out_dtype)


def quantized(t: torch.Tensor, fmt: str, scale: float) -> torch.Tensor:
    """q(t·s) in FP8 `fmt`; a tensor already in that FP8 dtype is taken as that cast (a saved FP8 copy)."""
    return t if t.dtype == fp8_format(fmt).dtype else cast_fp8(t, fmt, scale)


def rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """[..., N] as [M, N] (None stays None)."""
    return None if t is None else t.reshape(-1, t.shape[-1])


def linear_out_dtype(x: torch.Tensor, residual: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> torch.dtype:
    """fp8_linear's output dtype: out_dtype (default x's), promoted with the residual's when the residual
    add is fused."""
    base = x.dtype if out_dtype is None else out_dtype
    return base if residual is None else torch.promote_types(base, residual.dtype)


def scaled_mm(a_q: torch.Tensor, b_t_q: torch.Tensor, inv_scale: float, bias: torch.Tensor | None = None,
              alpha: float = 1.0, out_dtype: torch.dtype = torch.float32, *, activation: str = "none",
              gate: torch.Tensor | None = None, residual: torch.Tensor | None = None, c_skip: float = 1.0,
              c_branch: float = 1.0, out_scale: float = 1.0, transposed_copy: bool = False,
              q_dtype: torch.dtype | None = None, q_scale: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The FP8 GEMM with its epilogue, on FP8 operands a_q[M,K], b_t_q[N,K] ("TN"), in the Triton kernel's order:

        y = act((acc·inv_scale + bias)·α)·gate,  y = c_skip·residual + c_branch·y,  acc = a_q @ b_t_qᵀ
    all in fp32, rounded once to out_dtype (FP8: sat(y·out_scale)); see `codegen.epilogue`. With
    transposed_copy (FP8 outputs) it returns (out [M,N], outᵀ [N,M] contiguous); with q_dtype also, last,
    q = sat(y·q_scale) in that FP8 dtype, from the same fp32 y (the next GEMM's operand)."""
    epilogue.check(a_q.shape[0], b_t_q.shape[0], activation=activation, gate=gate, residual=residual, c_skip=c_skip,
                   c_branch=c_branch, out_dtype=out_dtype, out_scale=out_scale, transposed_copy=transposed_copy,
                   q_dtype=q_dtype, q_scale=q_scale, where="reference.scaled_mm")
    acc = a_q.to(torch.float32) @ b_t_q.to(torch.float32).t()
    y = epilogue.apply(acc, inv_scale, bias, alpha, activation=activation, gate=gate, residual=residual,
                       c_skip=c_skip, c_branch=c_branch)
    out = epilogue.round_out(y, out_dtype, out_scale)
    outputs = (out, *((out.t().contiguous(),) if transposed_copy else ()),
               *((epilogue.round_out(y, q_dtype, q_scale),) if q_dtype is not None else ()))
    return outputs if len(outputs) > 1 else out


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: float,
    w_scale: float,
    fwd_format: str,
    alpha: float = 1.0,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    *,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    c_skip: float = 1.0,
    c_branch: float = 1.0,
    x_q: torch.Tensor | None = None,
    q_dtype: torch.dtype | None = None,
    q_scale: float = 1.0,
    cast: Callable | None = None,
    gemm: Callable | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = c_skip·r + c_branch·act(α·(q(x·s_x) @ q(w·s_w)ᵀ / (s_x·s_w) + bias))·gate: fp32 accumulate, every
    epilogue step in fp32 (`epilogue.apply`), rounded once to out_dtype (default `linear_out_dtype`).
    x_q, if given, is q(x·s_x) already cast (FP8): the GEMM reads it instead of casting x. With q_dtype it
    returns (y, sat(y·q_scale) in q_dtype from the same fp32 y). cast(t, fmt, s) and gemm (`scaled_mm`'s
    signature) default to this module's; the Triton path passes its kernels (`codegen.triton.linear`)."""
    cast, gemm = cast or quantized, gemm or scaled_mm
    x2 = (x_q if x_q is not None else x).reshape(-1, x.shape[-1])
    out = gemm(cast(x2, fwd_format, x_scale), cast(w, fwd_format, w_scale), 1.0 / (x_scale * w_scale),
               bias, alpha, out_dtype=linear_out_dtype(x, residual) if out_dtype is None else out_dtype,
               activation=activation, gate=rows(gate), residual=rows(residual),
               c_skip=c_skip, c_branch=c_branch, q_dtype=q_dtype, q_scale=q_scale)
    shape = (*x.shape[:-1], w.shape[0])
    return tuple(t.reshape(shape) for t in out) if q_dtype is not None else out.reshape(shape)


def cast_transpose(x: torch.Tensor, scale: float, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, qᵀ) with q = sat(x·s) in FP8 `fmt`, qᵀ contiguous (the K-major copy backward GEMMs read)."""
    q = cast_fp8(x, fmt, scale)
    return q, q.t().contiguous()
