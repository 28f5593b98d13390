"""`munit inspect`: argument parsing, progress output and the run itself."""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from munit_compile.inspect_cli.common import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE, MLIR_INSTALL_HINT, PLOT_INSTALL_HINT,
                                              PROG, UsageError)
from munit_compile.inspect_cli.schema import report_document
from munit_compile.inspect_cli.targets import load_target
from munit_compile.inspect_cli.table import render_table
from munit_compile.inspect_cli.plot import write_plot
from munit_compile.inspect_cli.mlir import require_torch_mlir, write_mlir


class Progress:
    """Progress lines on stderr: a spinner on a terminal, plain lines otherwise; silent with --quiet."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)

    @contextmanager
    def step(self, what: str):
        if self.quiet:
            yield
            return
        start = time.perf_counter()
        if self.console.is_terminal:
            with self.console.status(what + " …"):
                yield
        else:
            print(f"{PROG}: {what} …", file=sys.stderr, flush=True)
            yield
        self.console.print(f"{PROG}: {what}: done in {time.perf_counter() - start:.1f} s")

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"{PROG}: {text}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would sys.exit(2); main turns this into the exit code
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].strip("`"),
                epilog="TARGET forms, outputs and exit codes: python -c 'import munit_compile.inspect_cli as m; "
                       "help(m)'. Example: munit inspect hf:llama --measure --json r.json --plot r.png")
    p.add_argument("target", metavar="TARGET",
                   help="hf:<model_type> (llama, gpt2, mistral, qwen2, ...), builtin:gpt, package.module:factory "
                        "or path/file.py:factory (a callable returning a model or (model, example_inputs))")
    p.add_argument("--batch", type=int, default=4, help="example batch size (default 4)")
    p.add_argument("--seq", type=int, default=32, help="example sequence length (default 32)")
    p.add_argument("--layers", type=int, help="hf:/builtin: layers (default 2)")
    p.add_argument("--hidden", type=int, help="hf:/builtin: hidden size (default 64)")
    p.add_argument("--heads", type=int, help="hf:/builtin: attention heads (default 4; KV heads heads/2)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default 320; a factory's model: its embedding's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the token ids (default 0)")
    p.add_argument("--measure", action="store_true", help="run one forward/backward; measured σ next to predicted")
    p.add_argument("--unit-scale", action="store_true", help="inspect munit.unit_scale(model) (μS): FP8 scales 1")
    p.add_argument("--only", choices=("gemms", "all"), default="gemms", help="table rows (default gemms)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (every row; schema in the module)")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG of predicted vs measured σ per GEMM operand "
                                                      "with the FP8 ranges (implies --measure)")
    p.add_argument("--mlir", metavar="FILE", help=f"export the planned graph (forward+backward) in torch-mlir's "
                                                  f"torch dialect ({MLIR_INSTALL_HINT})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--traceback", action="store_true", help="print the full traceback when the analysis fails")
    return p


def validate_args(args) -> None:
    """UsageError for values no run can use, before anything is built."""
    for flag in ("batch", "seq", "layers", "hidden", "heads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be a positive integer, got {value}")
    if args.vocab is not None and args.vocab < 2:
        raise UsageError(f"--vocab must be at least 2, got {args.vocab}")
    for flag in ("json", "plot", "mlir"):
        path = getattr(args, flag)
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"--{flag} {path}: folder {str(Path(path).resolve().parent)!r} does not exist")
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise UsageError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(f"--plot needs matplotlib: {PLOT_INSTALL_HINT}") from None
    if args.mlir is not None:
        require_torch_mlir()


def run(args) -> int:
    """Build, analyse and report (after validate_args); UsageError for a bad target, other errors propagate."""
    import munit_compile as munit

    progress = Progress(args.quiet)
    measure = args.measure or args.plot is not None
    if args.plot is not None and not args.measure:
        progress.note("--plot compares predicted with measured σ: measuring one forward/backward")
    torch.manual_seed(args.seed)
    with progress.step(f"building {args.target}"):
        target = load_target(args)
    progress.note(target.description)
    if args.unit_scale:
        with progress.step("unit scaling (munit.unit_scale: μS parametrization)"):
            target.model = munit.unit_scale(target.model, target.args, target.kwargs)
    what = "capturing the graph, analysing" + (" and measuring one forward/backward" if measure else "")
    with progress.step(what):
        torch._dynamo.reset()  # a fresh capture even if this process inspected a model of the same class
        report = munit.inspect(target.model, *target.args, measure=measure, **target.kwargs)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 250, highlight=False, markup=False, emoji=False)
    title = f"munit inspect {target.description}" + (" after unit_scale" if args.unit_scale else "")
    render_table(report, args.only, console, title)
    if args.json is not None:
        options = {"batch": args.batch, "seq": args.seq, "measure": measure, "unit_scale": args.unit_scale}
        if target.sizes:
            options["model"] = target.sizes
        doc = report_document(report, args.target, options)
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False))
        progress.note(f"wrote {args.json} (schema: munit_compile.inspect_cli.JSON_SCHEMA)")
    if args.plot is not None:
        with progress.step(f"plotting {args.plot}"):
            write_plot(report, args.plot, title)
    if args.mlir is not None:
        counts = write_mlir(target, args.mlir, progress)
        progress.note(f"wrote {args.mlir}: {counts['f8E4M3FN']} casts to f8E4M3FN, {counts['f8E5M2']} to f8E5M2")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`munit inspect ...`: 0 ok, 2 bad arguments or target, 1 the analysis failed."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        validate_args(args)
        return run(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # the model, the capture or the analysis failed
        if args.traceback:
            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{PROG}: failed: {type(err).__name__}: {first}" +
              ("" if args.traceback else " (--traceback shows where)"), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
