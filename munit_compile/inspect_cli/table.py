"""The `munit inspect` terminal table (rich) and its summary line."""
from __future__ import annotations

import math

from munit_compile.ir import op_name
from munit_compile.passes.fp8_plan import GEMM_OPERANDS


GEMM_OPS = frozenset(op_name(op) for op in GEMM_OPERANDS)  # the ops the FP8 plan treats as weight GEMMs


def is_gemm_row(row: dict, gemm_names: set[str] = frozenset()) -> bool:
    """A weight GEMM: planned in FP8, kept in high precision, or a linear the analysis lost track of."""
    return (row["fp8"] is not None or row["status"] == "high_precision" or row["name"] in gemm_names
            or (row["status"] == "unknown" and row["op"] in GEMM_OPS))


def _short_op(op: str) -> str:
    return op.removeprefix("aten.").removesuffix(".default")


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _log2_err(pred, meas) -> str:
    if not pred or not meas or pred <= 0 or meas <= 0:
        return "-"
    return f"{math.log2(pred / meas):+.2f}"


def _pow2(s: float) -> str:
    e = math.log2(s)
    return "1" if e == 0 else f"2^{int(e)}" if e == int(e) else f"{s:.3g}"


def render_table(report, only: str, console, title: str) -> None:
    """The rich table of the report's rows (GEMMs only unless only == "all") and its summary line."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    gemm_names = {c.gemm for c in report.operand_checks}
    rows = [r for r in report.rows if only == "all" or is_gemm_row(r, gemm_names)]
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", title_justify="left", pad_edge=False)
    for header, justify in (("node", "left"), ("op", "left"), ("shape", "left"), ("pred σ", "right"),
                            ("pred σ∇", "right"), ("meas σ", "right"), ("meas σ∇", "right"),
                            ("log2 err σ/σ∇", "right"), ("FP8 x/w/∇", "left"), ("scales x/w/∇", "left"),
                            ("fused", "left"), ("status: reason", "left")):
        table.add_column(header, justify=justify, overflow="fold")
    style = {"ok": "", "high_precision": "yellow", "unknown": "red"}
    for r in rows:
        fp8 = r["fp8"]
        formats = "/".join(fp8[k].upper() for k in ("x_format", "w_format", "grad_format")) if fp8 else "-"
        scales = "/".join(_pow2(fp8[k]) for k in ("x_scale", "w_scale", "grad_scale")) if fp8 else "-"
        err = f"{_log2_err(r['pred_std'], r['meas_std'])} {_log2_err(r['pred_grad_std'], r['meas_grad_std'])}"
        reason = r["reason"].replace("below the smallest normal after scaling:", "underflow after scaling:")
        status = r["status"] + (f": {reason}" if reason else "")
        cells = (r["name"], _short_op(r["op"]), "×".join(map(str, r["shape"])), _num(r["pred_std"]),
                 _num(r["pred_grad_std"]), _num(r["meas_std"]), _num(r["meas_grad_std"]),
                 err if r["meas_std"] is not None else "-", formats, scales, r["fused_kernel"] or "-", status)
        table.add_row(*(Text(c) for c in cells), style=style[r["status"]])
    console.print(table)
    console.print(summary_line(report), highlight=False)


def summary_line(report) -> str:
    s = report.summary
    unknown = ", ".join(s["unknown_ops"]) if s["unknown_ops"] else "none"
    line = f"GEMMs in FP8: {s['gemms_fp8']}/{s['gemms_total']} · unknown ops: {unknown}"
    if s["max_abs_log2_error"] is None:
        return line + " · not measured (--measure compares predictions with one forward/backward)"
    (worst,) = report.worst(1)
    return (f"{line} · GEMM operands within √2: {s['frac_within_sqrt2']:.0%} of {len(report.operand_checks)} · "
            f"worst |log2 error| {s['max_abs_log2_error']:.2f} ({worst.gemm} {worst.operand})")
