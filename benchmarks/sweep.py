"""Learning-rate sweeps on a grid of powers of two that extend themselves until the optimum is bracketed.

    runs = bracket({"sp": sp_recipe, "mus": mus_recipe}, start={"sp": [-10, -9, -8], "mus": [-6, -5, -4]},
                   corpus=corpus, jobs=2)      # {"sp": [result, ...], "mus": [...]}, results sorted by lr

Each cell (one recipe, LR left free) first trains at its `start` exponents; while its best LR lies at the
edge of what was tried, the next power of two beyond that edge is added (at most `max_extra` per cell,
never outside `bounds`). All cells' pending runs of a round go to `train_all` together, so `jobs`
processes stay busy. A diverged run counts as loss +inf.
"""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Hashable

import numpy as np

from benchmarks.training import Corpus, Recipe, train_all


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["final_val_loss"])


def exponent(lr: float) -> int:
    return round(math.log2(lr))


def next_exponents(tried: dict[int, float], bounds: tuple[int, int]) -> list[int]:
    """The exponent beyond the edge where the best loss of `tried` (exponent -> loss) lies, if any."""
    lo, hi = min(tried), max(tried)
    winner = min(tried, key=lambda e: tried[e])
    if winner == lo and lo - 1 >= bounds[0]:
        return [lo - 1]
    if winner == hi and hi + 1 <= bounds[1]:
        return [hi + 1]
    return []


def bracket(cells: dict[Hashable, Recipe], start: dict[Hashable, list[int]], corpus: Corpus, jobs: int = 1,
            bounds: tuple[int, int] = (-16, 0), max_extra: int = 4, progress: bool = True) -> dict[Hashable, list[dict]]:
    """Train every cell over its start exponents, then extend each until bracketed (module docstring)."""
    results: dict[Hashable, dict[int, dict]] = {key: {} for key in cells}
    pending = {key: sorted(set(start[key])) for key in cells}
    extra = {key: 0 for key in cells}
    while any(pending.values()):
        order = [(key, e) for key, exps in pending.items() for e in exps]
        runs = train_all([replace(cells[key], lr=2.0 ** e) for key, e in order], corpus, jobs, progress)
        for (key, e), run in zip(order, runs):
            results[key][e] = run
            print(f"  {key}: lr 2^{e}: final val loss {run['final_val_loss']:.4f}", file=sys.stderr)
        pending = {}
        for key, tried in results.items():
            more = next_exponents({e: r["final_val_loss"] for e, r in tried.items()}, bounds)
            if more and extra[key] < max_extra:
                extra[key] += len(more)
                pending[key] = more
    return {key: [tried[e] for e in sorted(tried)] for key, tried in results.items()}


def interpolated_optimum(runs: list[dict]) -> float | None:
    """log2 of the LR at the vertex of the parabola through the best run and its two grid neighbours
    (loss vs log2 lr); None when the best is at an edge or the three points are not convex."""
    points = sorted((math.log2(r["recipe"]["lr"]), r["final_val_loss"]) for r in runs)
    i = min(range(len(points)), key=lambda j: points[j][1])
    if i == 0 or i == len(points) - 1 or not all(math.isfinite(p[1]) for p in points[i - 1:i + 2]):
        return None
    a, b, _ = np.polyfit([p[0] for p in points[i - 1:i + 2]], [p[1] for p in points[i - 1:i + 2]], 2)
    return float(-b / (2 * a)) if a > 0 else None
