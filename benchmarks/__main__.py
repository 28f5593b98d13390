"""Run one benchmark by name: `python -m benchmarks <name> [options]`; `--list` shows them all."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "analysis-time": ("benchmarks.analysis_time", "variance analysis of a 48-layer d=4096 Llama built on the meta device"),
    "quality": ("benchmarks.quality", "sp_bf16 vs mus_bf16 vs mus_fp8 validation loss at equal tokens, each at its best LR"),
    "lr-transfer": ("benchmarks.lr_transfer", "optimal LR vs width (x8 range), SP vs muS"),
    "gpu-check": ("benchmarks.gpu_check", "on a lent GPU: kernel tests, FP8 GEMM vs _scaled_mm vs bf16, a 1B Llama step (--dry-run on CPU)"),
    "seeds": ("benchmarks.seeds", "spread of final loss over seeds, FP8 vs BF16, at each parametrization's best LR"),
    "compile-time": ("benchmarks.compile_time", "compile + first step, backend=munit vs inductor (ratio; per-pass cost)"),
    "analysis-scaling": ("benchmarks.analysis_scaling", "analysis time vs graph size over depth 6..48 and width (linear fit)"),
    "cpu-step": ("benchmarks.cpu_step", "steady-state CPU training step: munit (emulated FP8) vs eager vs Inductor, ratios"),
    "report": ("benchmarks.report", "regenerate benchmarks/README.md's tables and plots from results/history.jsonl"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        for name, (_, about) in BENCHMARKS.items():
            print(f"{name:16s} {about}")
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        print(f"unknown benchmark {argv[0]!r}; choose from {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
