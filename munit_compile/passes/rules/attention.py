"""Softmax and scaled-dot-product attention.

With logits of variance s² over n visible keys, the attention weights have Σ_j p_j² ≈ min(1, e^{s²}/n)
(= e/k at causal position k for unit logits), so o = Σ_j p_j v_j has var ≈ σ_v²·Σp²: it varies along
the sequence, and the tensor-wide value used for a static scale is the average over query positions.
"""
from __future__ import annotations

import math

import torch

from munit_compile.passes.rules import backward_rule, forward_rule, grad
from munit_compile.passes.values import Moments

aten = torch.ops.aten


def _softmax_m2(logit_var: float, n: int) -> float:
    """E[p²] for softmax over n iid N(·, s²) logits: between 1/n² (flat) and 1/n (one-hot)."""
    return min(math.exp(min(logit_var, 50.0)) / (n * n), 1.0 / n)


@forward_rule(aten.softmax.int, aten._softmax.default)
def softmax(site):
    """p = softmax(x) over n: μ = 1/n, m2 = min(e^{σ²}/n², 1/n)."""
    n = site.shape(0)[site.args[1]]
    return Moments(1.0 / n, _softmax_m2(site.args[0].var, n), gaussian=False)


@backward_rule(aten.softmax.int, aten._softmax.default)
def softmax_grad(site, g):
    """dx = p ⊙ (dp − Σ p·dp): m2 ≈ E[p²]·m2(dp)."""
    return (grad(g.m2 * site.out.m2), None, None)


def _visible_keys(site, q_len: int, kv_len: int) -> list[float]:
    """Number of keys each query position may attend to (averaged over batch and heads)."""
    mask, is_causal = site.arg(3, "attn_mask"), site.arg(5, "is_causal", False)
    concrete = getattr(mask, "concrete", None)
    if concrete is not None:
        allowed = concrete if concrete.dtype == torch.bool else concrete > -1e4
        allowed = allowed.expand(*allowed.shape[:-2], q_len, kv_len).reshape(-1, q_len, kv_len)
        return allowed.to(torch.float64).sum(-1).mean(0).clamp(min=1).tolist()
    if is_causal:
        offset = kv_len - q_len
        return [float(i + 1 + offset) for i in range(q_len)]
    return [float(kv_len)] * q_len


def attention_weights(site) -> tuple[float, float]:
    """(mean over queries of Σp², mean of Σp²(1 − Σp²)) for this attention's logits and mask."""
    q, k = site.args[0], site.args[1]
    q_shape, k_shape = site.shape(0), site.shape(1)
    d = q_shape[-1]
    scale = site.arg(6, "scale") or 1.0 / math.sqrt(d)
    dropout = site.arg(4, "dropout_p", 0.0)
    logit_var = scale * scale * d * q.m2 * k.m2
    sums = [min(math.exp(min(logit_var, 50.0)) / n, 1.0) / (1.0 - dropout) for n in _visible_keys(site, q_shape[-2], k_shape[-2])]
    return sum(sums) / len(sums), sum(s * max(1.0 - s, 0.0) for s in sums) / len(sums)


@forward_rule(aten.scaled_dot_product_attention.default)
def sdpa(site):
    """o = softmax(q kᵀ·scale + mask) v: μ = μv, var = σ_v²·mean_i Σ_j p_ij²."""
    v = site.args[2]
    p2, _ = attention_weights(site)
    return Moments(v.mean, v.mean * v.mean + v.var * p2, gaussian=True)


@backward_rule(aten.scaled_dot_product_attention.default)
def sdpa_grad(site, g):
    """dv_j = Σ_i p_ij dy_i; dq_i = scale·Σ_j dS_ij k_j with E Σ_j dS_ij² ≈ d_v m2(dy) m2v Σp²(1−Σp²)."""
    q, k, v = site.args[0], site.args[1], site.args[2]
    q_shape, k_shape, v_shape = site.shape(0), site.shape(1), site.shape(2)
    d = q_shape[-1]
    scale = site.arg(6, "scale") or 1.0 / math.sqrt(d)
    p2, p2_centered = attention_weights(site)
    queries_per_key = q_shape[-2] / k_shape[-2]
    group = q_shape[-3] / k_shape[-3] if len(q_shape) >= 3 and len(k_shape) >= 3 else 1.0
    ds2 = v_shape[-1] * g.m2 * v.m2 * p2_centered
    return (
        grad(scale * scale * k.m2 * ds2),
        grad(scale * scale * q.m2 * ds2 * queries_per_key * group),
        grad(g.m2 * p2 * queries_per_key * group),
    )
