"""Softmax and scaled-dot-product attention.

For n iid N(·, s²) logits the weights p = softmax have E Σp² between 1/n (flat) and 1 (one-hot);
≈ e^{s²}/n for small s² (e/k at causal position k for unit logits). o = Σ_j p_j v_j has
var ≈ σ_v²·Σp², which varies along the sequence: the tensor-wide value used for a static scale is the
average over query positions. E Σp² (and the backward's E[Σp² − 2Σp³ + (Σp²)²]) come from a seeded
Monte Carlo over a log-spaced grid of n, interpolated and cached: lognormal sums have heavy tails,
and no closed form holds once e^{s²} is comparable with n.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from munit_compile.passes.rules import backward_rule, forward_rule, grad
from munit_compile.passes.values import Moments

aten = torch.ops.aten

_GRID_POINTS = 24


@lru_cache(maxsize=4096)
def _weight_stats_exact(logit_std: float, n: int) -> tuple[float, float]:
    """(E Σp², E[Σp² − 2Σp³ + (Σp²)²]) for softmax over n iid N(0, logit_std²) logits (seeded Monte Carlo)."""
    samples = min(1024, max(64, 16384 // n))
    gen = torch.Generator().manual_seed(n)
    p = torch.softmax(torch.randn(samples, n, generator=gen, dtype=torch.float64) * logit_std, dim=-1)
    s2, s3 = (p * p).sum(-1), (p * p * p).sum(-1)
    return s2.mean().item(), (s2 - 2 * s3 + s2 * s2).mean().item()


def weight_stats(logit_var: float, counts: list[float]) -> list[tuple[float, float]]:
    """`_weight_stats_exact` at each count of visible keys, interpolated in log n between grid points."""
    logit_std = float(f"{math.sqrt(max(logit_var, 0.0)):.3g}")
    top = max(int(round(max(counts))), 1)
    grid = np.unique(np.round(np.geomspace(1, top, _GRID_POINTS)).astype(int))
    table = np.array([_weight_stats_exact(logit_std, int(n)) for n in grid])
    log_n, log_grid = np.log(np.maximum(counts, 1.0)), np.log(grid)
    sum_p2 = np.interp(log_n, log_grid, table[:, 0])
    centered = np.interp(log_n, log_grid, table[:, 1])
    return list(zip(sum_p2.tolist(), centered.tolist()))


@forward_rule(aten.softmax.int, aten._softmax.default)
def softmax(site):
    """p = softmax(x) over n: μ = 1/n, m2 = E Σp² / n, over the visible entries of masked scores."""
    x, n = site.args[0], site.shape(0)[site.args[1]]
    stats = weight_stats(x.var, list(x.visible or (n,)))
    return Moments(1 / n, sum(s2 for s2, _ in stats) / len(stats) / n, gaussian=False)


@backward_rule(aten.softmax.int, aten._softmax.default)
def softmax_grad(site, g):
    """dx = p ⊙ (dp − Σ p·dp): m2 = E[Σp² − 2Σp³ + (Σp²)²]/n · m2(dp)."""
    x, n = site.args[0], site.shape(0)[site.args[1]]
    stats = weight_stats(x.var, list(x.visible or (n,)))
    return (grad(g.m2 * sum(c for _, c in stats) / len(stats) / n), None, None)


@lru_cache(maxsize=8)
def _allowed_per_query(mask: torch.Tensor, q_len: int, kv_len: int) -> tuple[float, ...]:
    """Keys each query may attend to under a folded mask (bool keep-mask or additive float mask);
    cached per mask tensor, which every layer of a model shares."""
    allowed = mask if mask.dtype == torch.bool else mask > -1e4
    allowed = allowed.expand(*allowed.shape[:-2], q_len, kv_len).reshape(-1, q_len, kv_len)
    return tuple(allowed.sum(-1, dtype=torch.float64).mean(0).clamp(min=1).tolist())


def _visible_keys(site, q_len: int, kv_len: int) -> list[float]:
    """Number of keys each query position may attend to (averaged over batch and heads)."""
    mask, is_causal = site.arg(3, "attn_mask"), site.arg(5, "is_causal", False)
    concrete = getattr(mask, "concrete", None)
    if concrete is not None:
        return list(_allowed_per_query(concrete, q_len, kv_len))
    if is_causal:
        offset = kv_len - q_len
        return [float(i + 1 + offset) for i in range(q_len)]
    return [float(kv_len)] * q_len


def attention_weights(site) -> tuple[float, float, tuple[float, float]]:
    """Means over query positions of E Σp² and of E[Σp² − 2Σp³ + (Σp²)²], and the (min, max) of E Σp².

    Logits vary across keys through k − μk only: s² = scale²·d·m2q·σk².
    """
    q, k = site.args[0], site.args[1]
    q_shape, k_shape = site.shape(0), site.shape(1)
    d = q_shape[-1]
    scale = site.arg(6, "scale") or 1.0 / math.sqrt(d)
    keep = 1.0 - site.arg(4, "dropout_p", 0.0)
    stats = weight_stats(scale * scale * d * q.m2 * k.var, _visible_keys(site, q_shape[-2], k_shape[-2]))
    per_position = [s2 / keep for s2, _ in stats]
    return (
        sum(per_position) / len(per_position),
        sum(c for _, c in stats) / len(stats) / keep,
        (min(per_position), max(per_position)),
    )


@forward_rule(aten.scaled_dot_product_attention.default)
def sdpa(site):
    """o = softmax(q kᵀ·scale + mask) v: μ = μv, var = σ_v²·mean_i Σ_j p_ij²."""
    v = site.args[2]
    p2, _, (p2_min, p2_max) = attention_weights(site)
    std_range = (math.sqrt(v.var * p2_min), math.sqrt(v.var * p2_max)) if p2_max > 1.01 * p2_min else None
    return Moments(v.mean, v.mean * v.mean + v.var * p2, gaussian=True, std_range=std_range)


@backward_rule(aten.scaled_dot_product_attention.default)
def sdpa_grad(site, g):
    """dv_j = Σ_i p_ij dy_i; dq_i = scale·Σ_j dS_ij k_j, dk_j = scale·Σ_i dS_ij q_i, where
    dS = p ⊙ (dP − Σp·dP) cancels the means of v (and, summed over keys, of k):
    E Σ_j dS_ij² = d_v·m2(dy)·σv²·E[Σp² − 2Σp³ + (Σp²)²]."""
    q, k, v = site.args[0], site.args[1], site.args[2]
    q_shape, k_shape, v_shape = site.shape(0), site.shape(1), site.shape(2)
    d = q_shape[-1]
    scale = site.arg(6, "scale") or 1.0 / math.sqrt(d)
    p2, p2_centered, _ = attention_weights(site)
    queries_per_key = q_shape[-2] / k_shape[-2]
    group = q_shape[-3] / k_shape[-3] if len(q_shape) >= 3 and len(k_shape) >= 3 else 1.0
    ds2 = v_shape[-1] * g.m2 * v.var * p2_centered
    return (
        grad(scale * scale * k.var * ds2),
        grad(scale * scale * q.m2 * ds2 * queries_per_key * group),
        grad(g.m2 * p2 * queries_per_key * group),
    )
