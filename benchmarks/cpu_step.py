"""cpu-step: steady-state training-step time on CPU, munit vs eager vs Inductor, as ratios.

One model (the quality benchmark's: built-in GPT, 4 layers, d 256, seq 128, batch 16, byte vocabulary),
BF16 autocast, AdamW; a step = forward, backward, optimizer step. Four variants of the same model:
eager, `torch.compile(backend="inductor")`, and `torch.compile(backend="munit")` with and without the
fusion pass (`Config(fuse=False)`), whose hidden GEMMs run the reference FP8 path (exact FP8 rounding
emulated in fp32: this is what munit costs on a machine without FP8 hardware, not a speed claim; on CPU
the fused backward's recomputed pre-activation is one more emulated GEMM, which a GPU epilogue makes
cheap). After warm-up, the variants take turns step by step and each
reports its median; only ratios measured in this one run are meaningful.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import munit_compile as munit
from benchmarks.common import benchmark_parser, environment, record
from munit_compile.models import GPT, GPTConfig

VARIANTS = ("eager", "inductor", "munit", "munit_unfused")


def build(variant: str, config: GPTConfig):
    torch.manual_seed(0)
    model = GPT(config)
    runner = {"eager": lambda m: m, "inductor": lambda m: torch.compile(m, backend="inductor"),
              "munit": lambda m: torch.compile(m, backend=munit.backend(munit.Config())),
              "munit_unfused": lambda m: torch.compile(m, backend=munit.backend(munit.Config(fuse=False)))}[variant](model)
    return runner, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(runner, optimizer, x, y) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = runner(x, y)[1]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def headline(result: dict) -> dict:
    return dict(result["ratios"])


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("cpu-step", __doc__, "a tiny model, 2 timed steps", plot=False)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.layers, args.seq, args.batch, args.steps, args.warmup = 64, 1, 32, 2, 2, 1
    config = GPTConfig(vocab_size=256, seq_len=args.seq, n_layer=args.layers, n_head=max(1, args.width // 64),
                       d_model=args.width)
    x = torch.randint(0, 256, (args.batch, args.seq))
    y = torch.randint(0, 256, (args.batch, args.seq))
    print(f"cpu-step: GPT d {args.width}, {args.layers} layers, seq {args.seq}, batch {args.batch}; "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    built = {v: build(v, config) for v in VARIANTS}
    for v in VARIANTS:  # compile and settle
        for _ in range(args.warmup):
            step(*built[v], x, y)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for v in VARIANTS:
            times[v].append(step(*built[v], x, y))
    median = {v: statistics.median(t) for v, t in times.items()}
    result = {"benchmark": "cpu-step", **environment(), "smoke": args.smoke, "threads": torch.get_num_threads(),
              "model": f"GPT d {args.width}, {args.layers} layers, seq {args.seq}, batch {args.batch}",
              "median_step_s": median,
              "ratios": {"munit_vs_eager": median["munit"] / median["eager"],
                         "munit_vs_inductor": median["munit"] / median["inductor"],
                         "inductor_vs_eager": median["inductor"] / median["eager"],
                         "munit_fused_vs_unfused": median["munit"] / median["munit_unfused"]},
              "steps": args.steps}
    for name, r in result["ratios"].items():
        print(f"  {name:18s} {r:.2f}× step time", file=sys.stderr)
    record(result, args.json, headline(result))
    return 0
