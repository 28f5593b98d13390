"""The `munit` command: `munit demo [options]`, `munit inspect TARGET [options]`."""
from __future__ import annotations

import argparse
import sys


def _demo(argv: list[str]) -> int:
    from munit_compile import demo

    return demo.main(argv)


def _inspect(argv: list[str]) -> int:
    from munit_compile import inspect_cli

    return inspect_cli.main(argv)


COMMANDS = {
    "demo": (_demo, "train a small GPT on an embedded corpus: eager baseline vs backend='munit'"),
    "inspect": (_inspect, "predicted vs measured scales and the FP8 plan of a model (table, JSON, plot, MLIR)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="munit", description="munit-compile: static-scaled FP8 training")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"munit: unknown command {argv[0]!r}; choose from {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    run, _ = COMMANDS[argv[0]]
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
