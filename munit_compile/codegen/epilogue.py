"""The FP8 GEMM's fused epilogue: its definition in torch (the reference) and the checks on its arguments.

On the fp32 accumulator acc = a_q @ b_qᵀ, in this order, each step rounded to fp32:

    y = (acc·inv_scale + bias)·α                 the operand scales undone, bias, the μS multiplier
    y = act(y)                                   `ACTIVATIONS`
    y = y·gate                                   optional gate tensor [M, N] (SwiGLU: silu(x)·g)
    y = c_skip·residual + c_branch·y             optional residual [M, N] (fixed-τ residual); without one,
                                                 y = c_branch·y (a constant output multiplier, 1 = exact)
    out = y.to(out_dtype)                        BF16 / FP16 / FP32, rounded once
    out = sat(y·out_scale).to(fp8)               FP8: clamp to ±max(format) first (what cvt.rn.satfinite does)
    q = sat(y·q_scale).to(fp8)                   optional second output: the next GEMM's FP8 operand

Every activation is written here as the exact sequence of fp32 operations the Triton kernel performs
(`codegen.triton.fp8_gemm.ACTIVATIONS` holds the kernel's helper under the same name), so the two agree
bit for bit wherever the transcendental functions agree: torch's `exp`/`erf`/`tanh` on CUDA are the CUDA
math library's `expf`/`erff`/`tanhf`, which the kernel calls through libdevice. Divisions are IEEE (the
kernel uses `div_rn`, not Triton's approximate `/`), and the kernel is compiled without FMA contraction.
Scalars (α, coefficients, constants) are fp32, as in the kernel.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from munit_compile.ops.formats import FP8_FORMATS, cast_fp8

SQRT1_2 = math.sqrt(0.5)                 # GELU (erf): x/√2 = x·SQRT1_2
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # GELU (tanh): √(2/π)
GELU_TANH_KAPPA = 0.044715               # GELU (tanh): x + κx³


def identity(x: torch.Tensor) -> torch.Tensor:
    """none: x."""
    return x


def relu(x: torch.Tensor) -> torch.Tensor:
    """relu: 0 where x < 0, else x (NaN and −0 pass through)."""
    return torch.where(x < 0, 0.0, x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """gelu (erf form): (x·0.5)·(1 + erf(x·(1/√2)))."""
    return x * 0.5 * (1.0 + torch.erf(x * SQRT1_2))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh: (x·0.5)·(1 + tanh(√(2/π)·(x + κ·((x·x)·x)))), κ = 0.044715."""
    inner = SQRT_2_OVER_PI * (x + GELU_TANH_KAPPA * (x * x * x))
    return x * 0.5 * (1.0 + torch.tanh(inner))


def silu(x: torch.Tensor) -> torch.Tensor:
    """silu: x·sigmoid(x) computed as x / (1 + exp(−x)) (one division, IEEE-rounded)."""
    return x / (1.0 + torch.exp(-x))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": identity,
    "relu": relu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": silu,
}
FP8_MAX: dict[torch.dtype, float] = {spec.dtype: spec.max for spec in FP8_FORMATS.values()}
FP8_NAME: dict[torch.dtype, str] = {spec.dtype: name for name, spec in FP8_FORMATS.items()}
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, *FP8_MAX)  # what the Triton kernel stores
SIDE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # gate and residual inputs


def _check_side_input(name: str, t: torch.Tensor | None, shape: tuple[int, ...], where: str) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype not in SIDE_DTYPES:
        raise ValueError(f"{where}: {name} dtype must be one of {[str(d) for d in SIDE_DTYPES]}, got {t.dtype}")


def check(M: int, N: int, *, activation: str, gate: torch.Tensor | None, residual: torch.Tensor | None,
          c_skip: float, c_branch: float, out_dtype: torch.dtype, out_scale: float, transposed_copy: bool,
          q_dtype: torch.dtype | None = None, q_scale: float = 1.0, where: str = "scaled_mm") -> None:
    """ValueError naming the argument if the epilogue options of an [M, N] GEMM are ill-formed."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
    _check_side_input("gate", gate, (M, N), where)
    _check_side_input("residual", residual, (M, N), where)
    for name, c in (("c_skip", c_skip), ("c_branch", c_branch)):
        if not (isinstance(c, (int, float)) and math.isfinite(c)):
            raise ValueError(f"{where}: {name} must be a finite number, got {c!r}")
    if residual is None and c_skip != 1.0:
        raise ValueError(f"{where}: c_skip={c_skip} weights a residual tensor; pass residual")
    if not (isinstance(out_scale, (int, float)) and math.isfinite(out_scale) and out_scale > 0):
        raise ValueError(f"{where}: out_scale must be a finite positive number, got {out_scale!r}")
    if out_dtype not in FP8_MAX and out_scale != 1.0:
        raise ValueError(f"{where}: out_scale={out_scale} applies to FP8 outputs only, out_dtype is {out_dtype}")
    if q_dtype is not None and q_dtype not in FP8_MAX:
        raise ValueError(f"{where}: q_dtype is the next GEMM's FP8 operand: one of {[str(d) for d in FP8_MAX]}, "
                         f"got {q_dtype}")
    if not (isinstance(q_scale, (int, float)) and math.isfinite(q_scale) and q_scale > 0):
        raise ValueError(f"{where}: q_scale must be a finite positive number, got {q_scale!r}")
    if out_dtype not in FP8_MAX and transposed_copy:
        raise ValueError(f"{where}: transposed_copy writes the FP8 copy for the backward; out_dtype is {out_dtype}")


def apply(acc: torch.Tensor, inv_scale: float, bias: torch.Tensor | None = None, alpha: float = 1.0, *,
          activation: str = "none", gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
          c_skip: float = 1.0, c_branch: float = 1.0) -> torch.Tensor:
    """The fp32 part of the epilogue on the fp32 accumulator (module docstring, steps 1-4)."""
    y = acc * inv_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = ACTIVATIONS[activation](y * alpha)
    if gate is not None:
        y = y * gate.to(torch.float32)
    if residual is not None:
        y = c_skip * residual.to(torch.float32) + c_branch * y
    else:
        y = c_branch * y
    return y


def round_out(y: torch.Tensor, out_dtype: torch.dtype, out_scale: float = 1.0) -> torch.Tensor:
    """y (fp32) to out_dtype, once: FP8 as `cast_fp8` = sat(y·out_scale), clamped to ±max before the cast."""
    return cast_fp8(y, FP8_NAME[out_dtype], out_scale) if out_dtype in FP8_NAME else y.to(out_dtype)
