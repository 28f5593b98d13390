"""What the variance analysis knows about a tensor: its moments, that it is not float, or that it is unknown.

Elements are modelled as iid draws of one scalar distribution, summarized by mean μ and second moment
m2 = E[x²] (σ² = m2 − μ²). `Unknown` is a value, never a silent 1: it names the op that caused it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Moments:
    """Mean and second moment of a float tensor's elements.

    gaussian: the elements are (close to) normal, so nonlinearities can use exact Gaussian integrals.
    row_constant: the value is a reduction (e.g. mean over a dim) and barely varies: treat it as a constant.
    concrete: the exact tensor, when it depends only on constants (folded at compile time).
    std_range: where σ varies along the sequence, its (min, max) over positions; `std` is the tensor-wide value.
    """

    mean: float
    m2: float
    gaussian: bool = True
    row_constant: bool = False
    concrete: torch.Tensor | None = field(default=None, compare=False, repr=False)
    std_range: tuple[float, float] | None = field(default=None, compare=False)
    """(min, max) of σ along the sequence, where it varies by position (causal attention outputs)."""

    @property
    def var(self) -> float:
        return max(self.m2 - self.mean * self.mean, 0.0)

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @property
    def rms(self) -> float:
        return math.sqrt(max(self.m2, 0.0))

    @staticmethod
    def of_tensor(t: torch.Tensor, keep: bool = False) -> "Moments":
        """Measured moments of a real tensor (keep=True also stores it for constant folding)."""
        t64 = t.detach().to(torch.float64)
        mean = t64.mean().item() if t64.numel() else 0.0
        m2 = (t64 * t64).mean().item() if t64.numel() else 0.0
        return Moments(mean, m2, gaussian=True, concrete=t.detach() if keep else None)

    @staticmethod
    def constant(c: float) -> "Moments":
        return Moments(float(c), float(c) * float(c), gaussian=False, row_constant=True)

    @staticmethod
    def normal(mean: float, var: float) -> "Moments":
        return Moments(mean, var + mean * mean, gaussian=True)


@dataclass(frozen=True)
class Unknown:
    """The analysis cannot predict this value; `op` is the operator where knowledge was lost."""

    op: str
    reason: str = ""

    def __str__(self) -> str:
        return f"unknown (from {self.op}{': ' + self.reason if self.reason else ''})"


@dataclass(frozen=True)
class NotFloat:
    """An integer or boolean tensor (token ids, masks, positions): it has no FP8 scale."""

    concrete: torch.Tensor | None = field(default=None, compare=False, repr=False)


Value = Moments | Unknown | NotFloat | tuple  # a tuple holds the Values of a multi-output op


def first_unknown(*values) -> Unknown | None:
    """The first Unknown among `values` (recursing into tuples), or None."""
    for v in values:
        if isinstance(v, Unknown):
            return v
        if isinstance(v, (tuple, list)):
            u = first_unknown(*v)
            if u is not None:
                return u
    return None
