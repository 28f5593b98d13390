"""Means and sums over dims: a mean of n iid values has μ and variance σ²/n (nearly constant)."""
from __future__ import annotations

import torch

from munit_compile.ir import numel
from munit_compile.passes.rules import backward_rule, forward_rule, grad
from munit_compile.passes.values import Moments

aten = torch.ops.aten

_ROW_CONSTANT_SHARE = 0.25  # a reduction whose variance is under 25 % of its m2 counts as (nearly) constant


def _reduced_count(site) -> int:
    return max(numel(site.shape(0)) // max(numel(site.out_shape), 1), 1)


def _mean_of(x: Moments, n: int) -> Moments:
    m2 = x.mean * x.mean + x.var / n
    return Moments(x.mean, m2, gaussian=True, row_constant=x.var / n <= _ROW_CONSTANT_SHARE * m2)


@forward_rule(aten.mean.dim, aten.mean.default)
def mean(site):
    """y = mean of n values: μ, σ²/n."""
    return _mean_of(site.args[0], _reduced_count(site))


@forward_rule(aten.sum.dim_IntList, aten.sum.default)
def sum_(site):
    """y = sum of n values: nμ, nσ²."""
    n = _reduced_count(site)
    m = _mean_of(site.args[0], n)
    return Moments(m.mean * n, m.m2 * n * n, m.gaussian, m.row_constant)


@backward_rule(aten.mean.dim, aten.mean.default)
def mean_grad(site, g):
    """dx = dy/n on each of the n inputs."""
    n = _reduced_count(site)
    return (grad(g.m2 / (n * n)),)


@backward_rule(aten.sum.dim_IntList, aten.sum.default)
def sum_grad(site, g):
    """dx = dy on each input."""
    return (g,)
