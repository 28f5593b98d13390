"""What every benchmark result records about where it ran, and how results are written."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__),
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _code_commit() -> str:
    """The commit this process's code came from, '+dirty' when a .py file under munit_compile/ or
    benchmarks/ had uncommitted changes. Read once, at import: a long benchmark records the code it started with."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    changed = (_git("status", "--porcelain", "--", "../munit_compile", ".") or "").splitlines()
    return commit + ("+dirty" if any(line.rstrip().endswith(".py") for line in changed) else "")


CODE_COMMIT = _code_commit()


def environment() -> dict:
    """git commit (at import), UTC date, machine (CPU model and cores, or the GPU's name), torch and
    triton versions."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"{_cpu_model()}, {os.cpu_count()} cores"
    return {"commit": CODE_COMMIT, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "torch": torch.__version__, "triton": triton_version}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def benchmark_parser(name: str, doc: str, smoke: str, plot: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark shares: --json, --png (where it draws a plot) and --smoke (`smoke`
    says what the tiny version runs)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc.splitlines()[0])
    p.add_argument("--json", help="write the result here" + (" (the plot goes next to it)" if plot else ""))
    if plot:
        p.add_argument("--png", help="where to write the plot")
    p.add_argument("--smoke", action="store_true", help=smoke)
    return p


HISTORY = os.path.join(os.path.dirname(__file__), "results", "history.jsonl")


def history_path() -> str:
    """Where results are appended: $MUNIT_BENCH_HISTORY, else benchmarks/results/history.jsonl."""
    return os.environ.get("MUNIT_BENCH_HISTORY") or HISTORY


def record(result: dict, json_path: str | None, headline: dict) -> None:
    """Write `result` to `json_path` (if given) and append one line to the history: the environment
    fields, the benchmark's `headline` numbers and where the full JSON went. Smoke runs check plumbing,
    not performance: they reach the history only when $MUNIT_BENCH_HISTORY names a file."""
    write_json(result, json_path)
    if result.get("smoke") and not os.environ.get("MUNIT_BENCH_HISTORY"):
        return
    line = {key: result.get(key) for key in ("benchmark", "commit", "date", "machine", "torch", "triton", "smoke")}
    line.update(headline=headline, json=os.path.relpath(json_path, os.path.dirname(HISTORY)) if json_path else None)
    os.makedirs(os.path.dirname(os.path.abspath(history_path())), exist_ok=True)
    with open(history_path(), "a") as f:
        f.write(json.dumps(line) + "\n")


def read_history(path: str | None = None) -> list[dict]:
    path = path or history_path()
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(result: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


def plot_path(json_path: str | None, name: str, explicit: str | None = None) -> str | None:
    """Where a benchmark's PNG goes: --png, else next to --json with the same stem, else nowhere."""
    if explicit:
        return explicit
    return os.path.splitext(json_path)[0] + ".png" if json_path else None


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def publish(result: dict, json_path: str | None, png_path: str | None, name: str, headline: dict, plot) -> None:
    """`record` the result, then draw `plot(result, png)` at --png, else next to the JSON."""
    record(result, json_path, headline)
    png = plot_path(json_path, name, png_path)
    if png:
        plot(result, png)
