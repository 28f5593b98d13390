"""Pointwise nonlinearities: exact moments of f(X), X ~ N(μ, σ²), and E[f'(X)²] for the gradient."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from munit_compile.passes import gaussian
from munit_compile.passes.rules import backward_rule, forward_rule, grad
from munit_compile.passes.values import Moments

aten = torch.ops.aten


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _activation(site):
    """The torch function an activation node computes."""
    target = site.node.target
    if target is aten.gelu.default:
        return _gelu_tanh if site.arg(1, "approximate", "none") == "tanh" else F.gelu
    if target is aten.softplus.default:
        return _softplus(site.arg(1, "beta", 1.0), site.arg(2, "threshold", 20.0))
    if target is aten.clamp.default:
        return _clamp(site.arg(1, "min"), site.arg(2, "max"))
    return _ACTIVATIONS[target]


@functools.lru_cache(maxsize=64)
def _softplus(beta, threshold):
    return lambda x: F.softplus(x, beta=beta, threshold=threshold)


@functools.lru_cache(maxsize=64)
def _clamp(low, high):
    return lambda x: torch.clamp(x, low, high)


_ACTIVATIONS = {
    aten.softplus.default: F.softplus,
    aten.abs.default: torch.abs,
    aten.square.default: torch.square,
    aten.silu.default: F.silu,
    aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid,
    aten.exp.default: torch.exp,
}


@forward_rule(aten.gelu.default, aten.clamp.default, *_ACTIVATIONS)
def activation(site):
    """y = f(x): (E f(X), E f(X)²) by Gauss–Hermite quadrature (x taken as Gaussian with its μ, σ)."""
    x, f = site.args[0], _activation(site)
    mean, m2 = gaussian.moments(f, x.mean, x.std)
    source = Moments.normal(x.mean, x.var)
    return Moments(mean, m2, gaussian=False, row_constant=x.row_constant,
                   sampler=lambda n, gen: f(source.draw(n, gen)))


@backward_rule(aten.gelu.default, *_ACTIVATIONS)
def activation_grad(site, g):
    """dx = f'(x)·dy: m2 = E[f'(X)²]·m2(dy)."""
    x = site.args[0]
    return (grad(g.m2 * gaussian.grad_m2(_activation(site), x.mean, x.std)),)


@backward_rule(aten.clamp.default)
def clamp_grad(site, g):
    """dx = 1[low < x < high]·dy: m2 = P(low < X < high)·m2(dy) (closed form: f' is a step)."""
    x, low, high = site.args[0], site.arg(1, "min"), site.arg(2, "max")
    share = _between(x, -math.inf if low is None else low, math.inf if high is None else high)
    return (grad(g.m2 * share), None, None)


def _between(x: Moments, low: float, high: float) -> float:
    if x.std == 0:
        return float(low < x.mean < high)
    cdf = lambda v: 0.5 * (1 + math.erf((v - x.mean) / (x.std * math.sqrt(2)))) if math.isfinite(v) else float(v > 0)
    return cdf(high) - cdf(low)


@forward_rule(aten.cos.default, aten.sin.default)
def trig(site):
    """cos/sin of N(μ,σ²): E cos = e^{−σ²/2} cos μ, E cos² = (1 + e^{−2σ²} cos 2μ)/2 (sin: sin, 1 − …)."""
    x = site.args[0]
    damp, damp2 = math.exp(-x.var / 2), math.exp(-2 * x.var)
    if site.node.target is aten.cos.default:
        return Moments(damp * math.cos(x.mean), (1 + damp2 * math.cos(2 * x.mean)) / 2, gaussian=False)
    return Moments(damp * math.sin(x.mean), (1 - damp2 * math.cos(2 * x.mean)) / 2, gaussian=False)


@backward_rule(aten.cos.default, aten.sin.default)
def trig_grad(site, g):
    """d cos = −sin·dy, d sin = cos·dy: m2 = E[sin²] or E[cos²] times m2(dy)."""
    x = site.args[0]
    damp2 = math.exp(-2 * x.var)
    sign = 1 if site.node.target is aten.cos.default else -1
    return (grad(g.m2 * (1 - sign * damp2 * math.cos(2 * x.mean)) / 2),)


def _normal_pdf_cdf(z: float) -> tuple[float, float]:
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(z / math.sqrt(2)))


@forward_rule(aten.relu.default)
def relu(site):
    """ReLU of N(μ,σ²), closed form: E = μΦ + σφ, E² = (μ²+σ²)Φ + μσφ at z = μ/σ."""
    x = site.args[0]
    if x.std == 0:
        return Moments.constant(max(x.mean, 0.0))
    pdf, cdf = _normal_pdf_cdf(x.mean / x.std)
    mean = x.mean * cdf + x.std * pdf
    source = Moments.normal(x.mean, x.var)
    return Moments(mean, (x.mean**2 + x.var) * cdf + x.mean * x.std * pdf, gaussian=False,
                   sampler=lambda n, gen: torch.relu(source.draw(n, gen)))


@backward_rule(aten.relu.default)
def relu_grad(site, g):
    """dx = 1[x > 0]·dy: m2 = Φ(μ/σ)·m2(dy)."""
    x = site.args[0]
    share = float(x.mean > 0) if x.std == 0 else _normal_pdf_cdf(x.mean / x.std)[1]
    return (grad(g.m2 * share),)
