"""FP8 formats and the one saturating cast every munit path uses.

`cast_fp8(t, fmt, scale) = clamp(t·scale, ±max(fmt)).to(fmt)`: clamping first makes overflow
saturate identically on every torch version (2.13 saturates E4M3 on CPU, 2.11 gives NaN, E5M2 gives inf).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FP8Format:
    """One FP8 encoding: its torch dtype, largest finite value and smallest normal value."""

    name: str
    dtype: torch.dtype
    max: float
    min_normal: float


FP8_FORMATS: dict[str, FP8Format] = {
    "e4m3": FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6),
    "e5m2": FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14),
}


def fp8_format(name: str) -> FP8Format:
    """The format called `name` ("e4m3" or "e5m2"); ValueError naming the choices otherwise."""
    try:
        return FP8_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown FP8 format {name!r}; use one of {sorted(FP8_FORMATS)}") from None


def check_scale(scale: float, what: str) -> None:
    """Static scales are finite positive powers of two, so scaling and unscaling are exact."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{what} must be a finite positive number, got {scale!r}")
    if math.frexp(scale)[0] != 0.5:
        raise ValueError(f"{what} must be a power of two (exact to apply and undo), got {scale!r}")


def cast_fp8(t: torch.Tensor, fmt: str, scale: float) -> torch.Tensor:
    """Saturating cast of `t·scale` to FP8 format `fmt` (computed in fp32; scale is a power of two)."""
    spec = fp8_format(fmt)
    scaled = t.to(torch.float32) * scale
    return scaled.clamp(-spec.max, spec.max).to(spec.dtype)


def power_of_two_scale(std: float) -> float:
    """The static scale s = 2^round(−log2 σ) that brings a tensor of RMS σ to about 1."""
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"cannot choose an FP8 scale for a tensor with predicted std {std!r}")
    return 2.0 ** round(-math.log2(std))
