"""`munit.inspect`: what the analysis predicts for every tensor of a model, and what the FP8 plan does.

    report = munit.inspect(model, *example_inputs, measure=True, **example_kwargs)
    report.table(); report.to_json("r.json"); report.plot("r.png"); report.as_dict()["summary"]["frac_within_sqrt2"]
    report.formula("linear_3").closed("m2")   # sympy, over batch, seq, d_model, ... and parameter m2s

One row per graph node: name, op, shape, pred_std, pred_grad_std, meas_std, meas_grad_std, fp8,
fused_kernel, status ("ok" | "unknown" | "high_precision"), reason. With measure=True, one forward and
backward of the (high-precision) graph runs with the example inputs, and the summary compares predicted
and measured σ of every GEMM operand: x and W forward, d output backward.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx

from munit_compile.config import Config
from munit_compile.ir import META_BWD, META_FWD, concrete_shape, op_name
from munit_compile.measure import Measured, measure_graph
from munit_compile.passes.fp8_plan import GEMM_OPERANDS, output_multiplier
from munit_compile.passes.symbolic import Formula, formulas_of_graph
from munit_compile.passes.values import Moments, Unknown
from munit_compile.passes.variance import ParameterMoments
from munit_compile.pipeline import CompileReport, PipelineState, run_pipeline

ROW_KEYS = ("name", "op", "shape", "pred_std", "pred_grad_std", "meas_std", "meas_grad_std",
            "fp8", "fused_kernel", "status", "reason")
SQRT2_LOG2 = 0.5  # log2(√2)


@dataclass
class OperandCheck:
    """One GEMM operand's predicted and measured σ (forward x / W, or backward d output)."""

    gemm: str
    operand: str  # "x" | "w" | "grad_out"
    predicted: float
    measured: float

    @property
    def log2_error(self) -> float:
        return math.log2(self.predicted / self.measured)


@dataclass
class Report:
    """Rows (dicts with exactly ROW_KEYS), a summary, and the per-operand comparisons behind it."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    operand_checks: list[OperandCheck] = field(default_factory=list)
    pass_seconds: dict[str, float] = field(default_factory=dict)  # wall time per pipeline pass, all graphs
    formulas: dict[str, Formula] = field(default_factory=dict, repr=False)  # node name -> its expressions

    def formula(self, name: str) -> Formula:
        """Node `name`'s predicted mean, m2 and gradient m2 as sympy expressions over the graph's dims
        (`.closed("m2")`, `.std(seq=4096)`); needs Config(symbolic=True), inspect's default."""
        if name not in self.formulas:
            hint = "" if self.formulas else " (the analysis ran with Config(symbolic=False))"
            raise KeyError(f"no formula for node {name!r}{hint}")
        return self.formulas[name]

    def as_dict(self) -> dict:
        return {"rows": self.rows, "summary": self.summary}

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=1)

    def plot(self, path, title: str = "munit.inspect") -> None:
        """A PNG of predicted and measured σ per GEMM operand against the FP8 normal ranges (the
        `munit inspect --plot` figure); needs a report made with measure=True."""
        if not self.operand_checks:
            raise ValueError("Report.plot needs measured operands: call munit.inspect(..., measure=True)")
        from munit_compile.inspect_cli.plot import write_plot

        write_plot(self, str(path), title)

    def worst(self, n: int = 10) -> list[OperandCheck]:
        """The n GEMM operands whose prediction is furthest (in log2) from the measurement."""
        return sorted(self.operand_checks, key=lambda c: -abs(c.log2_error))[:n]

    def table(self, only_gemms: bool = False, file=None) -> str:
        """A plain-text table of the rows (GEMMs only if asked) and the summary; printed to `file` if given."""
        rows = [r for r in self.rows if not only_gemms or r["fp8"] is not None or r["status"] == "high_precision"]
        text = _format_table(rows, self.summary)
        if file is not None:
            print(text, file=file)
        return text


def inspect(model: torch.nn.Module, *example_inputs, measure: bool = False, config: Config | None = None,
            parameter_moments: ParameterMoments | None = None, **example_kwargs) -> Report:
    """Analyse `model` on the example inputs (one forward captures its graphs) and return a Report.

    A model on the meta device has no parameter values: `parameter_moments(param) -> Moments` states
    the intended init instead (measure=True needs real tensors).
    """
    if measure and any(p.is_meta for p in model.parameters()):
        raise ValueError("munit.inspect(measure=True) needs real parameters; the model is on the meta device")
    config = config or Config(symbolic=True)
    graphs: list[tuple[fx.GraphModule, Sequence]] = []

    def capture(gm, inputs):
        graphs.append((gm, inputs))
        return gm.forward

    torch.compile(model, backend=capture, dynamic=False)(*example_inputs, **example_kwargs)
    report, gemms, unknown_ops = Report(), [], set()
    for gm, inputs in graphs:
        compile_report = _inspect_graph(gm, inputs, config, measure, report, parameter_moments)
        gemms += compile_report.gemms
        unknown_ops.update(compile_report.unknown_ops)
    report.summary = _summary(report, gemms, sorted(unknown_ops), measured=measure)
    return report


def _inspect_graph(gm, inputs, config, measure, report, parameter_moments) -> CompileReport:
    """Run the pipeline on one graph; add its rows and operand checks to `report`."""
    snapshot: dict = {}

    def after_pass(name: str, state: PipelineState):
        if name == "variance":
            snapshot["rows"] = _rows(state.gm)
            report.formulas.update(formulas_of_graph(state.gm))
            snapshot["gemms"] = _gemm_operands(state.gm)
            snapshot["measured"] = measure_graph(state.gm, inputs, _logits_loss(state.gm)) if measure else {}

    _, compile_report = run_pipeline(gm, inputs, config, after_pass=after_pass, parameter_moments=parameter_moments)
    for name, seconds in compile_report.pass_seconds.items():
        report.pass_seconds[name] = report.pass_seconds.get(name, 0.0) + seconds
    measured: dict[str, Measured] = snapshot["measured"]
    decisions = {d.node: d for d in compile_report.gemms}
    for row in snapshot["rows"]:
        m = measured.get(row["name"])
        if m is not None:
            row["meas_std"], row["meas_grad_std"] = m.std, m.grad_rms
        decision = decisions.get(row["name"])
        if decision is not None:
            if decision.fp8:
                row["fp8"] = {k: getattr(decision, k) for k in
                              ("x_format", "x_scale", "w_format", "w_scale", "grad_format", "grad_scale")}
                row["reason"] = _underflow_note(decision)
                row["fused_kernel"] = decision.fused_kernel
            elif row["status"] == "ok":
                row["status"], row["reason"] = "high_precision", decision.reason
    report.rows += snapshot["rows"]
    if measure:
        report.operand_checks += _operand_checks(snapshot["gemms"], measured)
    return compile_report


def _rows(gm: fx.GraphModule) -> list[dict]:
    rows = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op not in ("placeholder", "call_function", "get_attr") or not isinstance(val, torch.Tensor):
            continue
        fwd, bwd = node.meta.get(META_FWD), node.meta.get(META_BWD)
        unknown = fwd if isinstance(fwd, Unknown) else bwd if isinstance(bwd, Unknown) else None
        reason = str(unknown) if unknown else ""
        if isinstance(fwd, Moments) and fwd.std_range is not None:
            reason = f"σ varies along the sequence: {fwd.std_range[0]:.3g} … {fwd.std_range[1]:.3g}"
        rows.append({
            "name": node.name,
            "op": op_name(node.target) if node.op == "call_function" else node.op,
            "shape": list(concrete_shape(val.shape)),
            "pred_std": fwd.std if isinstance(fwd, Moments) else None,
            "pred_grad_std": bwd.rms if isinstance(bwd, Moments) else None,
            "meas_std": None,
            "meas_grad_std": None,
            "fp8": None,
            "fused_kernel": None,
            "status": "unknown" if unknown else "ok",
            "reason": reason,
        })
    return rows


def _underflow_note(decision) -> str:
    parts = [f"{what} {share:.1%}" for what, share in (("x", decision.x_underflow), ("d out", decision.grad_underflow))
             if share is not None]
    return "below the smallest normal after scaling: " + ", ".join(parts) if parts else ""


def _gemm_operands(gm: fx.GraphModule) -> list[tuple[str, dict[str, tuple]]]:
    """For each GEMM: {operand: (predicted σ, node name, "value" | "grad")}."""
    out = []
    for node in gm.graph.nodes:
        operands_of = GEMM_OPERANDS.get(node.target) if node.op == "call_function" else None
        g = operands_of(node) if operands_of else None
        if g is None:
            continue
        entries = {}
        out_node, _ = output_multiplier(node)  # a static multiplier after the GEMM is part of the FP8 op
        for label, n, key in (("x", g.x, META_FWD), ("w", g.w, META_FWD), ("grad_out", out_node, META_BWD)):
            value = n.meta.get(key)
            if isinstance(value, Moments):
                entries[label] = (value.std if key == META_FWD else value.rms, n.name, key)
        out.append((node.name, entries))
    return out


def _operand_checks(gemms, measured: dict[str, Measured]) -> list[OperandCheck]:
    checks = []
    for gemm, entries in gemms:
        for label, (predicted, name, key) in entries.items():
            m = measured.get(name)
            actual = None if m is None else (m.std if key == META_FWD else m.grad_rms)
            if actual and predicted > 0:
                checks.append(OperandCheck(gemm, label, predicted, actual))
    return checks


def _logits_loss(gm: fx.GraphModule):
    """None when the graph returns a scalar loss; else mean cross-entropy of its float outputs against
    random targets: the loss the analysis assumes when none is in the graph."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    vals = [n.meta.get("val") for n in output.all_input_nodes]
    if any(isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.numel() == 1 for v in vals):
        return None

    def loss(outputs):
        total = 0
        for o in outputs:
            if isinstance(o, torch.Tensor) and o.dtype.is_floating_point and o.dim() >= 1 and o.requires_grad:
                logits = o.reshape(-1, o.shape[-1]).float()
                targets = torch.randint(0, o.shape[-1], (logits.shape[0],), generator=torch.Generator().manual_seed(0))
                total = total + torch.nn.functional.cross_entropy(logits, targets)
        return total

    return loss


def _summary(report: Report, gemms: list, unknown_ops: list[str], measured: bool) -> dict:
    checks = report.operand_checks
    return {
        "gemms_total": len(gemms),
        "gemms_fp8": sum(d.fp8 for d in gemms),
        "unknown_ops": unknown_ops,
        "frac_within_sqrt2": (sum(abs(c.log2_error) <= SQRT2_LOG2 for c in checks) / len(checks))
        if measured and checks else None,
        "max_abs_log2_error": max(abs(c.log2_error) for c in checks) if measured and checks else None,
    }


def _format_table(rows: list[dict], summary: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)
    header = ("name", "op", "shape", "pred σ", "pred σ grad", "meas σ", "meas σ grad", "fp8 scales x/w/g", "kernel",
              "status", "reason")
    lines = [header]
    for r in rows:
        fp8 = "-" if r["fp8"] is None else "/".join(fmt(r["fp8"][k]) for k in ("x_scale", "w_scale", "grad_scale"))
        lines.append((r["name"], r["op"], "x".join(map(str, r["shape"])), fmt(r["pred_std"]), fmt(r["pred_grad_std"]),
                      fmt(r["meas_std"]), fmt(r["meas_grad_std"]), fp8, fmt(r["fused_kernel"]), r["status"], r["reason"]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line[:-1], widths)) + "  " + str(line[-1]) for line in lines]
    text.append(
        f"GEMMs in FP8: {summary.get('gemms_fp8')}/{summary.get('gemms_total')}; unknown: "
        f"{len(summary.get('unknown_ops') or [])}; within √2: {fmt(summary.get('frac_within_sqrt2'))}; "
        f"worst |log2 error|: {fmt(summary.get('max_abs_log2_error'))}"
    )
    return "\n".join(text)


__all__ = ["inspect", "Report", "OperandCheck", "ROW_KEYS"]
