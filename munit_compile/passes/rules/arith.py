"""Sums, products, quotients and powers of independent operands (a Python scalar is a constant)."""
from __future__ import annotations

import torch

from munit_compile.passes import gaussian
from munit_compile.passes.rules import backward_rule, forward_rule, grad, is_tensor, scaled
from munit_compile.passes.rules.masking import MASKED, masked
from munit_compile.passes.values import Moments, Unknown

aten = torch.ops.aten


def as_moments(v) -> Moments:
    """A Python number as the Moments of a constant; Moments unchanged."""
    return v if isinstance(v, Moments) else Moments.constant(float(v))


def combined_sampler(a: Moments, b: Moments, combine, result_gaussian: bool):
    """Samples of combine(A, B) for independent A, B, where the result's shape is not Gaussian
    (a Gaussian result needs no sampler: `draw` samples it from μ and σ)."""
    if result_gaussian or not (a.drawable and b.drawable):
        return None

    def sample(n, gen):
        xa, xb = a.draw(n, gen), b.draw(n, gen)
        return None if xa is None or xb is None else combine(xa, xb)

    return sample


def add_moments(a: Moments, b: Moments, alpha: float = 1.0) -> Moments:
    """a + α·b, independent: μ = μa + αμb, m2 = m2a + α²m2b + 2αμaμb."""
    gaussian = (a.gaussian or a.row_constant) and (b.gaussian or b.row_constant)
    return Moments(
        a.mean + alpha * b.mean,
        a.m2 + alpha * alpha * b.m2 + 2 * alpha * a.mean * b.mean,
        gaussian=gaussian,
        row_constant=a.row_constant and b.row_constant,
        sampler=combined_sampler(a, b, lambda xa, xb: xa + alpha * xb, gaussian),
    )


def mul_moments(a: Moments, b: Moments) -> Moments:
    """a·b, independent: μ = μaμb, m2 = m2a·m2b (Gaussian only if one factor is constant)."""
    gaussian = (a.gaussian and b.row_constant) or (b.gaussian and a.row_constant) or (a.row_constant and b.row_constant)
    return Moments(
        a.mean * b.mean,
        a.m2 * b.m2,
        gaussian=gaussian,
        row_constant=a.row_constant and b.row_constant,
        sampler=combined_sampler(a, b, lambda xa, xb: xa * xb, gaussian),
    )


def inverse_moments(b: Moments, power: float = 1.0) -> Moments | Unknown:
    """b^(−power) for a (nearly) constant b; a varying denominator is not predictable here."""
    if not b.row_constant or b.mean == 0:
        return Unknown("aten.div", "division by a varying tensor")
    c = b.mean ** (-power)
    return Moments.constant(c)


@forward_rule(aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor)
def add(site):
    """y = a + α·b; adding a folded additive mask (entries ≤ −1e4) masks those entries instead."""
    a, b, alpha = site.args[0], site.args[1], site.arg(2, "alpha", 1)
    for x, bias in ((a, b), (b, a)):
        mask = getattr(bias, "concrete", None)
        if isinstance(x, Moments) and mask is not None and alpha == 1 and bool((mask <= MASKED).any()):
            keep = mask > MASKED
            return masked(add_moments(x, Moments.of_tensor(mask[keep])), keep, site.out_shape)
    return add_moments(as_moments(a), as_moments(b), alpha)


@forward_rule(aten.sub.Tensor, aten.sub.Scalar)
def sub(site):
    """y = a − α·b."""
    return add_moments(as_moments(site.args[0]), as_moments(site.args[1]), -site.arg(2, "alpha", 1))


@forward_rule(aten.rsub.Scalar, aten.rsub.Tensor)
def rsub(site):
    """y = b − α·a."""
    return add_moments(as_moments(site.args[1]), as_moments(site.args[0]), -site.arg(2, "alpha", 1))


@backward_rule(aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.sub.Tensor, aten.sub.Scalar,
               aten.rsub.Scalar, aten.rsub.Tensor)
def add_grad(site, g):
    """da = dy, db = ±α·dy, each summed over its broadcast copies."""
    alpha = site.arg(2, "alpha", 1)
    scales = (1.0, alpha) if site.node.target not in (aten.rsub.Scalar, aten.rsub.Tensor) else (alpha, 1.0)
    return tuple(
        grad(g.m2 * s * s * site.broadcast_factor(i)) if is_tensor(site.args[i]) else None
        for i, s in enumerate(scales)
    )


@forward_rule(aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor)
def mul(site):
    """y = a·b."""
    return mul_moments(as_moments(site.args[0]), as_moments(site.args[1]))


@backward_rule(aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor)
def mul_grad(site, g):
    """da = b·dy: m2 = m2b·m2(dy) (× broadcast), and symmetrically."""
    a, b = as_moments(site.args[0]), as_moments(site.args[1])
    return (
        grad(g.m2 * b.m2 * site.broadcast_factor(0)) if is_tensor(site.args[0]) else None,
        grad(g.m2 * a.m2 * site.broadcast_factor(1)) if is_tensor(site.args[1]) else None,
    )


@forward_rule(aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor)
def div(site):
    """y = a / b for a constant (or row-constant) b."""
    inv = inverse_moments(as_moments(site.args[1]))
    return inv if isinstance(inv, Unknown) else mul_moments(as_moments(site.args[0]), inv)


@backward_rule(aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor)
def div_grad(site, g):
    """da = dy/b; db = −a·dy/b² (b constant): m2 = m2a·m2(dy)/b⁴ (× broadcast)."""
    a, b = as_moments(site.args[0]), as_moments(site.args[1])
    inv2 = 1.0 / (b.mean * b.mean)
    return (
        grad(g.m2 * inv2 * site.broadcast_factor(0)) if is_tensor(site.args[0]) else None,
        grad(g.m2 * a.m2 * inv2 * inv2 * site.broadcast_factor(1)) if is_tensor(site.args[1]) else None,
    )


@forward_rule(aten.neg.default)
def neg(site):
    """y = −x."""
    return scaled(site.args[0], -1.0)


@backward_rule(aten.neg.default)
def neg_grad(site, g):
    """dx = −dy."""
    return (g,)


def _power(p: float):
    return lambda x: torch.pow(x, p)


@forward_rule(aten.pow.Tensor_Scalar)
def pow_scalar(site):
    """y = x^p: exact Gaussian integral of x^p (x constant: c^p)."""
    x, p = site.args[0], float(site.args[1])
    if x.row_constant:
        return Moments.constant(x.mean ** p)
    if p == 2:  # E[x²] and E[x⁴] = μ⁴ + 6μ²σ² + 3σ⁴ for Gaussian x
        mu, var = x.mean, x.var
        return Moments(x.m2, mu**4 + 6 * mu * mu * var + 3 * var * var, gaussian=False)
    if not float(p).is_integer():
        return Unknown("aten.pow", f"non-integer power {p} of a varying tensor")
    mean, m2 = gaussian.moments(_power(p), x.mean, x.std)
    return Moments(mean, m2, gaussian=False)


@backward_rule(aten.pow.Tensor_Scalar)
def pow_grad(site, g):
    """dx = p·x^(p−1)·dy: m2 = E[(p x^(p−1))²]·m2(dy)."""
    x, p = site.args[0], float(site.args[1])
    if x.row_constant:
        return (grad(g.m2 * (p * x.mean ** (p - 1)) ** 2),)
    return (grad(g.m2 * gaussian.grad_m2(_power(p), x.mean, x.std)),)


_CONSTANT_FUNCTIONS = {
    aten.rsqrt.default: (lambda c: c ** -0.5, lambda c: -0.5 * c ** -1.5),
    aten.sqrt.default: (lambda c: c ** 0.5, lambda c: 0.5 * c ** -0.5),
    aten.reciprocal.default: (lambda c: 1.0 / c, lambda c: -1.0 / (c * c)),
}


@forward_rule(*_CONSTANT_FUNCTIONS)
def constant_function(site):
    """rsqrt / sqrt / reciprocal of a (row-)constant c: the constant f(c), e.g. 1/RMS in a norm."""
    x = site.args[0]
    if not x.row_constant or x.mean <= 0:
        return Unknown(str(site.node.target), "applied to a varying tensor")
    f, _ = _CONSTANT_FUNCTIONS[site.node.target]
    return Moments.constant(f(x.mean))


@backward_rule(*_CONSTANT_FUNCTIONS)
def constant_function_grad(site, g):
    """dx = f'(c)·dy."""
    _, df = _CONSTANT_FUNCTIONS[site.node.target]
    return (grad(g.m2 * df(site.args[0].mean) ** 2),)




_CONSTANT_LIKE = {  # op: position of its fill value, or the value itself
    aten.zeros_like.default: 0.0, aten.ones_like.default: 1.0, aten.full_like.default: 1,
    aten.new_zeros.default: 0.0, aten.new_ones.default: 1.0, aten.new_full.default: 2,
}


@forward_rule(*_CONSTANT_LIKE)
def constant_like(site):
    """zeros_like / ones_like / full_like / new_*: a constant, whatever the input's values."""
    fill = _CONSTANT_LIKE[site.node.target]
    return Moments.constant(float(site.args[fill]) if isinstance(fill, int) else fill)


@backward_rule(*_CONSTANT_LIKE)
def constant_like_grad(site, g):
    """No gradient flows into the template tensor."""
    return (None,)
