"""report: regenerate benchmarks/README.md's results section and plots from results/history.jsonl.

    python -m benchmarks report        # rewrites the text between the README's report markers

For each benchmark and machine, the latest history entry gives a table row (its headline numbers, commit
and date); where that entry's full JSON is in results/, the benchmark's own plot is redrawn from it.
For each benchmark with entries on several commits, a trend plot of its headline numbers over time
(results/trend_<benchmark>.png). Everything outside the markers is left as written.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from benchmarks.common import HISTORY, pyplot, read_history, save_figure

README = os.path.join(os.path.dirname(__file__), "README.md")
RESULTS = os.path.dirname(HISTORY)
BEGIN, END = "<!-- report:begin (python -m benchmarks report) -->", "<!-- report:end -->"


def latest(history: list[dict]) -> dict[tuple[str, str], dict]:
    """(benchmark, machine) -> its newest non-smoke entry (history is in append order)."""
    newest: dict[tuple[str, str], dict] = {}
    for entry in history:
        if not entry.get("smoke"):
            newest[(entry["benchmark"], entry["machine"])] = entry
    return newest


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format(v)}" for k, v in value.items())
    return str(value)


def table(newest: dict[tuple[str, str], dict]) -> str:
    lines = ["| benchmark | machine | commit | date | headline |", "|---|---|---|---|---|"]
    for (benchmark, machine), entry in sorted(newest.items()):
        headline = "<br>".join(f"{k} = {_format(v)}" for k, v in entry["headline"].items())
        lines.append(f"| `{benchmark}` | {machine} | {entry['commit']} | {entry['date'][:10]} | {headline} |")
    return "\n".join(lines)


def redraw(entry: dict, results: str, draw: bool = True) -> str | None:
    """Redraw the entry's own plot from its JSON (if kept in results/); returns the PNG's path
    (`draw=False`: only the path it would write)."""
    from benchmarks.__main__ import BENCHMARKS

    json_path = os.path.join(results, entry["json"]) if entry.get("json") else None
    module_name = BENCHMARKS.get(entry["benchmark"], (None,))[0]
    if not json_path or not os.path.exists(json_path) or module_name is None:
        return None
    module = importlib.import_module(module_name)
    if not hasattr(module, "plot"):
        return None
    with open(json_path) as f:
        result = json.load(f)
    png = os.path.splitext(json_path)[0] + ".png"
    if draw:
        module.plot(result, png)
    return png


def trend(history: list[dict], benchmark: str, machine: str, results: str, draw: bool = True) -> str | None:
    """A plot of each numeric headline value of `benchmark` on `machine` over its entries; its path."""
    entries = [e for e in history if e["benchmark"] == benchmark and e["machine"] == machine and not e.get("smoke")]
    keys = [k for k, v in entries[-1]["headline"].items() if isinstance(v, (int, float))] if entries else []
    if len({e["commit"] for e in entries}) < 2 or not keys:
        return None
    path = os.path.join(results, f"trend_{benchmark}.png")
    if not draw:
        return path
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for key in keys:
        points = [(i, e["headline"][key]) for i, e in enumerate(entries) if isinstance(e["headline"].get(key), (int, float))]
        ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xticks(range(len(entries)), [f"{e['commit']}\n{e['date'][5:10]}" for e in entries], fontsize=7)
    ax.set_title(f"{benchmark} on {machine}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path


def section(history: list[dict], results: str, readme_dir: str, draw: bool = True) -> str:
    newest = latest(history)
    if not newest:
        return "No results recorded yet: run a benchmark without --smoke."
    parts = ["Latest result per benchmark and machine (from `results/history.jsonl`):", "", table(newest)]
    figures = []
    for (benchmark, machine), entry in sorted(newest.items()):
        for path in (redraw(entry, results, draw), trend(history, benchmark, machine, results, draw)):
            if path:
                figures.append(f"![{benchmark}]({os.path.relpath(path, readme_dir)})")
    return "\n".join(parts + ([""] + figures if figures else []))


def rewrite_readme(text: str, generated: str, path: str = README) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no report markers; add the lines {BEGIN!r} and {END!r} where the results go")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{generated}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__.splitlines()[0])
    parser.add_argument("--history", default=None, help="history file (default: results/history.jsonl)")
    parser.add_argument("--readme", default=README)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date; write nothing")
    args = parser.parse_args(argv)
    history = read_history(args.history)
    with open(args.readme) as f:
        text = f.read()
    results = os.path.dirname(os.path.abspath(args.history)) if args.history else RESULTS
    updated = rewrite_readme(text, section(history, results, os.path.dirname(os.path.abspath(args.readme)),
                                           draw=not args.check), args.readme)
    if args.check:
        return 0 if updated == text else 1
    with open(args.readme, "w") as f:
        f.write(updated)
    print(f"wrote {args.readme} ({len(latest(history))} benchmark/machine results)", file=sys.stderr)
    return 0
