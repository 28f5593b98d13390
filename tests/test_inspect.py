"""munit.inspect: predicted σ of every GEMM operand against one measured forward/backward, on real
model code at init; the report's schema; unknowns; meta-device models."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import munit_compile as munit
from munit_compile.inspect import ROW_KEYS
from munit_compile.passes.values import Moments
from small_models import VOCAB, CumsumThenLinear, builtin_gpt, gpt2, hidden_gemm_modules, llama, mistral, qwen2

MODELS = {"builtin_gpt": builtin_gpt, "llama": llama, "gpt2": gpt2, "mistral": mistral, "qwen2": qwen2}


def _inspect(name, model, ids, **kw):
    if name == "builtin_gpt":
        return munit.inspect(model, ids, ids, **kw)
    return munit.inspect(model, input_ids=ids, labels=ids, **kw)


@pytest.fixture(scope="module", params=list(MODELS))
def measured_report(request):
    torch.manual_seed(0)
    model = MODELS[request.param]()
    ids = torch.randint(0, VOCAB, (4, 32))
    return request.param, model, _inspect(request.param, model, ids, measure=True)


def test_gemm_operands_predicted_within_sqrt2(measured_report):
    name, model, report = measured_report
    worst = report.worst(10)
    print(f"\n{name}: worst GEMM operands (predicted / measured σ, log2 error)")
    for c in worst:
        print(f"  {c.gemm:10s} {c.operand:8s} {c.predicted:.3g} / {c.measured:.3g}  {c.log2_error:+.2f}")
    s = report.summary
    # x, W and d output of every GEMM (LM head included), forward and backward
    assert len(report.operand_checks) == 3 * s["gemms_total"]
    assert s["frac_within_sqrt2"] >= 0.95, worst
    assert s["max_abs_log2_error"] <= 1.0, worst


def test_no_unknowns_and_every_hidden_gemm_in_fp8(measured_report):
    name, model, report = measured_report
    assert report.summary["unknown_ops"] == []
    assert all(r["status"] != "unknown" for r in report.rows)
    assert report.summary["gemms_fp8"] == len(hidden_gemm_modules(model))
    assert report.summary["gemms_total"] == report.summary["gemms_fp8"] + 1  # the LM head
    (head,) = [r for r in report.rows if r["status"] == "high_precision"]
    assert "LM head" in head["reason"] and head["fp8"] is None


def test_report_schema_and_json_round_trip(measured_report, tmp_path):
    _, _, report = measured_report
    d = report.as_dict()
    assert set(d) == {"rows", "summary"}
    assert set(d["summary"]) == {"gemms_total", "gemms_fp8", "unknown_ops", "frac_within_sqrt2", "max_abs_log2_error"}
    for row in d["rows"]:
        assert tuple(row) == ROW_KEYS
        # an FP8 GEMM names its kernel (GELU/SiLU, GPT-2's written-out gelu_new too, the SwiGLU gate, the
        # residual add fused into its epilogue, the next GEMM's FP8 operand written by it; its input read as
        # a shared FP8 copy), the rest none
        kernels = {k + " <- fp8 x" for k in ("fp8_gemm", "fp8_gemm+gelu", "fp8_gemm+gelu+fp8_out",
                                            "fp8_gemm+gelu_tanh+fp8_out", "fp8_gemm+silu+gate+fp8_out",
                                            "fp8_gemm+residual")}
        assert row["fused_kernel"] in (kernels if row["fp8"] is not None else {None})
        assert row["status"] in ("ok", "unknown", "high_precision")
    fp8_rows = [r for r in d["rows"] if r["fp8"] is not None]
    assert fp8_rows and all(set(r["fp8"]) == {"x_format", "x_scale", "w_format", "w_scale", "grad_format", "grad_scale"}
                            for r in fp8_rows)
    path = tmp_path / "report.json"
    report.to_json(path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(d))
    assert "GEMMs in FP8" in report.table(only_gemms=True)


def test_causal_attention_reports_its_position_range(measured_report):
    _, _, report = measured_report
    sdpa = [r for r in report.rows if r["op"] == "aten.scaled_dot_product_attention.default"]
    assert sdpa and all("varies along the sequence" in r["reason"] for r in sdpa)


def test_without_measure_the_measured_fields_are_null():
    model, ids = builtin_gpt(), torch.randint(0, VOCAB, (2, 16))
    report = munit.inspect(model, ids, ids)
    assert all(r["meas_std"] is None and r["meas_grad_std"] is None for r in report.rows)
    assert report.summary["frac_within_sqrt2"] is None and report.summary["max_abs_log2_error"] is None
    assert report.summary["gemms_fp8"] == 8


def test_unknown_op_is_named_and_its_gemm_stays_high_precision():
    report = munit.inspect(CumsumThenLinear(), torch.randn(8, 32))
    assert report.summary["unknown_ops"] == ["aten.cumsum.default"]
    cumsum = next(r for r in report.rows if r["op"] == "aten.cumsum.default")
    assert cumsum["status"] == "unknown" and "no variance rule" in cumsum["reason"]
    assert report.summary["gemms_fp8"] == 0


def test_meta_device_model_is_analysed_with_stated_parameter_moments():
    with torch.device("meta"):
        model = builtin_gpt()
    ids = torch.randint(0, VOCAB, (2, 16), device="meta")

    def init(p):
        return Moments.normal(0.0, 0.02**2) if p.dim() == 2 else Moments(1.0, 1.0, gaussian=False, row_constant=True)

    report = munit.inspect(model, ids, ids, parameter_moments=init)
    assert report.summary["gemms_fp8"] == 8 and report.summary["unknown_ops"] == []
    first = next(r for r in report.rows if r["fp8"] is not None)
    assert first["fp8"]["w_scale"] == 2.0 ** round(-math.log2(0.02))
    with pytest.raises(ValueError, match="meta device"):
        munit.inspect(model, ids, ids, measure=True)


class SwiGLU(nn.Module):
    def __init__(self, d=64, hidden=128, act=torch.nn.functional.silu):
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d), act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    def __init__(self, d=64, hidden=256):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _measured_underflow(t: torch.Tensor, scale: float, min_normal: float = 2.0**-6) -> float:
    a = t.detach().double().abs() * scale
    return ((a > 0) & (a < min_normal)).double().mean().item()


@pytest.mark.parametrize("module", ["gelu_mlp", "swiglu"])
def test_predicted_fp8_underflow_of_the_down_projection_input(module):
    model = GeluMLP() if module == "gelu_mlp" else SwiGLU()
    x = torch.randn(64, 32, 64)
    report = munit.inspect(model, x)
    down = [r for r in report.rows if r["fp8"] is not None][-1]
    predicted = float(down["reason"].split("x ")[1].split("%")[0]) / 100
    captured = []
    model.down.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    model(x)
    measured = _measured_underflow(captured[0], down["fp8"]["x_scale"])
    # the shape of GELU(X) and of silu(G)·U matters: a Gaussian of the same σ would give ~1.3 %
    assert measured > 0.005
    assert abs(predicted - measured) <= 0.15 * measured + 0.002, (predicted, measured)


class SplitThenCumsum(nn.Module):
    """fc's output is split: one piece feeds `out`, the other an op with no rule (cumsum)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(32, 64), nn.Linear(32, 32)

    def forward(self, x):
        a, b = self.fc(x).split([32, 32], -1)
        return self.out(a) + torch.cumsum(b, -1)


def test_unknown_gradient_reaches_only_the_gemms_behind_it():
    report = munit.inspect(SplitThenCumsum(), torch.randn(8, 32))
    fc, out = [r for r in report.rows if r["op"] == "aten.linear.default"]
    # d fc flows back through cumsum (no gradient rule): unknown, so fc stays in high precision
    assert fc["status"] == "unknown" and "aten.cumsum" in fc["reason"] and fc["fp8"] is None
    # `out` sees a known input and a known gradient, even though the sum it feeds is unknown
    assert out["status"] == "ok" and out["fp8"] is not None
    assert report.summary["unknown_ops"] == ["aten.cumsum.default"]


class SoftCappedLogits(nn.Module):
    """Logits scaled and soft-capped before the loss (Cohere, Granite, Gemma 2 do this)."""

    def __init__(self):
        super().__init__()
        self.gpt = builtin_gpt()

    def forward(self, ids):
        logits, _ = self.gpt(ids)
        logits = 30.0 * torch.tanh(logits * 0.0625 / 30.0)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def test_lm_head_behind_logit_scaling_stays_high_precision():
    report = munit.inspect(SoftCappedLogits(), torch.randint(0, VOCAB, (2, 16)), measure=True)
    assert report.summary["gemms_fp8"] == 8 and report.summary["gemms_total"] == 9
    (head,) = [r for r in report.rows if r["status"] == "high_precision"]
    assert head["shape"][-1] == VOCAB and "LM head" in head["reason"]


def test_width_equal_to_vocabulary_keeps_hidden_gemms_in_fp8():
    """A byte-level model at d 256 = vocabulary: the residual stream keeps the vocabulary's last dim all
    the way to the loss, but only the LM head reaches it without another GEMM, norm or residual add."""
    from munit_compile.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=64))
    ids = torch.randint(0, 64, (2, 16))
    report = munit.inspect(model, ids, ids)
    assert report.summary["gemms_total"] == 9 and report.summary["gemms_fp8"] == 8, report.summary
    (head,) = [r for r in report.rows if r["status"] == "high_precision"]
    assert "LM head" in head["reason"]


class HandWrittenCausalAttention(nn.Module):
    """softmax(q kᵀ/√d + causal mask) v written out, the mask applied one of three common ways."""

    def __init__(self, mask_style: str, d=64, heads=4):
        super().__init__()
        self.mask_style, self.heads = mask_style, heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        for proj in (self.q, self.k):  # logits of σ ≈ 1: attention neither flat nor one-hot
            nn.init.normal_(proj.weight, std=0.3)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        future = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
        lowest = torch.tensor(torch.finfo(scores.dtype).min)
        if self.mask_style == "masked_fill":
            scores = scores.masked_fill(future, float("-inf"))
        elif self.mask_style == "additive":
            scores = scores + torch.where(future, lowest, torch.tensor(0.0))
        else:
            scores = torch.where(future, lowest, scores)
        out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, s, d))


@pytest.mark.parametrize("mask_style", ["masked_fill", "additive", "where"])
def test_hand_written_masked_attention(mask_style):
    report = munit.inspect(HandWrittenCausalAttention(mask_style), torch.randn(4, 64, 64), measure=True)
    print(f"\n{mask_style}: worst {[(c.gemm, c.operand, round(c.log2_error, 2)) for c in report.worst(3)]}")
    assert report.summary["unknown_ops"] == [] and report.summary["gemms_fp8"] == 4
    assert report.summary["frac_within_sqrt2"] >= 0.95 and report.summary["max_abs_log2_error"] <= 0.75


class MatmulWithTransposedWeights(nn.Module):
    """Linear layers written as x @ W.T / x @ W.t() with bare parameters (Falcon, hand-written MLPs)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(128, 64) * 0.02)
        self.w2 = nn.Parameter(torch.randn(64, 128) * 0.02)

    def forward(self, x):
        return torch.relu(x @ self.w1.T) @ self.w2.t()


def test_matmul_with_a_transposed_parameter_is_a_linear_layer():
    model, x = MatmulWithTransposedWeights(), torch.randn(8, 16, 64)
    report = munit.inspect(model, x, measure=True)
    assert report.summary["gemms_fp8"] == report.summary["gemms_total"] == 2
    assert report.summary["max_abs_log2_error"] <= 0.5
    compiled = torch.compile(model, backend=munit.backend(munit.Config(inner_compiler="aot_eager", strict=True)))
    out = compiled(x)
    assert ((out - model(x)).norm() / model(x).norm()).item() < 0.06  # E4M3 operands


class WritesIntoABuffer(nn.Module):
    """out = zeros; out[:, t] = a(x[:, t]): the buffer's values come from in-place writes (RWKV-style)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        out = torch.zeros_like(x)
        for t in range(x.shape[1]):
            out[:, t] = self.a(x[:, t])
        return self.b(out)


def test_in_place_writes_into_part_of_a_tensor_are_not_read_as_zeros():
    report = munit.inspect(WritesIntoABuffer(), torch.randn(4, 3, 32))
    assert report.summary["unknown_ops"] == ["aten.copy_.default"]
    b = [r for r in report.rows if r["op"] == "aten.linear.default"][-1]
    assert b["fp8"] is None and b["status"] == "unknown" and "copy_" in b["reason"]


def test_report_plot_writes_a_png_and_needs_a_measurement(tmp_path):
    import munit_compile as munit
    from small_models import MLP

    model, x = MLP(), torch.randn(8, 64)
    with pytest.raises(ValueError, match="measure=True"):
        munit.inspect(model, x).plot(tmp_path / "no.png")
    munit.inspect(model, x, measure=True).plot(tmp_path / "r.png")
    data = (tmp_path / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
