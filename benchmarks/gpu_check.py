"""gpu-check: the one prepared script for a lent Hopper GPU — correctness, GEMM microbenchmarks, a step.

    python -m benchmarks gpu-check --json benchmarks/results/gpu_check_<card>.json   # on the GPU
    python -m benchmarks gpu-check --dry-run                                            # plumbing, on CPU

1. GPU tests: the kernel tests (real kernels, bit-exact against the reference) and every `gpu` test.
2. GEMMs at (M, N, K) = (4096,)*3, (8192,)*3, (16384, 4096, 14336), (16384, 14336, 4096): munit's FP8
   GEMM with its fused epilogue (bias, μS multiplier, BF16 out) in both schedules (tiled; persistent with
   TMA loads, checked bit-identical to tiled), each in `gemm_configs.config_for`'s tiles, vs
   `torch._scaled_mm` (bias fused) plus a separate multiplier kernel vs BF16 `torch.mm`; TFLOP/s, ratios.
3. One training step of a ~1B-parameter Llama-shaped model (bf16): backend="munit" vs Inductor; tokens/s.
Writes JSON and a markdown table naming the card. `--dry-run` runs everything tiny on CPU (the Triton
kernels in the interpreter) and times nothing meaningful: it checks that the script itself works.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter

import torch

from benchmarks.common import environment, record

SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 14336), (16384, 14336, 4096)]
DRY_SHAPES = [(64, 48, 80)]
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000)
LLAMA_DRY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=320)


def run_tests(dry_run: bool) -> dict:
    """pytest on the kernel tests and every gpu-marked test; on a dry run only collects them."""
    command = [sys.executable, "-m", "pytest", "-q", "tests/test_triton_kernels.py", "tests/test_triton_persistent.py",
               "-m", "gpu or not gpu",
               "-p", "no:cacheprovider"] + (["--collect-only"] if dry_run else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return {"command": " ".join(command[2:]), "returncode": done.returncode, "summary": tail[0],
            "seconds": time.perf_counter() - start}


def _time(fn, device: str, repeats: int) -> float:
    """Median seconds per call (CUDA: triton's do_bench with warmup; CPU: a few plain calls)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gemm_benchmarks(shapes, device: str) -> list[dict]:
    from munit_compile.codegen.triton import fp8_gemm

    rows = []
    for M, N, K in shapes:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(M, K, generator=gen).to(device, torch.bfloat16)
        b_t = torch.randn(N, K, generator=gen).to(device, torch.bfloat16)
        bias = torch.randn(N, generator=gen).to(device, torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b_t.to(torch.float8_e4m3fn)
        alpha = K ** -0.5
        one = torch.ones((), device=device)
        munit = lambda: fp8_gemm.scaled_mm(a8, b8, 1.0, bias, alpha, torch.bfloat16)  # noqa: E731
        persistent = lambda: fp8_gemm.scaled_mm(a8, b8, 1.0, bias, alpha, torch.bfloat16,  # noqa: E731
                                                schedule="persistent")
        flops = 2 * M * N * K
        row = {"M": M, "N": N, "K": K, "munit_s": _time(munit, device, 3),
               "munit_persistent_s": _time(persistent, device, 3),
               "persistent_equals_tiled": bool(torch.equal(munit(), persistent()))}
        if device == "cuda":
            scaled = lambda: torch._scaled_mm(a8, b8.t(), one, one, bias=bias, out_dtype=torch.bfloat16)  # noqa: E731
            row["scaled_mm_s"] = _time(scaled, device, 3)
            row["scaled_mm_plus_epilogue_s"] = _time(lambda: scaled() * alpha, device, 3)
            row["bf16_mm_s"] = _time(lambda: a @ b_t.t(), device, 3)
            expected = (torch._scaled_mm(a8, b8.t(), one, one, bias=bias, out_dtype=torch.float32) * alpha)
            row["max_rel_diff_vs_scaled_mm"] = ((munit().float() - expected).abs().max() / expected.abs().max()).item()
        for key in [k for k in row if k.endswith("_s")]:
            row[key.replace("_s", "_tflops")] = flops / row[key] / 1e12
        row["persistent_vs_tiled"] = row["munit_s"] / row["munit_persistent_s"]
        if "scaled_mm_s" in row:
            row["munit_vs_scaled_mm"] = row["scaled_mm_s"] / row["munit_s"]
            row["munit_vs_scaled_mm_plus_epilogue"] = row["scaled_mm_plus_epilogue_s"] / row["munit_s"]
            row["munit_vs_bf16"] = row["bf16_mm_s"] / row["munit_s"]
        rows.append(row)
        print(f"  GEMM {M}x{N}x{K}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k.endswith(("tflops", "vs_scaled_mm", "vs_bf16", "vs_tiled"))))
    return rows


def training_step(config: dict, batch: int, seq: int, device: str, steps: int) -> dict:
    """Steady-state tokens/s of forward+backward+SGD step, munit backend vs Inductor, bf16 Llama."""
    import munit_compile as munit
    from transformers import LlamaConfig, LlamaForCausalLM

    results = {}
    for name, backend in (("inductor", "inductor"), ("munit", munit.backend(munit.Config()))):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=seq)).to(device, torch.bfloat16)
        model.loss_type = "ForCausalLM"
        compiled = torch.compile(model, backend=backend)
        ids = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        step()  # compile
        first = time.perf_counter() - start
        seconds = _time(step, device, steps)
        results[name] = {"first_step_s": first, "step_s": seconds, "tokens_per_s": batch * seq / seconds,
                         "parameters": sum(p.numel() for p in model.parameters())}
        if name == "munit":  # what the step ran: FP8 GEMMs and the fusions (passes/fuse.py) in its graphs
            reports = backend.reports
            results[name]["gemms_fp8"] = sum(r.gemms_fp8 for r in reports)
            results[name]["fusions"] = dict(sum((r.fusions for r in reports), Counter()))
        print(f"  step {name}: {results[name]['tokens_per_s']:.0f} tokens/s (first step {first:.0f} s)")
        del model, compiled, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    results["munit_vs_inductor"] = results["munit"]["tokens_per_s"] / results["inductor"]["tokens_per_s"]
    return results


def markdown(result: dict) -> str:
    lines = [f"# gpu-check on {result['machine']} (commit {result['commit']}, {result['date']})", "",
             f"tests: {result['tests']['summary']}", "",
             "| M×N×K | munit TFLOP/s | persistent | _scaled_mm | _scaled_mm + epilogue | bf16 mm | munit vs _scaled_mm "
             "| vs + epilogue | vs bf16 | persistent vs tiled |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["gemms"]:
        get = lambda k: f"{r[k]:.3g}" if k in r else "–"  # noqa: E731
        cells = ["munit_tflops", "munit_persistent_tflops", "scaled_mm_tflops", "scaled_mm_plus_epilogue_tflops",
                 "bf16_mm_tflops", "munit_vs_scaled_mm", "munit_vs_scaled_mm_plus_epilogue", "munit_vs_bf16",
                 "persistent_vs_tiled"]
        lines.append(f"| {r['M']}×{r['N']}×{r['K']} | " + " | ".join(get(k) for k in cells) + " |")
    step = result["training_step"]
    lines += ["", f"training step ({step['munit']['parameters'] / 1e6:.0f} M parameters): munit "
              f"{step['munit']['tokens_per_s']:.0f} tokens/s vs Inductor {step['inductor']['tokens_per_s']:.0f} "
              f"({step['munit_vs_inductor']:.2f}×)"]
    return "\n".join(lines) + "\n"


def headline(result: dict) -> dict:
    """munit's GEMM ratios per shape and the training-step speedup."""
    line = {f"{r['M']}x{r['N']}x{r['K']}_{k}": r[k] for r in result["gemms"]
            for k in ("munit_vs_scaled_mm", "munit_vs_scaled_mm_plus_epilogue", "munit_vs_bf16", "persistent_vs_tiled")
            if k in r}
    line["step_munit_vs_inductor"] = result["training_step"].get("munit_vs_inductor")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result here (and a .md table next to it)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the script's plumbing")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        print("gpu-check: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(f"gpu-check on {environment()['machine']}{' (dry run)' if args.dry_run else ''}", file=sys.stderr)
    result = {"benchmark": "gpu-check", **environment(), "dry_run": args.dry_run, "smoke": args.dry_run}
    result["tests"] = {"summary": "skipped"} if args.skip_tests else run_tests(args.dry_run)
    print(f"  tests: {result['tests']['summary']}")
    result["gemms"] = gemm_benchmarks(DRY_SHAPES if args.dry_run else SHAPES, device)
    config, batch, seq = (LLAMA_DRY, 2, 32) if args.dry_run else (LLAMA_1B, args.batch, args.seq)
    result["training_step"] = training_step(config, batch, seq, device, steps=2 if args.dry_run else 10)
    record(result, args.json, headline(result))
    if args.json:
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(markdown(result))
    print(markdown(result))
    return 0
