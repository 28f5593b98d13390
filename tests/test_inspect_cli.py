"""`munit inspect`: the CLI end to end, in process, on the built-in GPT, transformers Llama and GPT-2
(small configs, random init): exit codes, the table, the JSON against its documented schema, the
plot, the MLIR export (or its install message, whichever the installed state gives), bad targets."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import sys
import textwrap

import pytest
import torch.nn as nn

from munit_compile import cli, inspect_cli
from munit_compile.inspect_cli import JSON_SCHEMA, validate_json

TORCH_MLIR_INSTALLED = importlib.util.find_spec("torch_mlir") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def munit(capsys, *argv):
    """(exit code, stdout, stderr) of `munit inspect ARGV` run in this process."""
    code = cli.main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """hf:llama with every output; the MLIR file only where torch-mlir is installed."""
    tmp = tmp_path_factory.mktemp("llama")
    paths = {"json": tmp / "r.json", "plot": tmp / "r.png", "mlir": tmp / "r.mlir"}
    argv = ["inspect", "hf:llama", "--measure", "--json", paths["json"], "--plot", paths["plot"]]
    if TORCH_MLIR_INSTALLED:
        argv += ["--mlir", paths["mlir"]]
    out, err = io.StringIO(), io.StringIO()  # capsys is function-scoped; this run serves several tests
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(map(str, argv)))
    return code, out.getvalue(), err.getvalue(), paths


def hf_hidden_gemms(model_type: str, layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 320) -> int:
    """nn.Linear / Conv1D layers other than the LM head in the model `hf:<model_type>` builds."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_config(inspect_cli.hf_config(model_type, layers, hidden, heads, vocab, 32))
    head = model.get_output_embeddings()
    return sum(isinstance(m, (nn.Linear, Conv1D)) and m is not head for m in model.modules())


# ---------------------------------------------------------------- hf:llama, every output

def test_llama_exit_0_table_and_summary(llama_run):
    code, out, err, _ = llama_run
    assert code == 0, err
    assert "LlamaForCausalLM (2 layers, hidden 64, 4 heads, vocab 320)" in out
    assert "GEMMs in FP8: 14/15 · unknown ops: none · GEMM operands within √2:" in out
    for header in ("node", "pred σ", "meas σ∇", "log2 err", "FP8 x/w/∇", "scales x/w/∇", "fused", "status"):
        assert header in out
    assert "E4M3/E4M3/E5M2" in out and "LM head" in out
    assert "embedding" not in out  # --only gemms is the default
    assert "capturing the graph, analysing and measuring" in err  # progress goes to stderr


def test_llama_json_matches_schema_and_counts_every_hidden_gemm(llama_run):
    code, _, err, paths = llama_run
    assert code == 0, err
    doc = json.loads(paths["json"].read_text())
    assert validate_json(doc) == []
    s = doc["summary"]
    assert s["gemms_fp8"] == hf_hidden_gemms("llama") == 14  # 7 linears per layer, the LM head excluded
    assert s["gemms_total"] == 15 and s["unknown_ops"] == []
    assert s["frac_within_sqrt2"] >= 0.95 and s["max_abs_log2_error"] <= 1.0
    assert len(doc["operand_checks"]) == 3 * s["gemms_total"]
    assert doc["options"] == {"batch": 4, "seq": 32, "measure": True, "unit_scale": False,
                              "model": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 320}}
    fp8_rows = [r for r in doc["rows"] if r["fp8"]]
    assert len(fp8_rows) == 14 and all(r["meas_std"] is not None for r in fp8_rows)
    assert {r["fp8"]["grad_format"] for r in fp8_rows} == {"e5m2"}
    assert any(r["op"] == "aten.embedding.default" for r in doc["rows"])  # JSON holds every row


def test_llama_plot_is_a_png_of_sane_size(llama_run):
    import matplotlib.image

    code, _, err, paths = llama_run
    assert code == 0, err
    data = paths["plot"].read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 20_000 < len(data) < 2_000_000
    height, width, channels = matplotlib.image.imread(paths["plot"]).shape
    assert 800 <= width <= 3000 and 400 <= height <= 2000 and channels in (3, 4)


def test_llama_mlir_has_fp8_types_or_says_how_to_install(llama_run, capsys, tmp_path):
    code, _, err, paths = llama_run
    if TORCH_MLIR_INSTALLED:
        assert code == 0, err
        text = paths["mlir"].read_text()
        assert "func.func @forward_backward(" in text and "torch.aten.mm" in text
        # one E4M3 cast per distinct GEMM input (q/k/v share one, gate/up share one: 4 per layer), forward and
        # backward read that copy; W cast to E4M3 forward and again for dx = E5M2 d out x E4M3 W (dW = E5M2 d out
        # x the saved E4M3 x); the 2 gate projections (SiLU and the up product fused) recompute z: W once more
        casts = {t: len(re.findall(rf"= torch\.aten\._to_copy .*-> !torch\.vtensor<\[[^\]]*\],{t}>", text))
                 for t in ("f8E4M3FN", "f8E5M2")}
        assert casts == {"f8E4M3FN": 4 * 2 + 14 + 14 + 2, "f8E5M2": 2 * 14}, casts
        assert "munit.fp8" not in text  # the custom ops are expanded into their casts
        assert "38 casts to f8E4M3FN, 28 to f8E5M2" in err
    else:
        code, out, err = munit(capsys, "hf:llama", "--mlir", tmp_path / "r.mlir")
        assert code == 2 and out == ""
        assert err.strip().splitlines()[-1].endswith("pip install munit-compile[mlir]")


def test_mlir_without_torch_mlir_exits_2_before_building(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)  # import torch_mlir now raises ImportError
    code, out, err = munit(capsys, "hf:llama", "--mlir", tmp_path / "r.mlir")
    assert code == 2 and out == "" and not (tmp_path / "r.mlir").exists()
    assert err == "munit inspect: error: --mlir needs torch-mlir, which is not installed: pip install munit-compile[mlir]\n"


# ---------------------------------------------------------------- hf:gpt2, the built-in GPT, unit scaling

def test_gpt2_measured_json(capsys, tmp_path):
    code, out, err = munit(capsys, "hf:gpt2", "--measure", "--json", tmp_path / "g.json", "-q")
    assert code == 0, err
    assert err == ""  # --quiet
    assert "GPT2LMHeadModel" in out and "addmm" in out  # GPT-2's Conv1D layers are addmm GEMMs
    doc = json.loads((tmp_path / "g.json").read_text())
    assert validate_json(doc) == []
    assert doc["summary"]["gemms_fp8"] == hf_hidden_gemms("gpt2") == 8
    assert doc["summary"]["frac_within_sqrt2"] >= 0.95


def test_builtin_gpt_all_rows(capsys):
    code, out, err = munit(capsys, "builtin:gpt", "--only", "all", "--layers", "1")
    assert code == 0, err
    assert "builtin:gpt (1 layers, hidden 64, 4 heads, vocab 320)" in out
    assert "layer_norm" in out and "scaled_dot_product_attention" in out  # --only all: every node
    assert "GEMMs in FP8: 4/5 · unknown ops: none · not measured" in out
    assert "building builtin:gpt" in err


def test_unit_scale_gives_every_fp8_scale_1(capsys, tmp_path):
    code, out, err = munit(capsys, "builtin:gpt", "--unit-scale", "--json", tmp_path / "u.json", "-q")
    assert code == 0, err
    assert "after unit_scale" in out
    doc = json.loads((tmp_path / "u.json").read_text())
    assert validate_json(doc) == [] and doc["options"]["unit_scale"] is True
    fp8 = [r["fp8"] for r in doc["rows"] if r["fp8"]]
    assert len(fp8) == doc["summary"]["gemms_fp8"] == 8
    assert all((f["x_scale"], f["w_scale"], f["grad_scale"]) == (1.0, 1.0, 1.0) for f in fp8), fp8
    assert "1/1/1" in out


# ---------------------------------------------------------------- factory targets

FACTORY_FILE = """
import torch
import torch.nn as nn

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))

class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("this model cannot run")

def make_mlp():
    return MLP(), (torch.randn(8, 64),)

def make_broken():
    return Broken(), (torch.randn(2, 2),)

def make_nothing():
    return 42
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "models_for_munit.py"
    path.write_text(textwrap.dedent(FACTORY_FILE))
    return path


def test_file_factory_returning_model_and_inputs(capsys, factory_file, tmp_path):
    code, out, err = munit(capsys, f"{factory_file}:make_mlp", "--measure", "--json", tmp_path / "m.json", "-q")
    assert code == 0, err
    doc = json.loads((tmp_path / "m.json").read_text())
    assert validate_json(doc) == [] and doc["summary"]["gemms_total"] == 2


def test_module_factory_returning_a_model(capsys):
    # tests/small_models.py is importable (pytest pythonpath); the model alone gets (ids, ids)
    code, out, err = munit(capsys, "small_models:builtin_gpt", "-q")
    assert code == 0, err
    assert "GEMMs in FP8: 8/9" in out


def test_failure_during_analysis_exits_1(capsys, factory_file):
    code, out, err = munit(capsys, f"{factory_file}:make_broken", "-q")
    assert code == 1
    assert "munit inspect: failed:" in err and "this model cannot run" in err and "--traceback" in err


@pytest.mark.parametrize("target, message", [
    ("nosuchmodule:f", "cannot import module 'nosuchmodule': no module named 'nosuchmodule'"),
    ("small_models:no_such_factory", "'small_models' has no 'no_such_factory'; callables defined there: "),
    ("small_models:VOCAB", "'VOCAB' is a int, not a callable"),
    ("hf:not_a_type", "knows no model type 'not_a_type'; try one of: llama, gpt2, mistral, qwen2"),
    ("hf:lama", "try one of: llama"),
    ("hf:vit", "has no causal LM for 'vit'"),
    ("builtin:nope", "unknown built-in model 'nope'; choose from builtin:gpt"),
    ("just_a_name", "expected package.module:factory, path/file.py:factory, hf:<model_type> or builtin:gpt"),
    ("/no/such/dir/model.py:make", "file '/no/such/dir/model.py' not found"),
])
def test_bad_targets_exit_2_with_what_to_fix(capsys, target, message):
    code, out, err = munit(capsys, target, "-q")
    assert code == 2 and out == ""
    assert message in err, err


def test_file_without_the_factory(capsys, factory_file):
    code, _, err = munit(capsys, f"{factory_file}:make_model", "-q")
    assert code == 2
    assert "has no 'make_model'; callables defined there: Broken, MLP, make_broken, make_mlp, make_nothing" in err, err


def test_factory_returning_no_model(capsys, factory_file):
    code, _, err = munit(capsys, f"{factory_file}:make_nothing", "-q")
    assert code == 2 and "returned a int; it must return an nn.Module or a (model, example_inputs) pair" in err


@pytest.mark.parametrize("argv, message", [
    (["builtin:gpt", "--batch", "0"], "--batch must be a positive integer"),
    (["builtin:gpt", "--hidden", "60", "--heads", "8"], "must be divisible by n_head"),
    (["hf:llama", "--hidden", "60", "--heads", "8"], "--hidden 60 must be a multiple of --heads 8"),
    (["builtin:gpt", "--plot", "r.jpg"], "give a file name ending in .png"),
    (["builtin:gpt", "--json", "/no/such/dir/r.json"], "does not exist"),
    (["builtin:gpt", "--only", "some"], "invalid choice: 'some'"),
    (["builtin:gpt", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["small_models:builtin_gpt", "--layers", "3"], "--layers applies to hf: and builtin: targets"),
    ([], "the following arguments are required: TARGET"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = munit(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err, err


def test_help_exits_0_and_lists_target_forms(capsys):
    code, out, _ = munit(capsys, "--help")
    assert code == 0
    assert "hf:<model_type>" in out and "--unit-scale" in out and "munit-compile[mlir]" in out
    assert cli.main(["--help"]) == 0 and "inspect" in capsys.readouterr().out


# ---------------------------------------------------------------- the schema itself

def test_schema_validator_rejects_broken_documents():
    row = {"name": "linear", "op": "aten.linear.default", "shape": [4, 8], "pred_std": 1.0, "pred_grad_std": None,
           "meas_std": None, "meas_grad_std": None, "fp8": None, "fused_kernel": None, "status": "ok", "reason": ""}
    doc = {"schema_version": 1, "target": "x:y", "options": {"batch": 1, "seq": 1, "measure": False, "unit_scale": False},
           "rows": [row], "summary": {"gemms_total": 1, "gemms_fp8": 0, "unknown_ops": [], "frac_within_sqrt2": None,
                                      "max_abs_log2_error": None}, "operand_checks": []}
    assert validate_json(doc) == []
    bad_fp8 = {"x_format": "e4m3", "x_scale": 0.0, "w_format": "e4m3", "w_scale": 1.0, "grad_format": "e6m1"}
    broken = {**doc, "rows": [{**row, "status": "fine", "shape": [4, "8"], "fp8": bad_fp8, "extra": 1}]}
    del broken["operand_checks"]
    errors = validate_json(broken)
    for expected in ("$: missing key 'operand_checks'", "$.rows[0]: unexpected key 'extra'",
                     "$.rows[0].status: 'fine' is not one of", "$.rows[0].shape[1]: expected integer",
                     "$.rows[0].fp8: missing key 'grad_scale'", "$.rows[0].fp8.x_scale: 0.0 <= exclusive minimum 0",
                     "$.rows[0].fp8.grad_format: 'e6m1' is not one of"):
        assert any(e.startswith(expected) for e in errors), (expected, errors)
    assert JSON_SCHEMA["properties"]["rows"]["items"]["required"] == list(inspect_cli.ROW_SCHEMA["properties"])
