"""Exact moments of f(X) for X ~ N(μ, σ²), by Gauss–Hermite quadrature in float64 (cached).

E[f(X)] = Σ_i w_i f(μ + σ z_i) / √(2π) over probabilists' Hermite nodes z_i; derivatives of f come
from torch autograd at the nodes, so any torch-expressible activation works.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(160)
_NODES_T = torch.tensor(_NODES, dtype=torch.float64)
_WEIGHTS_T = torch.tensor(_WEIGHTS / math.sqrt(2 * math.pi), dtype=torch.float64)


def _key(x: float) -> float:
    """Round to 6 significant digits so the cache hits across near-identical queries."""
    return float(f"{x:.6g}")


def moments(f: Callable[[torch.Tensor], torch.Tensor], mean: float, std: float) -> tuple[float, float]:
    """(E[f(X)], E[f(X)²]) for X ~ N(mean, std²)."""
    return _moments(f, _key(mean), _key(std))


def grad_m2(f: Callable[[torch.Tensor], torch.Tensor], mean: float, std: float) -> float:
    """E[f'(X)²] for X ~ N(mean, std²): the factor by which f scales a gradient's second moment."""
    return _grad_m2(f, _key(mean), _key(std))


def below_fraction(mean: float, std: float, threshold: float) -> float:
    """P(|X| < threshold) for X ~ N(mean, std²): the share of values an FP8 cast makes subnormal."""
    if std <= 0:
        return float(abs(mean) < threshold)
    cdf = lambda x: 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))
    return cdf(threshold) - cdf(-threshold)


@lru_cache(maxsize=4096)
def _moments(f, mean, std):
    with torch.no_grad():
        y = f(mean + std * _NODES_T)
    return float((_WEIGHTS_T * y).sum()), float((_WEIGHTS_T * y * y).sum())


@lru_cache(maxsize=4096)
def _grad_m2(f, mean, std):
    x = (mean + std * _NODES_T).requires_grad_(True)
    with torch.enable_grad():
        (dy,) = torch.autograd.grad(f(x).sum(), x)
    return float((_WEIGHTS_T * dy * dy).sum())
