"""The munit custom ops' math on Triton kernels (the same signatures as `codegen.reference`).

Operands are cast by `cast_transpose` (its K-major copy is unused until the fusion pass hands the
backward the copies the forward wrote), then multiplied by `fp8_gemm.scaled_mm`.
"""
from __future__ import annotations

import torch

from munit_compile.codegen.triton import fp8_gemm as gemm
from munit_compile.codegen.reference import linear_out_dtype, rows
from munit_compile.codegen.triton.cast_transpose import cast_transpose
from munit_compile.ops.formats import fp8_format


def _cast(t: torch.Tensor, scale: float, fmt: str) -> torch.Tensor:
    """q(t·s) through the cast kernel; a tensor already in the format's FP8 dtype is that cast already."""
    if t.dtype == fp8_format(fmt).dtype:
        return t
    q, _ = cast_transpose(t, scale, fmt)
    return q


def fp8_gemm(a, b_t, a_scale, b_scale, a_format, b_format, out_dtype):
    """As `reference.fp8_gemm`."""
    return gemm.scaled_mm(_cast(a, a_scale, a_format), _cast(b_t, b_scale, b_format),
                          1.0 / (a_scale * b_scale), out_dtype=out_dtype)


def fp8_linear(x, w, bias, x_scale, w_scale, fwd_format, alpha=1.0, activation="none", out_dtype=None, *,
               gate=None, residual=None, c_skip=1.0, c_branch=1.0, x_q=None, q_dtype=None, q_scale=1.0):
    """As `reference.fp8_linear`."""
    x2 = (x_q if x_q is not None else x).reshape(-1, x.shape[-1])
    out = gemm.scaled_mm(_cast(x2, x_scale, fwd_format), _cast(w, w_scale, fwd_format), 1.0 / (x_scale * w_scale),
                         bias, alpha, out_dtype=linear_out_dtype(x, residual) if out_dtype is None else out_dtype,
                         activation=activation, gate=rows(gate), residual=rows(residual), c_skip=c_skip,
                         c_branch=c_branch, q_dtype=q_dtype, q_scale=q_scale)
    shape = (*x.shape[:-1], w.shape[0])
    return tuple(t.reshape(shape) for t in out) if q_dtype is not None else out.reshape(shape)
