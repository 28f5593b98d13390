"""What the variance analysis knows about a tensor: its moments, that it is not float, or that it is unknown.

Elements are modelled as iid draws of one scalar distribution, summarized by mean μ and second moment
m2 = E[x²] (σ² = m2 − μ²). `Unknown` is a value, never a silent 1: it names the op that caused it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Moments:
    """Mean and second moment of a float tensor's elements.

    gaussian: the elements are (close to) normal, so nonlinearities can use exact Gaussian integrals.
    row_constant: the value is a reduction (e.g. mean over a dim) and barely varies: treat it as a constant.
    concrete: the exact tensor, when it depends only on constants (folded at compile time).
    std_range: where σ varies along the sequence, its (min, max) over positions; `std` is the tensor-wide value.
    sampler: draws samples of the element distribution where its shape matters (see `draw`).
    """

    mean: float
    m2: float
    gaussian: bool = True
    row_constant: bool = False
    concrete: torch.Tensor | None = field(default=None, compare=False, repr=False)
    std_range: tuple[float, float] | None = field(default=None, compare=False)
    """(min, max) of σ along the sequence, where it varies by position (causal attention outputs)."""
    visible: tuple[float, ...] | None = field(default=None, compare=False, repr=False)
    """For attention scores with a folded additive mask (≤ −1e4 entries): per query position, how many
    entries along the last dim are not masked; μ and m2 then describe those entries only."""
    sampler: Callable[[int, torch.Generator], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    """Draws n float64 samples of the element distribution, where its shape is known beyond μ and m2
    (an activation of a Gaussian, a product of such): what an FP8 cast's underflow depends on."""

    @property
    def drawable(self) -> bool:
        return self.sampler is not None or self.row_constant or self.gaussian

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        """n samples of the element distribution: exact shape if known, normal if Gaussian, else None."""
        if self.sampler is not None:
            return self.sampler(n, gen)
        if self.row_constant:
            return torch.full((n,), self.mean, dtype=torch.float64)
        if self.gaussian:
            return self.mean + self.std * torch.randn(n, generator=gen, dtype=torch.float64)
        return None

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
        constant = m2 - mean * mean <= 1e-12 * m2  # e.g. norm gains at init: all ones
        return Moments(mean, m2, gaussian=True, row_constant=constant, concrete=t.detach() if keep else None)

    @staticmethod
    def constant(c: float) -> "Moments":
        c = c if isinstance(c, float) else float(c)  # a float subclass (symbolic.Sym) keeps its expression
        return Moments(c, c * c, gaussian=False, row_constant=True)

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
