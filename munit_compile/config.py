"""Every knob of the munit backend, validated on construction.

`Config(**fields)` raises `ValueError` naming the field for an unknown name or a bad value,
so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

FP8_FORMATS = ("e4m3", "e5m2")
INNER_COMPILERS = ("inductor", "aot_eager")


@dataclass(frozen=True)
class _ConfigFields:
    fp8: bool = True
    """Rewrite eligible hidden GEMMs to static-scaled FP8 (`munit::fp8_linear`)."""
    fuse: bool = True
    """Run `passes.fuse` after the FP8 plan: fold what follows an FP8 GEMM (an activation) into its
    epilogue, rounded once. False leaves every FP8 GEMM and activation as separate ops."""
    forward_format: str = "e4m3"
    """FP8 format of activations and weights in forward GEMMs."""
    grad_format: str = "e5m2"
    """FP8 format of output gradients in backward GEMMs."""
    gemm_multiple: int = 16
    """K and N of an FP8 GEMM must be multiples of this (Hopper FP8 `wgmma` granularity)."""
    grad_output_std: float | None = None
    """σ of d(loss)/d(output) for graph outputs when the loss is not in the graph.
    None: assume mean cross-entropy over the output's tokens, σ = √((1−1/V)/V)/N."""
    inner_compiler: str = "inductor"
    """What compiles the rewritten graph: "inductor" (default) or "aot_eager" (debugging, fast tests)."""
    symbolic: bool = False
    """Also record every tensor's moments as sympy expressions over the graph's dims (batch, seq,
    d_model, ...); `munit.inspect` turns it on. The numbers, and so the FP8 plan, are the same."""
    strict: bool = False
    """If a munit pass fails on a graph: False logs a warning and compiles that graph unchanged in high
    precision (nothing is lost); True raises (for debugging and tests)."""


class Config(_ConfigFields):
    """Validated configuration of the munit backend; see the field docstrings in `_ConfigFields`."""

    def __init__(self, **fields):
        known = {f.name for f in dataclasses.fields(_ConfigFields)}
        for name in fields:
            if name not in known:
                raise ValueError(
                    f"Config: unknown field {name!r}; known fields are {sorted(known)}"
                )
        super().__init__(**fields)
        for check in _FIELD_CHECKS:
            check(self)

    def replace(self, **changes) -> "Config":
        """A copy with `changes` applied (validated like the constructor)."""
        return Config(**{**dataclasses.asdict(self), **changes})


def _check_bool(name):
    def check(cfg):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"Config.{name} must be a bool, got {getattr(cfg, name)!r}")
    return check


def _check_choice(name, choices):
    def check(cfg):
        if getattr(cfg, name) not in choices:
            raise ValueError(
                f"Config.{name} must be one of {choices}, got {getattr(cfg, name)!r}"
            )
    return check


def _check_gemm_multiple(cfg):
    m = cfg.gemm_multiple
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Config.gemm_multiple must be a positive int, got {m!r}")


def _check_grad_output_std(cfg):
    s = cfg.grad_output_std
    if s is None:
        return
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
        raise ValueError(
            f"Config.grad_output_std must be None or a finite positive number, got {s!r}"
        )


def _check_formats(cfg):
    if cfg.forward_format == "e5m2" and cfg.grad_format == "e5m2":
        raise ValueError(
            "Config.forward_format and Config.grad_format are both 'e5m2': an E5M2 x E5M2 GEMM "
            "has too little precision; use forward_format='e4m3'"
        )


_FIELD_CHECKS = (
    _check_bool("fp8"),
    _check_bool("fuse"),
    _check_bool("strict"),
    _check_bool("symbolic"),
    _check_choice("forward_format", FP8_FORMATS),
    _check_choice("grad_format", FP8_FORMATS),
    _check_gemm_multiple,
    _check_grad_output_std,
    _check_choice("inner_compiler", INNER_COMPILERS),
    _check_formats,
)
