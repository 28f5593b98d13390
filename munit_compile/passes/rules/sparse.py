"""Lookups, losses, dropout and selections: embedding, cross-entropy, dropout, where, masked_fill."""
from __future__ import annotations

import math

import torch

from munit_compile.ir import numel
from munit_compile.passes.rules import backward_rule, forward_rule, grad, scaled
from munit_compile.passes.rules.arith import as_moments
from munit_compile.passes.rules.masking import is_mask_fill, masked
from munit_compile.passes.values import Moments

aten = torch.ops.aten


@forward_rule(aten.embedding.default)
def embedding(site):
    """y = W[idx]: the rows of W, so W's moments."""
    return site.args[0]


@backward_rule(aten.embedding.default)
def embedding_grad(site, g):
    """dW rows accumulate dy of their tokens (a leaf: not tracked further)."""
    return (None, None)


def cross_entropy_grad_m2(vocab: int, tokens: int, mean_reduction: bool = True) -> float:
    """m2 of d(mean CE)/d(logits) at init (p ≈ 1/V): (1 − 1/V)/V / N²."""
    m2 = (1 - 1 / vocab) / vocab
    return m2 / (tokens * tokens) if mean_reduction else m2


@forward_rule(aten.cross_entropy_loss.default)
def cross_entropy(site):
    """The loss at init is ≈ log V (a constant for scaling purposes)."""
    return Moments.constant(math.log(site.shape(0)[-1] if len(site.shape(0)) > 1 else site.shape(0)[0]))


@backward_rule(aten.cross_entropy_loss.default)
def cross_entropy_backward(site, g):
    """d logits = (softmax − onehot)/N: m2 = (1 − 1/V)/V/N² · m2(dL)."""
    logits = site.shape(0)
    vocab = logits[1] if len(logits) > 1 else logits[0]
    tokens = max(numel(logits) // vocab, 1)
    reduction = site.arg(3, "reduction", 1)
    return (grad(g.m2 * cross_entropy_grad_m2(vocab, tokens, reduction == 1)), None)


@forward_rule(aten.dropout.default)
def dropout(site):
    """Inverted dropout y = x·mask/(1 − p): μ kept, m2/(1 − p) (identity when not training)."""
    x, p, train = site.args[0], site.args[1], site.args[2]
    if not train or p == 0:
        return x
    return Moments(x.mean, x.m2 / (1 - p), gaussian=x.gaussian)


@backward_rule(aten.dropout.default)
def dropout_grad(site, g):
    """dx = dy·mask/(1 − p): m2/(1 − p)."""
    p, train = site.args[1], site.args[2]
    return (grad(g.m2 / (1 - p)) if train else g, None, None)


def _true_share(cond) -> float:
    """Share of True in a condition: exact when it was folded, else assume half."""
    concrete = getattr(cond, "concrete", None)
    return concrete.to(torch.float64).mean().item() if concrete is not None else 0.5


@forward_rule(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
def where(site):
    """y = cond ? a : b: the mixture with weights share(cond), 1 − share(cond)."""
    cond, a, b = site.args[0], site.args[1], site.args[2]
    keep = getattr(cond, "concrete", None)
    if keep is not None and is_mask_fill(b) and isinstance(a, Moments):
        return masked(a, keep, site.out_shape)
    if keep is not None and is_mask_fill(a) and isinstance(b, Moments):
        return masked(b, ~keep, site.out_shape)
    f = _true_share(cond)
    a, b = as_moments(a), as_moments(b)
    return Moments(f * a.mean + (1 - f) * b.mean, f * a.m2 + (1 - f) * b.m2, gaussian=False)


@backward_rule(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
def where_grad(site, g):
    """da = dy where cond, db = dy elsewhere."""
    f = _true_share(site.args[0])
    return (None, scaled(g, math.sqrt(f)), scaled(g, math.sqrt(1 - f)))


@forward_rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(site):
    """y = mask ? value : x."""
    mask = getattr(site.args[1], "concrete", None)
    if mask is not None and is_mask_fill(site.args[2]):
        return masked(site.args[0], ~mask, site.out_shape)
    f = _true_share(site.args[1])
    x, value = site.args[0], as_moments(site.args[2])
    return Moments((1 - f) * x.mean + f * value.mean, (1 - f) * x.m2 + f * value.m2, gaussian=False)


@backward_rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill_grad(site, g):
    """dx = dy where the mask is False."""
    f = _true_share(site.args[1])
    return (scaled(g, math.sqrt(1 - f)), None, None)
