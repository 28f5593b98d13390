"""GEMMs: y = Σ_k x_k w_k over the contraction dim k (fan-in).

Forward  μ = k μx μw,  m2 = k·m2x·m2w + k(k−1)·μx²μw²  (+ bias, independent)
Backward m2(dx) = n·m2w·m2(dy) (n = fan-out),  m2(dw) = rows·m2x·m2(dy)
"""
from __future__ import annotations

import torch

from munit_compile.ir import numel
from munit_compile.passes.rules import backward_rule, forward_rule, grad, is_tensor
from munit_compile.passes.rules.arith import add_moments
from munit_compile.passes.values import Moments

aten = torch.ops.aten


def contract(x: Moments, w: Moments, k: int) -> Moments:
    """Moments of a k-term dot product of independent x and w entries."""
    mean = k * x.mean * w.mean
    m2 = k * x.m2 * w.m2 + k * (k - 1) * (x.mean * w.mean) ** 2
    return Moments(mean, m2, gaussian=True)


@forward_rule(aten.linear.default)
def linear(site):
    """y = x Wᵀ + b, W is [n, k]."""
    x, w, b = site.args[0], site.args[1], site.arg(2, "bias")
    y = contract(x, w, site.shape(1)[1])
    return add_moments(y, b) if isinstance(b, Moments) else y


@backward_rule(aten.linear.default)
def linear_grad(site, g):
    """dx: n·m2w·m2(dy); dW: rows·m2x·m2(dy); db: rows·m2(dy)."""
    x, w = site.args[0], site.args[1]
    n, k = site.shape(1)
    rows = numel(site.shape(0)) // k
    db = grad(rows * g.m2) if is_tensor(site.arg(2, "bias")) else None
    return grad(n * w.m2 * g.m2), grad(rows * x.m2 * g.m2), db


@forward_rule(aten.addmm.default)
def addmm(site):
    """y = β·b + α·(m1 @ m2), m1 is [rows, k]."""
    b, m1, m2 = site.args[0], site.args[1], site.args[2]
    beta, alpha = site.arg(3, "beta", 1), site.arg(4, "alpha", 1)
    y = contract(m1, m2, site.shape(1)[1])
    y = Moments(alpha * y.mean, alpha * alpha * y.m2)
    return add_moments(y, b, beta) if isinstance(b, Moments) else y


@backward_rule(aten.addmm.default)
def addmm_grad(site, g):
    """d m1: n·m2(m2)·m2(dy); d m2: rows·m2(m1)·m2(dy); db: summed over its broadcast."""
    b, m1, m2 = site.args[0], site.args[1], site.args[2]
    beta, alpha = site.arg(3, "beta", 1), site.arg(4, "alpha", 1)
    rows, n = site.out_shape
    db = grad(beta * beta * g.m2 * site.broadcast_factor(0)) if is_tensor(b) else None
    return db, grad(alpha**2 * n * m2.m2 * g.m2), grad(alpha**2 * rows * m1.m2 * g.m2)


@forward_rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def matmul(site):
    """y = a @ b, contraction over a's last dim."""
    return contract(site.args[0], site.args[1], site.shape(0)[-1])


@backward_rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def matmul_grad(site, g):
    """a[…,m,k] @ b[…,k,n]: da = n·m2b·m2(dy); db = m·m2a·m2(dy), × broadcast of a batched operand."""
    a, b = site.args[0], site.args[1]
    a_shape, b_shape = site.shape(0), site.shape(1)
    n = b_shape[-1] if len(b_shape) > 1 else 1
    m = a_shape[-2] if len(a_shape) > 1 else 1
    a_batch = numel(site.out_shape) / max(numel(a_shape[:-1]) * n, 1)
    b_batch = numel(site.out_shape) / max(m * n * max(numel(b_shape[:-2]), 1), 1)
    return grad(n * b.m2 * g.m2 * a_batch), grad(m * a.m2 * g.m2 * b_batch)


@forward_rule(aten.baddbmm.default)
def baddbmm(site):
    """y = β·c + α·(a @ b)."""
    c, a, b = site.args[0], site.args[1], site.args[2]
    beta, alpha = site.arg(3, "beta", 1), site.arg(4, "alpha", 1)
    y = contract(a, b, site.shape(1)[-1])
    return add_moments(Moments(alpha * y.mean, alpha * alpha * y.m2), c, beta)


@backward_rule(aten.baddbmm.default)
def baddbmm_grad(site, g):
    """As bmm for a and b (× α²); dc = β·dy summed over its broadcast."""
    a, b = site.args[1], site.args[2]
    beta, alpha = site.arg(3, "beta", 1), site.arg(4, "alpha", 1)
    m, n = site.out_shape[-2], site.out_shape[-1]
    return (
        grad(beta * beta * g.m2 * site.broadcast_factor(0)),
        grad(alpha**2 * n * b.m2 * g.m2),
        grad(alpha**2 * m * a.m2 * g.m2),
    )
