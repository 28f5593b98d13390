"""The norm → FP8 prologue: its exact definition in torch (the reference) and the checks on its arguments.

On each row x of x [M, D], in fp32, in this order, each step rounded to fp32:

    LayerNorm                                      RMSNorm
    mean = Σx / D                                  ms   = Σ(x·x) / D
    d    = x − mean                                rstd = 1 / √(ms + eps)
    var  = Σ(d·d) / D                              y    = x·rstd
    rstd = 1 / √(var + eps)                        y    = y·w                    (with a weight)
    y    = d·rstd
    y    = y·w,  y = y + b                         (with a weight, a bias)

    q    = sat(y·scale).to(fp8)                    `cast_fp8`: clamp to ±max(format), then round to nearest even
    qᵀ   = q transposed [D, M]                     (optional) the K-major copy the backward GEMM reads
    y.to(normalized dtype), mean, rstd             (optional y; mean and rstd [M] in fp32, for the backward)

Σ is `row_sum`: a fixed binary tree, not torch's or Triton's own reduction order. The row is padded with
+0 to the next power of two, and the second half is added onto the first until one value is left,
    ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))          (D = 8)
then + 0 (a zero sum is +0 whatever the signs of the zeros). The kernel (`codegen.triton.norm_cast`)
builds the same tree, so the two agree bit for bit on any data, not only on data whose sums are exact.
The divisions and the square root are IEEE (correctly rounded: `div_rn`, `sqrt_rn` in the kernel, / and
`sqrt_rn` here), never `rsqrt`, whose CUDA versions are approximations no CPU reference reproduces. No
step is fused into an FMA (the kernel is compiled with `enable_fp_fusion=False`). eps and scale are fp32,
as in the kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from munit_compile.ops.formats import FP8_FORMATS, cast_fp8

KINDS = ("layernorm", "rmsnorm")
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # x, weight, bias, and the normalized output
FP8_NAME: dict[torch.dtype, str] = {spec.dtype: name for name, spec in FP8_FORMATS.items()}
FP8_MAX: dict[torch.dtype, float] = {spec.dtype: spec.max for spec in FP8_FORMATS.values()}
MAX_D = 16384  # the kernel holds a whole row in registers (`codegen.triton.norm_cast.default_config`)


@dataclass(frozen=True)
class NormCastResult:
    """What `norm_cast` writes. q_fp8 [M, D]; q_fp8_t [D, M] contiguous (or None); normalized_hp [M, D]
    (or None); mean_fp32 [M] (LayerNorm; None for RMSNorm) and rstd_fp32 [M]."""

    q_fp8: torch.Tensor
    q_fp8_t: torch.Tensor | None
    normalized_hp: torch.Tensor | None
    mean_fp32: torch.Tensor | None
    rstd_fp32: torch.Tensor


def check(x: torch.Tensor, kind: str, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
          scale: float, fp8_dtype: torch.dtype, normalized_dtype: torch.dtype | None,
          where: str = "norm_cast") -> None:
    """ValueError naming the argument if a norm → FP8 cast of x is ill-formed."""
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; use one of {list(KINDS)}")
    if x.dim() != 2:
        raise ValueError(f"{where}: x must be 2-D [M, D] (normalized over D), got shape {tuple(x.shape)}")
    M, D = x.shape
    if not 1 <= D <= MAX_D:
        raise ValueError(f"{where}: x's last dim D={D} must be in [1, {MAX_D}] (one row per block)")
    accepted = [str(d) for d in INPUT_DTYPES]
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{where}: x dtype must be one of {accepted}, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (D,):
            raise ValueError(f"{where}: {name} must have shape ({D},), got {tuple(t.shape)}")
        if t.dtype not in INPUT_DTYPES:
            raise ValueError(f"{where}: {name} dtype must be one of {accepted}, got {t.dtype}")
    if bias is not None and kind == "rmsnorm":
        raise ValueError(f"{where}: rmsnorm takes no bias")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{where}: eps must be a finite number ≥ 0, got {eps!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{where}: scale must be a finite positive number, got {scale!r}")
    if fp8_dtype not in FP8_NAME:
        raise ValueError(f"{where}: fp8_dtype must be one of {[str(d) for d in FP8_NAME]}, got {fp8_dtype}")
    if normalized_dtype is not None and normalized_dtype not in INPUT_DTYPES:
        raise ValueError(f"{where}: normalized_dtype must be one of {accepted}, got {normalized_dtype}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{where} needs all tensors on one device, got {sorted(map(str, devices))}")


def row_sum(v: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim as the kernel sums: pad with +0 to a power of two, add the second half onto the
    first until one value is left (a balanced binary tree; every addition one fp32 rounding), then + 0."""
    width = 1 << max(v.shape[-1] - 1, 0).bit_length()
    v = F.pad(v, (0, width - v.shape[-1]))
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0] + 0.0


def sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """√v of fp32 v, correctly rounded (IEEE, what `sqrt_rn` computes in the kernel).

    Not `torch.sqrt`: on CPU it is not correctly rounded (torch 2.13's AVX-512 kernels are 1 ulp off for
    ~17% of fp32 and ~1% of fp64 inputs). Its fp64 root, rounded to fp32, is within one ulp; the candidate
    is then moved to the neighbour the exact comparison against the midpoints selects. Midpoints of fp32
    values have 25 significant bits, so their squares are exact in fp64, and √v is never a midpoint."""
    r = torch.sqrt(v.to(torch.float64)).to(torch.float32)
    v = v.to(torch.float64)
    for toward, beyond in ((math.inf, torch.gt), (0.0, torch.lt)):
        neighbour = torch.nextafter(r, torch.full_like(r, toward))
        mid = (r.to(torch.float64) + neighbour.to(torch.float64)) / 2
        r = torch.where(beyond(v, mid * mid), neighbour, r)
    return r


def normalize(x: torch.Tensor, kind: str, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(y, mean, rstd) in fp32 (module docstring; mean is None for RMSNorm)."""
    x = x.to(torch.float32)
    D = x.shape[-1]
    mean = None
    if kind == "layernorm":
        mean = row_sum(x) / D
        x = x - mean[:, None]
    rstd = torch.ones_like(x[:, 0]) / sqrt_rn(row_sum(x * x) / D + eps)
    y = x * rstd[:, None]
    if weight is not None:
        y = y * weight.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y, mean, rstd


def norm_cast(x: torch.Tensor, kind: str, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float = 1e-5, scale: float = 1.0, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
              transposed_copy: bool = False, keep_normalized: bool = False,
              normalized_dtype: torch.dtype | None = None) -> NormCastResult:
    """The norm → FP8 prologue on x [M, D] (module docstring), what the Triton kernel computes bit for bit.

    kind "layernorm" or "rmsnorm"; weight [D] and (LayerNorm) bias [D]; q = sat(y·scale) in fp8_dtype;
    with transposed_copy also qᵀ [D, M]; with keep_normalized also y in normalized_dtype (default x.dtype).
    """
    check(x, kind, weight, bias, eps, scale, fp8_dtype, normalized_dtype, where="reference.norm_cast")
    y, mean, rstd = normalize(x, kind, weight, bias, eps)
    q = cast_fp8(y, FP8_NAME[fp8_dtype], scale)
    return NormCastResult(q_fp8=q, q_fp8_t=q.t().contiguous() if transposed_copy else None,
                          normalized_hp=y.to(normalized_dtype or x.dtype) if keep_normalized else None,
                          mean_fp32=mean, rstd_fp32=rstd)
