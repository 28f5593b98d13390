"""Train the built-in GPT twice from one init (eager fp32, then compiled) and compare.

`main(argv)` is the CLI (returns 0, or 2 on bad arguments); `run_demo(...)` returns
the results as a dict. The corpus is the pydoc topic text shipped with every Python.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from typing import Callable, TextIO

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from munit_compile.models import GPT, GPTConfig

VOCAB_SIZE = 256  # byte-level tokens
VAL_FRACTION = 0.1
EVAL_BATCHES = 8
LOSS_WINDOW = 10  # "final train loss" is the mean over this many last steps
GEMM_OP_NAMES = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"})
MUNIT_OP_PREFIX = "munit::fp8"
MUNIT_FORWARD_LINEAR = "munit::fp8_linear"


def load_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train, val) int64 byte tensors of the pydoc topics text; val is the last 10%."""
    from pydoc_data.topics import topics

    data = torch.frombuffer(bytearray("".join(topics.values()).encode("utf-8")), dtype=torch.uint8)
    split = int(len(data) * (1.0 - VAL_FRACTION))
    return data[:split].long(), data[split:].long()


def make_batch(data: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (inputs, next-token targets), each (len(starts), seq), read from `data` at `starts`."""
    windows = data[starts[:, None] + torch.arange(seq + 1)]
    return windows[:, :-1], windows[:, 1:]


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of `peak`."""
    warmup = max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class ProgressBar:
    """One status line on `stream`, redrawn in place with carriage returns."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.label, self.total, self.width = label, total, width
        self.stream = stream if stream is not None else sys.stderr
        self.last_draw = 0.0
        self.last_len = 0

    def update(self, step: int, loss: float, tokens_per_s: float, eta_s: float, note: str = "") -> None:
        now = time.perf_counter()
        if step < self.total and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        filled = self.width * step // self.total
        bar = "#" * filled + "." * (self.width - filled)
        eta = f"{int(eta_s) // 60}:{int(eta_s) % 60:02d}" if math.isfinite(eta_s) else "?"
        line = (f"{self.label} [{bar}] {step}/{self.total} loss {loss:.3f} "
                f"| {tokens_per_s:,.0f} tok/s | ETA {eta}{note}")
        self.stream.write("\r" + line.ljust(self.last_len))  # pad over a longer previous line
        self.last_len = len(line)
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, batch: int, seq: int) -> float:
    """Mean loss over EVAL_BATCHES fixed, evenly spaced validation batches."""
    was_training = model.training
    model.eval()
    offsets = torch.linspace(0, len(val) - seq - 1, EVAL_BATCHES * batch).long()
    losses = [model(*make_batch(val, chunk, seq))[1].item() for chunk in offsets.split(batch)]
    model.train(was_training)
    return sum(losses) / len(losses)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One forward/backward/AdamW update; returns the training loss."""
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)


def train(
    label: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_for_step: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    eval_fn: Callable[[], float],
    eval_every: int,
    progress: bool,
) -> dict:
    """Run `steps` training steps; throughput excludes step 1 (compilation) and evaluation."""
    bar = ProgressBar(label, steps) if progress else None
    losses: list[float] = []
    val_loss = float("nan")
    first_step_s = steady_s = 0.0
    tokens_per_step = 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x, y = batch_for_step(step)
        tokens_per_step = x.numel()
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, x, y))
        elapsed = time.perf_counter() - start
        if step == 0:
            first_step_s = elapsed
        else:
            steady_s += elapsed
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            val_loss = eval_fn()
        if bar:
            tokens_per_s = step * tokens_per_step / steady_s if steady_s else 0.0
            eta_s = (steps - step - 1) * steady_s / step if step else float("inf")
            note = f" | val {val_loss:.3f}" if math.isfinite(val_loss) else ""
            bar.update(step + 1, losses[-1], tokens_per_s, eta_s, note)
    val_loss = eval_fn()
    if bar:
        bar.update(steps, losses[-1], tokens_per_s, 0.0, f" | val {val_loss:.3f}")
        bar.close()
    window = losses[-LOSS_WINDOW:]
    return {
        "losses": losses,
        "train_loss": sum(window) / len(window),
        "val_loss": val_loss,
        "tokens_per_s": (steps - 1) * tokens_per_step / steady_s if steady_s else float("nan"),
        "first_step_s": first_step_s,
    }


def count_gemms(step_fn: Callable[[], object]) -> dict:
    """Profile one call of `step_fn` on CPU and count its GEMM-like operator calls.

    Counting rule: a GEMM is an event named in GEMM_OP_NAMES or starting with
    MUNIT_OP_PREFIX that has no such event among its ancestors, i.e. only the
    outermost call. aten::linear dispatches to aten::addmm/aten::matmul->aten::mm,
    and a munit op may call aten GEMMs internally; counting outermost calls counts
    each logical GEMM exactly once whether or not a wrapper op is present.
    """

    def is_gemm(name: str) -> bool:
        return name in GEMM_OP_NAMES or name.startswith(MUNIT_OP_PREFIX)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_fn()
    outermost = []
    for event in prof.events():
        if not is_gemm(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not is_gemm(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            outermost.append(event.name)
    return {
        "fp8_forward_linears": sum(name == MUNIT_FORWARD_LINEAR for name in outermost),
        "munit_gemms": sum(name.startswith(MUNIT_OP_PREFIX) for name in outermost),
        "total_gemms": len(outermost),
    }


def run_demo(
    steps: int = 500,
    batch: int = 16,
    seq: int = 64,
    d_model: int = 128,
    layers: int = 4,
    heads: int = 4,
    lr: float = 3e-3,
    seed: int = 0,
    backend: str = "munit",
    eval_every: int = 100,
    progress: bool = True,
) -> dict:
    """Train eager fp32 and `torch.compile(backend=backend)` copies of one GPT init on the
    same batches; return losses, throughput and per-step GEMM counts as a flat dict."""
    wall_start = time.perf_counter()
    train_data, val_data = load_corpus()
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB_SIZE, seq_len=seq, n_layer=layers, n_head=heads, d_model=d_model)
    eager_model = GPT(config)
    compiled_source = copy.deepcopy(eager_model)  # identical init for both runs

    # One batch order for both runs, plus one extra batch for the profiled step.
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train_data) - seq - 1, (steps + 1, batch), generator=generator)

    def batch_for_step(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(train_data, starts[step], seq)

    def run(label: str, model: nn.Module) -> tuple[dict, torch.optim.Optimizer]:
        optimizer = make_optimizer(model, lr)
        eval_fn = lambda: evaluate(model, val_data, batch, seq)  # noqa: E731
        result = train(label, model, optimizer, batch_for_step, steps, lr, eval_fn, eval_every, progress)
        return result, optimizer

    eager, _ = run("eager", eager_model)
    compiled_model = torch.compile(compiled_source, backend=backend)
    compiled, compiled_optimizer = run(backend, compiled_model)

    # One extra step (after all measurements) to count the GEMMs the backend actually ran.
    gemms = count_gemms(lambda: train_step(compiled_model, compiled_optimizer, *batch_for_step(steps)))

    def gap_pct(ours: float, base: float) -> float:
        return 100.0 * (ours - base) / base

    return {
        "backend": backend,
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "parameters": eager_model.num_parameters(),
        "eager_losses": eager["losses"],
        "munit_losses": compiled["losses"],
        "eager_train_loss": eager["train_loss"],
        "munit_train_loss": compiled["train_loss"],
        "train_gap_pct": gap_pct(compiled["train_loss"], eager["train_loss"]),
        "eager_val_loss": eager["val_loss"],
        "munit_val_loss": compiled["val_loss"],
        "val_gap_pct": gap_pct(compiled["val_loss"], eager["val_loss"]),
        "eager_tokens_per_s": eager["tokens_per_s"],
        "munit_tokens_per_s": compiled["tokens_per_s"],
        "speed_ratio": compiled["tokens_per_s"] / eager["tokens_per_s"],
        "eager_first_step_s": eager["first_step_s"],
        "munit_first_step_s": compiled["first_step_s"],
        **gemms,
        "wall_s": time.perf_counter() - wall_start,
    }


def format_table(results: dict) -> str:
    """Render `run_demo` results as a fixed-width text table."""
    name = results["backend"]
    rows = [
        ("", "eager fp32", name, f"{name} vs eager"),
        ("steps", results["steps"], results["steps"], ""),
        (f"train loss (mean last {LOSS_WINDOW})", f"{results['eager_train_loss']:.4f}",
         f"{results['munit_train_loss']:.4f}", f"{results['train_gap_pct']:+.2f}%"),
        (f"val loss ({EVAL_BATCHES} batches)", f"{results['eager_val_loss']:.4f}",
         f"{results['munit_val_loss']:.4f}", f"{results['val_gap_pct']:+.2f}%"),
        ("tokens/s (after step 1)", f"{results['eager_tokens_per_s']:,.0f}",
         f"{results['munit_tokens_per_s']:,.0f}", f"{results['speed_ratio']:.2f}x"),
        ("step 1 seconds (incl. compile)", f"{results['eager_first_step_s']:.1f}",
         f"{results['munit_first_step_s']:.1f}", ""),
        ("fp8 forward linears / step", "", results["fp8_forward_linears"], ""),
        ("munit fp8 GEMMs / step (fwd+bwd)", "", results["munit_gemms"], ""),
        ("all GEMMs / step", "", results["total_gemms"], ""),
    ]
    widths = [max(len(str(row[col])) for row in rows) for col in range(4)]
    lines = ["  ".join(str(cell).ljust(w) if col == 0 else str(cell).rjust(w)
                       for col, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"({results['parameters']:,} parameters, batch {results['batch']} x seq {results['seq']}, "
                 f"wall time {results['wall_s']:.0f} s)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="munit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps per run")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and batch order")
    parser.add_argument("--backend", default="munit", help="torch.compile backend for the second run")
    parser.add_argument("--eval-every", type=int, default=100, help="validate every N steps (0: only at end)")
    return parser


def validate_args(args: argparse.Namespace) -> str | None:
    """Return an error message for unusable arguments, or None."""
    for name in ("steps", "batch", "seq", "d_model", "layers", "heads"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.eval_every < 0:
        return f"--eval-every must be >= 0, got {args.eval_every}"
    if not (math.isfinite(args.lr) and args.lr > 0):
        return f"--lr must be a positive number, got {args.lr}"
    if args.d_model % args.heads:
        return f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})"
    max_seq = len(load_corpus()[1]) // (EVAL_BATCHES * 2)
    if args.seq > max_seq:
        return f"--seq must be <= {max_seq} for this corpus, got {args.seq}"
    try:
        torch._dynamo.lookup_backend(args.backend)
    except torch._dynamo.exc.InvalidBackend:
        available = ", ".join(torch._dynamo.list_backends(exclude_tags=()))
        return f"unknown --backend {args.backend!r} (available: {available})"
    return None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run the demo and print the comparison table; 2 on bad arguments."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage and the error
        return exit_.code if isinstance(exit_.code, int) else 2
    error = validate_args(args)
    if error:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    results = run_demo(
        steps=args.steps, batch=args.batch, seq=args.seq, d_model=args.d_model, layers=args.layers,
        heads=args.heads, lr=args.lr, seed=args.seed, backend=args.backend, eval_every=args.eval_every,
    )
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
