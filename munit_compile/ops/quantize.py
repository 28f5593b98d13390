"""`munit::quantize`: the static FP8 cast of a GEMM input, as a graph node of its own.

    x_q = sat(x·s).to(fmt)          (`formats.cast_fp8`; no gradient: the GEMM takes x's gradient through x)
`passes.fuse` inserts one per distinct (x, s, fmt) that FP8 GEMMs read and hands the copy to them
(`fp8_linear(..., x_q=x_q)`), so q, k and v share one cast and backward saves the 1-byte copy instead of x.
It is CompositeImplicitAutograd on purpose: AOTAutograd decomposes it into mul/clamp/convert, which
Inductor fuses into the kernel that produces x (a norm, an activation, a residual add): the norm → FP8
prologue without a hand-written kernel in the graph.
"""
from __future__ import annotations

import torch

from munit_compile.ops.formats import cast_fp8, check_scale, fp8_format

_LIB = torch.library.Library("munit", "FRAGMENT")
_LIB.define("quantize(Tensor x, float scale, str fmt) -> Tensor")


def quantize(x: torch.Tensor, scale: float, fmt: str) -> torch.Tensor:
    """sat(x·scale) in FP8 `fmt`, detached (scale: a power of two); ValueError on a bad scale or format."""
    fp8_format(fmt)
    check_scale(scale, "munit::quantize scale")
    return cast_fp8(x.detach(), fmt, scale)


_LIB.impl("quantize", quantize, "CompositeImplicitAutograd")
QUANTIZE = torch.ops.munit.quantize.default
