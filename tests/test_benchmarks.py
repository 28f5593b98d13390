"""Every benchmark's --smoke form runs and writes valid JSON (timings are reported, never asserted)."""
import json

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
