"""The munit custom ops' math on Triton kernels (the same signatures as `codegen.reference`).

`reference.fp8_gemm` / `fp8_linear` with their cast and GEMM swapped for the kernels: operands are cast
by `cast_transpose` (its K-major copy is unused: backward reads the saved row-major FP8 copy of x
transposed), then multiplied by `fp8_gemm.scaled_mm`; an operand already in FP8 is not cast again.
"""
from __future__ import annotations

import torch

from munit_compile.codegen import reference
from munit_compile.codegen.triton import fp8_gemm as gemm
from munit_compile.codegen.triton.cast_transpose import cast_transpose
from munit_compile.ops.formats import fp8_format


def _cast(t: torch.Tensor, fmt: str, scale: float) -> torch.Tensor:
    """q(t·s) through the cast kernel; a tensor already in the format's FP8 dtype is that cast already."""
    if t.dtype == fp8_format(fmt).dtype:
        return t
    q, _ = cast_transpose(t, scale, fmt)
    return q


def fp8_gemm(*args, **kwargs):
    """`reference.fp8_gemm` on the cast kernel and `fp8_gemm.scaled_mm`."""
    return reference.fp8_gemm(*args, **kwargs, cast=_cast, gemm=gemm.scaled_mm)


def fp8_linear(*args, **kwargs):
    """`reference.fp8_linear` on the cast kernel and `fp8_gemm.scaled_mm`."""
    return reference.fp8_linear(*args, **kwargs, cast=_cast, gemm=gemm.scaled_mm)
