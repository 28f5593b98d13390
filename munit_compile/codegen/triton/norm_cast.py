"""Norm → FP8 prologue: LayerNorm/RMSNorm, static scale and saturating FP8 cast in one pass
(reference: `codegen.norm_reference`, which states the math and its order).

    y = norm(x)·w + b                    per row of x [M, D], fp32, the whole row in registers
    q = sat(y·scale).to(fp8)             [M, D], and optionally qᵀ [D, M] from the same registers
    y.to(bf16/fp16/fp32), mean, rstd     optional y (autograd may need it); mean, rstd [M] fp32 for the backward
The FP8 tensor feeds the next GEMM directly: with a static scale there is no amax pass, so the cast
lives in the kernel that produces the tensor. qᵀ is the K-major operand of the backward's dW GEMM.

Exactness: row sums are a fixed binary tree (`pairwise_row_sum`: the row's halves added level by level,
each level a `tl.sum` over an axis of two), the order `norm_reference.row_sum` reproduces in torch;
divisions and the square root are IEEE (`div_rn`, `sqrt_rn`), never the approximate `/`, `sqrt` or
`rsqrt`; the kernel is launched without FMA contraction (`enable_fp_fusion=False`).

Limit: one program holds BLOCK_M whole rows (BLOCK_D = D rounded up to a power of two), so D ≤
`norm_reference.MAX_D` = 16384; `default_config` trades rows per program against registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from munit_compile.codegen import norm_reference
from munit_compile.codegen.norm_reference import NormCastResult

COMPILE_OPTIONS = dict(enable_fp_fusion=False)  # a·b + c stays two roundings, as in the reference
TILE_ELEMENTS = 8192  # fp32 values per program: BLOCK_M·BLOCK_D (32 per thread at 8 warps, no spills)
MAX_BLOCK_M = 16


def default_config(M: int, D: int) -> dict:
    """BLOCK_D = next power of two ≥ D; BLOCK_M rows to fill TILE_ELEMENTS (≤ 16, ≤ M rounded up);
    warps so that each thread holds ≤ 32 fp32 values of the tile (4 to 16 warps)."""
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(MAX_BLOCK_M, TILE_ELEMENTS // block_d, triton.next_power_of_2(max(M, 1))))
    num_warps = min(16, max(4, block_m * block_d // (32 * 32)))
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)


@triton.jit
def pairwise_row_sum(v, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Σ over axis 1 of v [BLOCK_M, BLOCK_D] (a power of two) in a fixed tree, as `norm_reference.row_sum`:
    each level adds the second half of the row onto the first, v[i] + v[i + h], a sum of two values
    whichever way the lowering pairs them (a register add, a shuffle, or through shared memory), down to
    one value per row; then + 0, so a zero sum is +0 on every backend. Returns [BLOCK_M]."""
    for level in tl.static_range(BLOCK_D.bit_length() - 1):
        v = tl.sum(tl.reshape(v, (BLOCK_M, 2, BLOCK_D >> (level + 1))), axis=1)
    return tl.reshape(v, (BLOCK_M, )) + 0.0


@triton.jit
def norm_cast_kernel(x_ptr, w_ptr, b_ptr, q_ptr, qt_ptr, y_ptr, mean_ptr, rstd_ptr,
                     M, D,
                     stride_xm, stride_xd,
                     eps, scale,
                     LAYERNORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     TRANSPOSED_COPY: tl.constexpr, KEEP_NORMALIZED: tl.constexpr, FP8_MAX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_M whole rows: q[m, :] = qt[:, m] = sat(norm(x[m, :])·scale), optionally y[m, :]; mean[m], rstd[m].
    Out-of-range columns load as +0 (and d = 0 there), which the tree sum adds exactly."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    row_ok = rm < M
    col_ok = rd < D
    mask = row_ok[:, None] & col_ok[None, :]
    rows, cols = rm.to(tl.int64), rd.to(tl.int64)  # M·D may pass 2^31
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    n = tl.cast(D, tl.float32)
    if LAYERNORM:
        mean = tl.math.div_rn(pairwise_row_sum(x, BLOCK_M, BLOCK_D), n)
        x = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(mean_ptr + rm, mean, mask=row_ok)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(pairwise_row_sum(x * x, BLOCK_M, BLOCK_D), n) + eps))
    tl.store(rstd_ptr + rm, rstd, mask=row_ok)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + rd, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rd, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if KEEP_NORMALIZED:
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    q = tl.clamp(y * scale, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None] * D + cols[None, :], q, mask=mask)
    if TRANSPOSED_COPY:
        tl.store(qt_ptr + cols[:, None] * M + rows[None, :], tl.trans(q), mask=tl.trans(mask))


def norm_cast(x: torch.Tensor, kind: str, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float = 1e-5, scale: float = 1.0, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
              transposed_copy: bool = False, keep_normalized: bool = False,
              normalized_dtype: torch.dtype | None = None, config: dict | None = None) -> NormCastResult:
    """Launch `norm_cast_kernel` on x [M, D] (BF16/FP16/FP32, any strides).

    kind "layernorm" or "rmsnorm"; weight [D] and (LayerNorm only) bias [D], BF16/FP16/FP32; q_fp8 =
    sat(norm(x)·scale) in fp8_dtype (float8_e4m3fn or float8_e5m2); with transposed_copy also q_fp8_t
    [D, M]; with keep_normalized also normalized_hp, y in normalized_dtype (default x.dtype); mean_fp32
    (LayerNorm) and rstd_fp32 [M] always. config overrides `default_config` (BLOCK_M, BLOCK_D, num_warps).
    Math and order: `norm_reference.norm_cast`. ValueError on bad arguments.
    """
    norm_reference.check(x, kind, weight, bias, eps, scale, fp8_dtype, normalized_dtype)
    M, D = x.shape
    cfg = {**default_config(M, D), **(config or {})}
    if cfg["BLOCK_D"] < D or cfg["BLOCK_D"] & (cfg["BLOCK_D"] - 1):
        raise ValueError(f"norm_cast: config BLOCK_D must be a power of two ≥ D={D}, got {cfg['BLOCK_D']}")
    if cfg["BLOCK_M"] < 1 or cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1):
        raise ValueError(f"norm_cast: config BLOCK_M must be a power of two, got {cfg['BLOCK_M']}")
    device = x.device
    q = torch.empty((M, D), dtype=fp8_dtype, device=device)
    qt = torch.empty((D, M), dtype=fp8_dtype, device=device) if transposed_copy else None
    y = torch.empty((M, D), dtype=normalized_dtype or x.dtype, device=device) if keep_normalized else None
    mean = torch.empty((M,), dtype=torch.float32, device=device) if kind == "layernorm" else None
    rstd = torch.empty((M,), dtype=torch.float32, device=device)
    if M > 0:
        unused = q  # pointer for the outputs and inputs a constexpr flag switches off
        norm_cast_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            x, weight if weight is not None else unused, bias if bias is not None else unused,
            q, qt if qt is not None else unused, y if y is not None else unused,
            mean if mean is not None else rstd, rstd,
            M, D,
            x.stride(0), x.stride(1),
            float(eps), float(scale),
            LAYERNORM=kind == "layernorm", HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            TRANSPOSED_COPY=transposed_copy, KEEP_NORMALIZED=keep_normalized,
            FP8_MAX=norm_reference.FP8_MAX[fp8_dtype],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], **COMPILE_OPTIONS)
    return NormCastResult(q_fp8=q, q_fp8_t=qt, normalized_hp=y, mean_fp32=mean, rstd_fp32=rstd)
