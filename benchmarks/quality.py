"""quality: does μS + static FP8 train as well as a standard BF16 baseline, at equal tokens?

Three runs of the built-in GPT on the same data in the same order: sp_bf16 (standard init, pre-LN,
AdamW: the baseline), mus_bf16 (`munit.unit_scale` + `munit.optim`) and mus_fp8 (the same, compiled with
the munit backend). sp and mus each get their own best LR from a sweep over powers of two (a fair
comparison tunes both); mus_fp8 uses mus_bf16's. Writes JSON and a PNG of the validation curves.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from benchmarks.common import benchmark_parser, environment, publish, pyplot, save_figure
from benchmarks.sweep import best, bracket
from benchmarks.training import Recipe, load_corpus, train

# CI's quality gate on the smoke run (deterministic on one machine; tiny, so loose): mus_fp8 may not be
# worse than the BF16 baseline by more than 3 %, nor than its own BF16 run by more than 1 %.
SMOKE_TOLERANCE = {"mus_fp8_vs_sp_bf16": 0.03, "mus_fp8_vs_mus_bf16": 0.01}
SMOKE = dict(width=64, layers=2, heads=2, seq=32, batch=8, steps=30, eval_every=10, base_width=64)


def parse_exponents(text: str) -> list[int]:
    """'-12,-10,-8' -> [-12, -10, -8]: learning rates as exponents of two."""
    try:
        return [int(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise ValueError(f"LR grid must be integer exponents of two separated by commas, e.g. '-10,-9,-8'; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("quality", __doc__, "a tiny model for 30 steps: checks the plumbing only")
    p.add_argument("--corpus", help="text file (default ../shared/data/shakespeare.txt; held-out works = validation)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel (processes, one thread each)")
    p.add_argument("--skip-fp8", action="store_true", help="only the BF16 sweeps (recipe exploration)")
    p.add_argument("--sp-lrs", default="-11,-10,-9", help="SP LR exponents of 2 to start from (extended until the best is bracketed)")
    p.add_argument("--mus-lrs", default="-6,-5,-4", help="μS LR exponents of 2 to start from (extended until bracketed)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "lion"), help="μS optimizer")
    p.add_argument("--mus-weight-decay", type=float, default=1e-4, help="μS decoupled decay per step")
    p.add_argument("--tau", type=float, default=None, help="μS residual τ (default: from depth)")
    p.add_argument("--attention-scale", default="model", choices=("model", "1/d"), help="μS attention logit scale")
    p.add_argument("--no-qk-norm", dest="qk_norm", action="store_false", help="μS without LayerNorm on q and k")
    p.add_argument("--norm-placement", default="res_post", choices=("res_post", "pre"), help="μS norm placement")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    corpus = load_corpus(args.corpus)
    base = Recipe(width=args.width, layers=args.layers, steps=args.steps, base_width=args.width, seq=args.seq,
                  batch=args.batch, heads=max(1, args.width // 64))
    sp_exps, mus_exps = parse_exponents(args.sp_lrs), parse_exponents(args.mus_lrs)
    if args.smoke:
        base = replace(base, **SMOKE)
        sp_exps, mus_exps = sp_exps[-1:], mus_exps[-1:]
    print(f"quality: {corpus.description}", file=sys.stderr)
    start = time.perf_counter()
    sp = replace(base, parametrization="sp", precision="bf16")
    mus = replace(base, parametrization="mus", precision="bf16", optimizer=args.optimizer,
                  weight_decay=args.mus_weight_decay, tau=args.tau, attention_scale=args.attention_scale,
                  norm_placement=args.norm_placement, qk_norm=args.qk_norm)
    swept = bracket({"sp": sp, "mus": mus}, {"sp": sp_exps, "mus": mus_exps}, corpus, args.jobs,
                    max_extra=0 if args.smoke else 4)
    sp_runs, mus_runs = swept["sp"], swept["mus"]
    sp_best, mus_best = best(sp_runs), best(mus_runs)
    runs = {"sp_bf16": sp_best, "mus_bf16": mus_best}
    if not args.skip_fp8:
        runs["mus_fp8"] = train(replace(mus, precision="fp8", lr=mus_best["recipe"]["lr"]), corpus)
    result = {
        "benchmark": "quality", **environment(), "corpus": corpus.description, "smoke": args.smoke,
        "seconds": time.perf_counter() - start,
        "runs": {name: {"final_val_loss": r["final_val_loss"], "tokens": r["tokens"], "lr": r["recipe"]["lr"],
                        "curve": r["curve"], "seconds": r["seconds"]} for name, r in runs.items()},
        "sweeps": {"sp_bf16": _sweep(sp_runs), "mus_bf16": _sweep(mus_runs)},
        "recipe": {k: v for k, v in mus_best["recipe"].items() if k not in ("lr", "parametrization", "precision")},
    }
    for name, r in result["runs"].items():
        print(f"{name:9s} lr {r['lr']:.3g}  final val loss {r['final_val_loss']:.4f}  ({r['tokens']:,} tokens)")
    if "mus_fp8" in runs:
        sp_loss = runs["sp_bf16"]["final_val_loss"]
        result["mus_fp8_vs_sp_bf16"] = runs["mus_fp8"]["final_val_loss"] / sp_loss - 1
        result["mus_fp8_vs_mus_bf16"] = runs["mus_fp8"]["final_val_loss"] / runs["mus_bf16"]["final_val_loss"] - 1
        print(f"mus_fp8 vs sp_bf16 {result['mus_fp8_vs_sp_bf16']:+.2%}, vs mus_bf16 {result['mus_fp8_vs_mus_bf16']:+.2%}")
    publish(result, args.json, args.png, "quality", headline(result), plot)
    failures = regressions(result) if args.smoke else []
    for failure in failures:
        print(f"quality regression: {failure}", file=sys.stderr)
    return 1 if failures else 0


def regressions(result: dict, tolerance: dict[str, float] = SMOKE_TOLERANCE) -> list[str]:
    """The FP8 gaps beyond `tolerance` (relative loss increase), each as a message; [] when within."""
    return [f"{key} = {result[key]:+.2%} exceeds +{limit:.0%}" for key, limit in tolerance.items()
            if key in result and not result[key] <= limit]


def headline(result: dict) -> dict:
    """The numbers the history tracks: each run's final loss and LR, and the FP8 gaps."""
    line = {f"{name}_loss": r["final_val_loss"] for name, r in result["runs"].items()}
    line.update({f"{name}_lr": r["lr"] for name, r in result["runs"].items()})
    line.update({k: result[k] for k in ("mus_fp8_vs_sp_bf16", "mus_fp8_vs_mus_bf16") if k in result})
    return line


def _sweep(runs: list[dict]) -> list[dict]:
    return [{"lr": r["recipe"]["lr"], "final_val_loss": r["final_val_loss"]} for r in runs]


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in result["runs"].items():
        steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot([s * r["tokens"] / max(steps[-1], 1) / 1e6 for s in steps], losses, marker=".",
                label=f"{name} (lr {r['lr']:.3g}): {r['final_val_loss']:.3f}")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("validation loss (held-out works)")
    ax.set_title(f"quality: {result['machine']}, commit {result['commit']}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
