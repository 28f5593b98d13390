"""Saturating FP8 cast of a 2-D tensor that also writes its transpose (for the backward GEMMs).

    q = sat(x·s),  qᵀ     with sat = clamp to ±max(format), round to nearest even (cvt.rn.satfinite)
Hopper's FP8 wgmma reads both operands K-major ("TN"): dW = dYᵀ·X needs dY and X with rows along K,
so the producer writes the transposed copy in the same pass instead of a separate transpose kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from munit_compile.ops.formats import fp8_format

TL_FP8 = {"e4m3": tl.float8e4nv, "e5m2": tl.float8e5}
DEFAULT_BLOCKS = (64, 64)


@triton.jit
def cast_transpose_kernel(x_ptr, q_ptr, qt_ptr, M, N, stride_xm, stride_xn, scale, fmax,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile: q[m, n] = qt[n, m] = sat(x[m, n]·scale)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn, mask=mask, other=0.0)
    q = tl.clamp(x.to(tl.float32) * scale, -fmax, fmax).to(FP8)
    tl.store(q_ptr + rm[:, None] * N + rn[None, :], q, mask=mask)
    tl.store(qt_ptr + rn[:, None] * M + rm[None, :], tl.trans(q), mask=tl.trans(mask))


def cast_transpose(x: torch.Tensor, scale: float, fmt: str, blocks: tuple[int, int] = DEFAULT_BLOCKS):
    """(q [M, N], qt [N, M]) in FP8 format `fmt`, from a 2-D tensor x (any strides) and a static scale."""
    if x.dim() != 2:
        raise ValueError(f"cast_transpose needs a 2-D tensor, got shape {tuple(x.shape)}")
    spec = fp8_format(fmt)
    M, N = x.shape
    q = torch.empty((M, N), dtype=spec.dtype, device=x.device)
    qt = torch.empty((N, M), dtype=spec.dtype, device=x.device)
    grid = (triton.cdiv(M, blocks[0]), triton.cdiv(N, blocks[1]))
    cast_transpose_kernel[grid](x, q, qt, M, N, x.stride(0), x.stride(1), float(scale), spec.max,
                                BLOCK_M=blocks[0], BLOCK_N=blocks[1], FP8=TL_FP8[fmt])
    return q, qt
