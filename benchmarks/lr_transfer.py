"""lr-transfer: is μS's optimal learning rate the same across widths, while SP's moves?

For each width (a ×8 range) trains the built-in GPT in BF16 with the standard parametrization (SP) and
with μS (`munit.unit_scale`, hidden LR × √(base_width/width)) over learning rates that are powers of two,
extending each sweep until its best LR is bracketed (`benchmarks/sweep.py`), and reports the best LR per
width per parametrization (and the parabola-interpolated optimum). Writes JSON and the classic transfer plot (final
validation loss vs LR, one line per width, one panel per parametrization).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from benchmarks.common import benchmark_parser, environment, publish, pyplot, save_figure
from benchmarks.quality import parse_exponents
from benchmarks.sweep import best, bracket, interpolated_optimum
from benchmarks.training import Recipe, load_corpus

SMOKE = dict(layers=2, heads=2, seq=32, batch=8, steps=20, eval_every=10)


def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("lr-transfer", __doc__, "two tiny widths, two LRs, 20 steps: plumbing only")
    p.add_argument("--corpus", help="text file (default ../shared/data/shakespeare.txt)")
    p.add_argument("--widths", default="32,64,128,256")
    p.add_argument("--base-width", type=int, default=32, help="μS: the width at which hidden LR = lr")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel (processes, one thread each)")
    p.add_argument("--sp-lrs", default="-10,-9,-8", help="SP LR exponents of 2 to start from (extended until the best is bracketed)")
    p.add_argument("--mus-lrs", default="-6,-5,-4", help="μS LR exponents of 2 to start from (extended until bracketed)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "lion"))
    p.add_argument("--mus-weight-decay", type=float, default=1e-4)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    corpus = load_corpus(args.corpus)
    widths = [int(w) for w in args.widths.split(",")]
    start_exps = {"sp": parse_exponents(args.sp_lrs), "mus": parse_exponents(args.mus_lrs)}
    base = Recipe(precision="bf16", layers=args.layers, steps=args.steps, seq=args.seq, batch=args.batch,
                  base_width=args.base_width, eval_every=args.steps, optimizer=args.optimizer)
    if args.smoke:
        widths, base = [32, 64], replace(base, **SMOKE, base_width=32)
        start_exps = {k: v[len(v) // 2: len(v) // 2 + 2] for k, v in start_exps.items()}
    print(f"lr-transfer: {corpus.description}", file=sys.stderr)
    cells = {(p, w): replace(base, parametrization=p, width=w, heads=max(1, w // 64) if not args.smoke else 2,
                             weight_decay=args.mus_weight_decay if p == "mus" else 0.1)
             for p in start_exps for w in widths}
    start = time.perf_counter()
    swept = bracket(cells, {key: start_exps[key[0]] for key in cells}, corpus, args.jobs,
                    max_extra=0 if args.smoke else 4, progress=False)
    runs = [{"parametrization": p, "width": w, "lr": r["recipe"]["lr"], "final_val_loss": r["final_val_loss"],
             "seconds": r["seconds"]} for (p, w), rs in swept.items() for r in rs]
    optimal = {p: {str(w): best(swept[(p, w)])["recipe"]["lr"] for w in widths} for p in start_exps}
    interpolated = {p: {str(w): interpolated_optimum(swept[(p, w)]) for w in widths} for p in start_exps}
    shift = {p: _log2(max(o.values())) - _log2(min(o.values())) for p, o in optimal.items()}
    result = {"benchmark": "lr-transfer", **environment(), "corpus": corpus.description, "smoke": args.smoke,
              "steps": base.steps, "tokens_per_run": base.steps * base.batch * base.seq, "widths": widths,
              "base_width": base.base_width, "optimal_lr": optimal, "optimal_lr_spread_log2": shift,
              "interpolated_optimal_log2_lr": interpolated, "runs": runs, "seconds": time.perf_counter() - start}
    for p, o in optimal.items():
        print(f"{p:3s} optimal LR per width: " + ", ".join(f"{w}: 2^{_log2(lr):+.0f}" for w, lr in o.items())
              + f"  (spread {shift[p]:.0f} grid steps)")
    publish(result, args.json, args.png, "lr_transfer", headline(result), plot)
    return 0


def headline(result: dict) -> dict:
    """Optimal log2 LR per width per parametrization, and how far each moves over the widths."""
    line = {f"{p}_optimal_log2_lr": {w: _log2(lr) for w, lr in o.items()} for p, o in result["optimal_lr"].items()}
    line.update({f"{p}_spread_log2": s for p, s in result["optimal_lr_spread_log2"].items()})
    return line


def _log2(x: float) -> float:
    import math

    return math.log2(x)


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, parametrization in zip(axes, ("sp", "mus")):
        for width in result["widths"]:
            points = sorted((r["lr"], r["final_val_loss"]) for r in result["runs"]
                            if r["parametrization"] == parametrization and r["width"] == width)
            if points:
                ax.plot(*zip(*points), marker="o", label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_title({"sp": "standard parametrization", "mus": "μS (munit.unit_scale)"}[parametrization])
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation loss after {result['steps']} steps")
    axes[1].legend()
    fig.suptitle(f"lr-transfer: {result['machine']}, commit {result['commit']}", fontsize=9)
    save_figure(fig, path)
