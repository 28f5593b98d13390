"""Normalizations: the normalized value has unit variance (RMSNorm: unit second moment), times the affine."""
from __future__ import annotations

import torch

from munit_compile.ir import numel
from munit_compile.passes.rules import backward_rule, forward_rule, grad, is_tensor
from munit_compile.passes.rules.arith import add_moments, mul_moments
from munit_compile.passes.values import Moments

aten = torch.ops.aten


def _affine(normed: Moments, weight, bias) -> Moments:
    y = mul_moments(normed, weight) if isinstance(weight, Moments) else normed
    y = Moments(y.mean, y.m2, gaussian=True)
    return add_moments(y, bias) if isinstance(bias, Moments) else y


@forward_rule(aten.layer_norm.default)
def layer_norm(site):
    """y = (x − μ)/√(σ² + ε)·w + b: m2 = σ²/(σ²+ε)·m2w + m2b."""
    x = site.args[0]
    eps = site.arg(4, "eps", 1e-5)
    normed = Moments(0.0, x.var / (x.var + eps))
    return _affine(normed, site.arg(2, "weight"), site.arg(3, "bias"))


def _norm_grads(site, g, inv_scale2: float, normed_m2: float, weight, bias) -> tuple:
    """dx ≈ w·dy/scale: m2 = m2w·m2(dy)/scale²; dw = Σ_rows x̂·dy: rows·m2(x̂)·m2(dy); db = Σ_rows dy."""
    rows = numel(site.shape(0)) // max(numel(site.args[1]), 1)
    w_m2 = weight.m2 if isinstance(weight, Moments) else 1.0
    return (
        grad(g.m2 * w_m2 * inv_scale2),
        None,
        grad(rows * normed_m2 * g.m2) if is_tensor(weight) else None,
        grad(rows * g.m2) if is_tensor(bias) else None,
    )


@backward_rule(aten.layer_norm.default)
def layer_norm_grad(site, g):
    """Scale σ: dx m2 = m2w·m2(dy)/(σ²+ε); dw, db summed over rows."""
    x, eps = site.args[0], site.arg(4, "eps", 1e-5)
    return _norm_grads(site, g, 1 / (x.var + eps), x.var / (x.var + eps), site.arg(2, "weight"), site.arg(3, "bias"))


@forward_rule(aten.rms_norm.default)
def rms_norm(site):
    """y = x/√(E x² + ε)·w: m2 = m2x/(m2x+ε)·m2w."""
    x = site.args[0]
    eps = site.arg(3, "eps") or 1e-6
    scale = (x.m2 + eps) ** -0.5
    normed = Moments(x.mean * scale, x.m2 * scale * scale)
    return _affine(normed, site.arg(2, "weight"), None)


@backward_rule(aten.rms_norm.default)
def rms_norm_grad(site, g):
    """Scale rms: dx m2 = m2w·m2(dy)/(m2x+ε); dw summed over rows."""
    x, eps = site.args[0], site.arg(3, "eps") or 1e-6
    return _norm_grads(site, g, 1 / (x.m2 + eps), x.m2 / (x.m2 + eps), site.arg(2, "weight"), None)
