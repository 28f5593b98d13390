"""seeds: how much does the final loss vary over seeds, FP8 vs BF16, at each parametrization's best LR?

Runs sp_bf16, mus_bf16 and mus_fp8 with several model seeds (the data order is fixed) and reports the
mean, standard deviation and range of the final validation loss. Best LRs come from a quality result
(--from quality.json) or --sp-lr/--mus-lr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace

from benchmarks.common import benchmark_parser, environment, record
from benchmarks.quality import SMOKE
from benchmarks.training import Recipe, load_corpus, train_all


def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("seeds", __doc__, "a tiny model, 2 seeds, 30 steps: plumbing only", plot=False)
    p.add_argument("--corpus", help="text file (default ../shared/data/shakespeare.txt)")
    p.add_argument("--from", dest="source", help="a quality JSON: take its best LRs, steps and recipe")
    p.add_argument("--sp-lr", type=float, default=2**-10)
    p.add_argument("--mus-lr", type=float, default=2**-5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--base-width", type=int, default=None, help="μS: the width at which hidden LR = lr (default: --width)")
    p.add_argument("--mus-weight-decay", type=float, default=1e-4, help="μS decoupled decay per step")
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel (processes, one thread each)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    corpus = load_corpus(args.corpus)
    base = Recipe(width=args.width, layers=args.layers, steps=args.steps, seq=args.seq, batch=args.batch,
                  heads=max(1, args.width // 64), base_width=args.base_width or args.width, eval_every=args.steps // 4)
    lrs = {"sp": args.sp_lr, "mus": args.mus_lr}
    if args.source:
        with open(args.source) as f:
            quality = json.load(f)
        lrs = {"sp": quality["runs"]["sp_bf16"]["lr"], "mus": quality["runs"]["mus_bf16"]["lr"]}
        recipe = {k: v for k, v in quality["recipe"].items() if k in Recipe.__dataclass_fields__ and k != "seed"}
        base = replace(base, **recipe)
        args.mus_weight_decay = recipe.get("weight_decay", args.mus_weight_decay)
    seeds = list(range(args.seeds))
    if args.smoke:
        base, seeds = replace(base, **SMOKE), [0, 1]
    print(f"seeds: {corpus.description}", file=sys.stderr)
    start, result_runs = time.perf_counter(), {}
    kinds = (("sp_bf16", "sp", "bf16"), ("mus_bf16", "mus", "bf16"), ("mus_fp8", "mus", "fp8"))
    recipes = {name: replace(base, parametrization=parametrization, precision=precision, lr=lrs[parametrization],
                             weight_decay=args.mus_weight_decay if parametrization == "mus" else 0.1)
               for name, parametrization, precision in kinds}
    order = [(name, s) for name, _, _ in reversed(kinds) for s in seeds]  # the slow FP8 runs first: better packing
    trained = train_all([replace(recipes[name], seed=s) for name, s in order], corpus, args.jobs)
    for name, recipe in recipes.items():
        losses = [r["final_val_loss"] for (n, _), r in zip(order, trained) if n == name]
        result_runs[name] = {"lr": recipe.lr, "weight_decay": recipe.weight_decay, "seeds": seeds,
                             "final_val_loss": losses, "mean": statistics.fmean(losses), "std": statistics.pstdev(losses),
                             "range": max(losses) - min(losses)}
        print(f"{name:9s} lr {recipe.lr:.3g}: mean {result_runs[name]['mean']:.4f} ± {result_runs[name]['std']:.4f} "
              f"(range {result_runs[name]['range']:.4f}) over {len(seeds)} seeds")
    result = {"benchmark": "seeds", **environment(), "corpus": corpus.description, "smoke": args.smoke,
              "tokens": base.steps * base.batch * base.seq, "runs": result_runs,
              "recipe": {k: v for k, v in asdict(base).items()
                         if k not in ("lr", "seed", "parametrization", "precision", "weight_decay")},
              "seconds": time.perf_counter() - start}
    record(result, args.json, headline(result))
    return 0


def headline(result: dict) -> dict:
    """Mean and spread (max − min) of the final loss per run type."""
    return {f"{name}_{k}": r[k] for name, r in result["runs"].items() for k in ("mean", "range")}
