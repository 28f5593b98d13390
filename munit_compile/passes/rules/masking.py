"""Additive attention masks folded at compile time: masked entries leave the following softmax.

Scores written out by hand (`scores + mask`, `masked_fill(mask, -inf)`, `where(mask, s, finfo.min)`)
keep the moments of their unmasked entries plus, per query position, how many keys stay visible.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from munit_compile.passes.values import Moments

MASKED = -1e4  # a fill or bias at or below this removes the entry from a following softmax


def is_mask_fill(value) -> bool:
    return isinstance(value, (int, float)) and value <= MASKED or (
        isinstance(value, Moments) and value.row_constant and value.mean <= MASKED
    )


@functools.lru_cache(maxsize=16)
def visible_counts(keep: torch.Tensor, out_shape: tuple[int, ...]) -> tuple[float, ...]:
    """Unmasked entries along the last dim for each position of the second-to-last dim, averaged over
    the leading dims (a bool keep-mask broadcast to the scores' shape); cached per mask tensor."""
    if len(out_shape) < 2:
        return (float(keep.expand(out_shape).sum()),)
    keep = keep.reshape((1,) * (len(out_shape) - keep.dim()) + tuple(keep.shape))
    rows = keep.expand(*keep.shape[:-2], out_shape[-2], out_shape[-1])  # leading dims stay as stored
    counts = rows.sum(-1, dtype=torch.float64).reshape(-1, out_shape[-2]).mean(0)
    return tuple(counts.clamp(min=1).tolist())


def masked(x: Moments, keep: torch.Tensor, out_shape) -> Moments:
    """x's entries where `keep`, the rest masked out of a following softmax."""
    return dataclasses.replace(x, visible=visible_counts(keep, tuple(out_shape)), sampler=None, concrete=None)


