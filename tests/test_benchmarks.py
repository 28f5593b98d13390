"""Every benchmark's --smoke form runs and writes valid JSON (timings are reported, never asserted)."""
import json
import math

import pytest
from benchmarks import __main__ as harness
from benchmarks import analysis_time


def test_list_names_every_benchmark(capsys):
    assert harness.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert len(harness.BENCHMARKS) >= 4 and all(name in listing for name in harness.BENCHMARKS)
    assert harness.main(["no-such-benchmark"]) == 2


def test_analysis_time_smoke_writes_json(tmp_path):
    out = tmp_path / "analysis.json"
    assert analysis_time.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["gemms_fp8"] == result["gemms_total"] - 1 and result["unknown_ops"] == []
    assert set(result["median_seconds"]) == {"capture", "normalize", "variance", "fp8_plan", "total"}
    assert all(v >= 0 for v in result["median_seconds"].values())


def _png_ok(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_quality_smoke_writes_json_and_plot(tmp_path):
    from benchmarks import quality

    out = tmp_path / "quality.json"
    assert quality.main(["--smoke", "--corpus", str(tmp_path / "absent.txt"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"sp_bf16", "mus_bf16", "mus_fp8"}
    for run in result["runs"].values():
        assert run["tokens"] == 30 * 8 * 32 and 0 < run["final_val_loss"] < 6  # below log(256) = 5.5 + slack
    assert result["runs"]["mus_fp8"]["lr"] == result["runs"]["mus_bf16"]["lr"]
    assert {"commit", "date", "machine", "torch", "triton"} <= set(result)
    assert "pydoc" in result["corpus"]  # the corpus was absent: the built-in fallback text
    assert _png_ok(tmp_path / "quality.png")


def test_lr_transfer_smoke_writes_json_and_plot(tmp_path):
    from benchmarks import lr_transfer

    out = tmp_path / "lr.json"
    assert lr_transfer.main(["--smoke", "--corpus", str(tmp_path / "absent.txt"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["optimal_lr"]) == {"sp", "mus"} and len(result["runs"]) == 2 * 2 * 2
    assert all(str(w) in result["optimal_lr"]["mus"] for w in result["widths"])
    assert _png_ok(tmp_path / "lr.png")


def test_seeds_smoke_writes_json(tmp_path):
    from benchmarks import seeds

    out = tmp_path / "seeds.json"
    assert seeds.main(["--smoke", "--corpus", str(tmp_path / "absent.txt"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for run in result["runs"].values():
        assert len(run["final_val_loss"]) == 2 and run["std"] >= 0 and run["range"] >= 0


def test_gpu_check_dry_run_writes_json_and_markdown(tmp_path):
    from benchmarks import gpu_check

    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry-run", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["tests"]["returncode"] == 0 and "collected" in result["tests"]["summary"]
    assert result["gemms"] and all(r["munit_tflops"] > 0 for r in result["gemms"])
    step = result["training_step"]
    assert step["munit"]["tokens_per_s"] > 0 and step["inductor"]["tokens_per_s"] > 0
    # the dry Llama (2 layers) ran fused: SwiGLU gate, residual adds, shared FP8 inputs, FP8 output for down
    assert step["munit"]["gemms_fp8"] == 14
    assert step["munit"]["fusions"] == {"fp8_input": 8, "gemm_activation": 2, "gemm_gate": 2, "gemm_residual": 4,
                                        "gemm_fp8_output": 2}
    assert (tmp_path / "gpu.md").read_text().startswith("# gpu-check on ")


def test_bracket_extends_each_sweep_until_its_optimum_is_inside(monkeypatch):
    """A fake trainer with loss = (log2 lr − c)² per cell: the sweep walks from its start to c and stops
    one step past it; bounds cap it; the parabola through the best three recovers a between-grid c."""
    import math
    from dataclasses import replace

    from benchmarks import sweep
    from benchmarks.training import Recipe

    centers = {"far": -11.0, "inside": -5.3, "capped": -30.0}
    calls = []

    def fake_train_all(recipes, corpus, jobs=1, progress=True):
        calls.append(len(recipes))
        return [{"recipe": {"lr": r.lr, "seed": r.seed}, "final_val_loss": (math.log2(r.lr) - centers[r.optimizer]) ** 2}
                for r in recipes]

    monkeypatch.setattr(sweep, "train_all", fake_train_all)
    cells = {key: replace(Recipe(), optimizer=key) for key in centers}  # the cell's name rides in a field
    runs = sweep.bracket(cells, {key: [-6, -5, -4] for key in cells}, corpus=None, bounds=(-14, 0), max_extra=8)
    exps = {key: [sweep.exponent(r["recipe"]["lr"]) for r in rs] for key, rs in runs.items()}
    assert exps["inside"] == [-6, -5, -4]
    assert exps["far"] == list(range(-12, -3))  # walked down to -11, one past it, then stopped
    assert exps["capped"] == list(range(-14, -3))  # stopped by max_extra=8 at the bound -14
    assert calls[:2] == [9, 2] and sum(calls) == 9 + 6 + 8  # each round: one batch, every open cell
    assert sweep.interpolated_optimum(runs["inside"]) == pytest.approx(-5.3)
    assert sweep.interpolated_optimum(runs["capped"]) is None  # best at the edge: no vertex claimed


def test_quality_gate_flags_an_fp8_regression(tmp_path):
    from benchmarks import quality

    assert quality.regressions({"mus_fp8_vs_sp_bf16": 0.029, "mus_fp8_vs_mus_bf16": -0.2}) == []
    failing = quality.regressions({"mus_fp8_vs_sp_bf16": 0.031, "mus_fp8_vs_mus_bf16": float("nan")})
    assert len(failing) == 2 and "mus_fp8_vs_sp_bf16" in failing[0]


def test_compile_time_smoke_writes_json_history_and_plot(tmp_path, monkeypatch):
    from benchmarks import compile_time
    from benchmarks.common import read_history

    history = tmp_path / "history.jsonl"
    monkeypatch.setenv("MUNIT_BENCH_HISTORY", str(history))
    out = tmp_path / "compile.json"
    assert compile_time.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (model,) = result["models"].values()
    assert model["munit_s"] > 0 and model["inductor_s"] > 0
    assert model["ratio"] == pytest.approx(model["munit_s"] / model["inductor_s"])
    assert set(model["munit_pass_s"]) == {"normalize", "variance", "fp8_plan", "fuse"}
    assert sum(model["munit_pass_s"].values()) < model["munit_s"]
    (entry,) = read_history(str(history))
    assert entry["benchmark"] == "compile-time" and entry["smoke"] is True
    assert {"commit", "date", "machine", "torch", "triton"} <= set(entry) and entry["headline"]
    assert _png_ok(tmp_path / "compile.png")


def test_analysis_scaling_smoke_fits_a_line(tmp_path):
    from benchmarks import analysis_scaling

    out = tmp_path / "scaling.json"
    assert analysis_scaling.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    nodes = [p["nodes"] for p in result["depth"]]
    assert nodes == sorted(nodes) and nodes[0] < nodes[-1]  # deeper model, bigger graph
    assert all(p["gemms_fp8"] == p["gemms_total"] - 1 for p in result["depth"] + result["width"])
    assert set(result["pass_fits"]) == {"normalize", "variance", "fp8_plan", "fuse"}  # fitted, never asserted
    assert all(math.isfinite(fit["seconds_per_node"]) for fit in [result["depth_fit"], *result["pass_fits"].values()])
    assert _png_ok(tmp_path / "scaling.png")


def test_cpu_step_smoke_reports_ratios(tmp_path):
    from benchmarks import cpu_step

    out = tmp_path / "step.json"
    assert cpu_step.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    median = result["median_step_s"]
    assert set(median) == {"eager", "inductor", "munit", "munit_unfused"} and all(v > 0 for v in median.values())
    assert result["ratios"]["munit_vs_eager"] == pytest.approx(median["munit"] / median["eager"])
    assert result["ratios"]["munit_fused_vs_unfused"] == pytest.approx(median["munit"] / median["munit_unfused"])


def test_report_rewrites_only_its_section(tmp_path):
    from benchmarks import report

    history = tmp_path / "history.jsonl"
    entries = [{"benchmark": "cpu-step", "commit": c, "date": f"2026-11-2{i}T00:00:00+00:00", "machine": "cpu x",
                "torch": "t", "triton": "t", "smoke": False, "headline": {"munit_vs_eager": r}, "json": None}
               for i, (c, r) in enumerate([("aaa", 2.0), ("bbb", 1.5)])]
    entries.append({**entries[0], "commit": "ccc", "smoke": True, "headline": {"munit_vs_eager": 9.0}})
    history.write_text("".join(json.dumps(e) + "\n" for e in entries))
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\nkept\n{report.BEGIN}\nold\n{report.END}\ntail kept\n")
    assert report.main(["--history", str(history), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--history", str(history), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# intro\nkept\n") and text.endswith("tail kept\n") and "old" not in text
    assert "| `cpu-step` | cpu x | bbb |" in text and "1.5" in text and "9.0" not in text  # latest, smoke ignored
    assert report.main(["--history", str(history), "--readme", str(readme), "--check"]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="report markers"):
        report.main(["--history", str(history), "--readme", str(readme)])
