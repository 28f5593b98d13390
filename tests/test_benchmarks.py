"""Every benchmark's --smoke form runs and writes valid JSON (timings are reported, never asserted)."""
import json

from benchmarks import __main__ as harness
from benchmarks import analysis_time


def test_list_names_every_benchmark(capsys):
    assert harness.main(["--list"]) == 0
    assert all(name in capsys.readouterr().out for name in harness.BENCHMARKS)
    assert harness.main(["no-such-benchmark"]) == 2


def test_analysis_time_smoke_writes_json(tmp_path):
    out = tmp_path / "analysis.json"
    assert analysis_time.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["gemms_fp8"] == result["gemms_total"] - 1 and result["unknown_ops"] == []
    assert set(result["median_seconds"]) == {"capture", "normalize", "variance", "fp8_plan", "total"}
    assert all(v >= 0 for v in result["median_seconds"].values())
