"""`munit inspect --plot`: predicted and measured σ per GEMM operand against the FP8 normal ranges."""
from __future__ import annotations

from munit_compile.inspect_cli.common import E4M3_NORMAL, E5M2_NORMAL


def write_plot(report, path: str, title: str) -> None:
    """One PNG: per GEMM operand, predicted (hollow) and measured (filled) σ on a log2 axis, forward (x, W)
    and backward (d output), with σ after the static scale (what is cast) and the FP8 normal ranges shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fp8 = {r["name"]: r["fp8"] for r in report.rows if r["fp8"] is not None}
    gemms = list(dict.fromkeys(c.gemm for c in report.operand_checks))
    pos = {g: i for i, g in enumerate(gemms)}
    fig = Figure(figsize=(13, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    panels = (("forward: x and W (E4M3)", (("x", "tab:blue", "x_scale"), ("w", "tab:orange", "w_scale")),
               E4M3_NORMAL, "E4M3 normal range"),
              ("backward: d output (E5M2)", (("grad_out", "tab:green", "grad_scale"),), E5M2_NORMAL, "E5M2 normal range"))
    axes = fig.subplots(1, 2, sharey=False)
    for ax, (name, operands, band, band_label) in zip(axes, panels):
        ax.axhspan(*band, color="tab:green", alpha=0.08, zorder=0, label=band_label)
        for edge in band:
            ax.axhline(edge, color="tab:green", lw=0.8, ls="--", zorder=1)
        values = []
        for k, (operand, color, scale_key) in enumerate(operands):
            offset = (k - (len(operands) - 1) / 2) * 0.2
            checks = [c for c in report.operand_checks if c.operand == operand]
            xs = [pos[c.gemm] + offset for c in checks]
            ax.scatter(xs, [c.predicted for c in checks], s=40, facecolors="none", edgecolors=color,
                       label=f"{operand} predicted", zorder=3)
            ax.scatter(xs, [c.measured for c in checks], s=12, color=color, label=f"{operand} measured", zorder=4)
            scaled = [(pos[c.gemm] + offset, c.measured * fp8[c.gemm][scale_key]) for c in checks if c.gemm in fp8]
            if scaled:
                ax.scatter(*zip(*scaled), s=30, marker="_", color=color, label=f"{operand} measured × static scale",
                           zorder=4)
            values += [c.predicted for c in checks] + [c.measured for c in checks] + [v for _, v in scaled]
        ax.set_yscale("log", base=2)
        if values:
            lo, hi = min(values), max(values)
            ax.set_ylim(min(lo, band[0]) / 4, max(hi * 4, min(band[1], hi * 2**8)))
        ax.set_title(name)
        ax.set_ylabel("σ (log2 axis)")
        ax.set_xticks(range(len(gemms)))
        labels = [g + ("" if g in fp8 else " (hp)") for g in gemms]
        ax.set_xticklabels(labels if len(gemms) <= 40 else [""] * len(gemms), rotation=90, fontsize=7)
        ax.set_xlabel("GEMM (graph order; hp = kept in high precision)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png")
