"""analysis-scaling: munit's analysis time against graph size, over depth (6…48 layers) and width.

Each point: a transformers Llama built on the meta device (nothing allocated), captured once by Dynamo;
then the munit pipeline (normalize, variance, fp8_plan; numbers only, as the compile path runs it) is
timed, median of --repeats, against the node count of the normalized ATen graph. A least-squares line
time = a·nodes + b and its R² say whether the cost is linear in graph size; width should not matter
(shapes are symbols of the analysis, not work).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np   # noqa: E402
import torch   # noqa: E402

from benchmarks.analysis_time import build_llama, transformers_init   # noqa: E402
from benchmarks.common import benchmark_parser, environment, publish, pyplot, save_figure  # noqa: E402
from munit_compile.config import Config   # noqa: E402
from munit_compile.pipeline import run_pipeline   # noqa: E402

DEPTHS, DEPTH_WIDTH = (6, 12, 24, 48), 1024
WIDTHS, WIDTH_DEPTH = (512, 1024, 2048, 4096), 12
SMOKE_DEPTHS, SMOKE_WIDTHS = (1, 2), (128, 256)


def capture(layers: int, width: int, seq: int = 512):
    """(FX graph, example inputs) of one Llama forward+loss on the meta device."""
    torch._dynamo.reset()
    model = build_llama(layers, width, max(1, width // 128), width * 8 // 3 // 64 * 64, 32000)
    ids = torch.randint(0, 32000, (1, seq), device="meta")
    graphs = []

    def keep(gm, inputs):
        graphs.append((gm, inputs))
        return gm.forward

    torch.compile(model, backend=keep, dynamic=False)(input_ids=ids, labels=ids, use_cache=False)
    if len(graphs) != 1:
        raise RuntimeError(f"expected one graph, Dynamo captured {len(graphs)}")
    return graphs[0]


def time_analysis(layers: int, width: int, repeats: int) -> dict:
    gm, inputs = capture(layers, width)
    seconds, passes, nodes = [], [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        planned, report = run_pipeline(gm, inputs, Config(), parameter_moments=transformers_init)
        seconds.append(time.perf_counter() - start)
        passes.append(report.pass_seconds)
        nodes = len(planned.graph.nodes)
    point = {"layers": layers, "width": width, "nodes": nodes, "seconds": statistics.median(seconds),
             "pass_seconds": {k: statistics.median(p[k] for p in passes) for k in passes[0]},
             "gemms_fp8": report.gemms_fp8, "gemms_total": len(report.gemms)}
    print(f"  {layers:3d} layers d {width:5d}: {nodes:6d} nodes  {point['seconds']:.3f} s ("
          + ", ".join(f"{k} {v:.3f}" for k, v in point["pass_seconds"].items())
          + f"; {point['gemms_fp8']}/{point['gemms_total']} GEMMs FP8)", file=sys.stderr)
    return point


def linear_fit(points: list[dict], seconds=lambda p: p["seconds"]) -> dict:
    x = np.array([p["nodes"] for p in points], dtype=float)
    y = np.array([seconds(p) for p in points], dtype=float)
    a, b = np.polyfit(x, y, 1)
    residual = y - (a * x + b)
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum()) if len(x) > 2 else 1.0
    return {"seconds_per_node": float(a), "intercept_s": float(b), "r2": r2}


def headline(result: dict) -> dict:
    return {"ms_per_1k_nodes": result["depth_fit"]["seconds_per_node"] * 1e6, "depth_fit_r2": result["depth_fit"]["r2"],
            "deepest_s": result["depth"][-1]["seconds"],
            "variance_ms_per_1k_nodes": result["pass_fits"]["variance"]["seconds_per_node"] * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("analysis-scaling", __doc__, "1-2 layers, two small widths, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    depths, widths, repeats = (SMOKE_DEPTHS, SMOKE_WIDTHS, 1) if args.smoke else (DEPTHS, WIDTHS, args.repeats)
    depth_width, width_depth = (widths[0], depths[0]) if args.smoke else (DEPTH_WIDTH, WIDTH_DEPTH)
    print(f"analysis-scaling: depth {depths} at d {depth_width}; width {widths} at {width_depth} layers", file=sys.stderr)
    start = time.perf_counter()
    depth = [time_analysis(n, depth_width, repeats) for n in depths]
    width = [time_analysis(width_depth, d, repeats) for d in widths]
    result = {"benchmark": "analysis-scaling", **environment(), "smoke": args.smoke, "repeats": repeats,
              "depth": depth, "width": width, "depth_fit": linear_fit(depth),
              "pass_fits": {name: linear_fit(depth, lambda p, name=name: p["pass_seconds"][name])
                            for name in depth[0]["pass_seconds"]},
              "width_spread": max(p["seconds"] for p in width) / min(p["seconds"] for p in width),
              "seconds": time.perf_counter() - start}
    fit = result["depth_fit"]
    print(f"  time ≈ {fit['seconds_per_node'] * 1e3:.3f} ms/node · nodes + {fit['intercept_s']:.2f} s (R² {fit['r2']:.4f}); "
          f"over widths the time varies {result['width_spread']:.2f}×", file=sys.stderr)
    publish(result, args.json, args.png, "analysis_scaling", headline(result), plot)
    return 0


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    nodes = [p["nodes"] for p in result["depth"]]
    left.plot(nodes, [p["seconds"] for p in result["depth"]], "o", label="measured")
    fit = result["depth_fit"]
    left.plot(nodes, [fit["seconds_per_node"] * n + fit["intercept_s"] for n in nodes], "-",
              label=f"linear fit (R² {fit['r2']:.3f})")
    for p in result["depth"]:
        left.annotate(f"{p['layers']} layers", (p["nodes"], p["seconds"]), fontsize=8)
    left.set_xlabel("ATen graph nodes")
    left.set_ylabel("analysis time (s)")
    left.legend()
    right.plot([p["width"] for p in result["width"]], [p["seconds"] for p in result["width"]], "o-")
    right.set_xscale("log", base=2)
    right.set_xlabel(f"width ({result['width'][0]['layers']} layers)")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"analysis-scaling: {result['machine']}, commit {result['commit']}", fontsize=9)
    save_figure(fig, path)
