"""The whole munit flow in one place: an ordered list of named passes over one graph.

    Dynamo graph ─normalize─▶ pre-dispatch ATen ─variance─▶ σ on every node ─fp8_plan─▶ munit ops
    ─fuse─▶ epilogues folded into the FP8 GEMMs ─▶ aot_autograd + Inductor (backend.py) for the rest.

Each pass is `fn(state) -> None`, mutating `state.gm`; after each the graph is linted, and its wall
time is recorded in the report.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch.fx as fx

from munit_compile.config import Config
from munit_compile.ir import META_BWD, META_FWD
from munit_compile.passes.fp8_plan import GemmDecision, plan_fp8
from munit_compile.passes.fuse import fuse
from munit_compile.passes.normalize import normalize_to_aten
from munit_compile.passes.values import Unknown
from munit_compile.passes.variance import ParameterMoments, propagate

log = logging.getLogger("munit_compile")


@dataclass
class CompileReport:
    """What the pipeline did to one graph: the GEMM decisions, the unknown ops, each pass's time."""

    gemms: list[GemmDecision] = field(default_factory=list)
    fusions: Counter = field(default_factory=Counter)  # fusion pattern name -> times it fired
    unknowns: Counter = field(default_factory=Counter)  # Unknown (where the analysis lost track) -> nodes affected
    pass_seconds: dict[str, float] = field(default_factory=dict)
    failure: str | None = None  # set when a pass raised and the graph was compiled unchanged

    @property
    def gemms_fp8(self) -> int:
        return sum(d.fp8 for d in self.gemms)

    @property
    def unknown_ops(self) -> list[str]:
        """The ops (or inputs) where the analysis lost track, sorted."""
        return sorted({u.op for u in self.unknowns})

    def summary(self) -> str:
        line = f"munit: {self.gemms_fp8}/{len(self.gemms)} GEMMs in FP8"
        if self.unknowns:
            line += "; analysis lost track at: " + ", ".join(f"{u} ({n} nodes)" for u, n in self.unknowns.items())
        return line


@dataclass
class PipelineState:
    gm: fx.GraphModule
    example_inputs: Sequence
    config: Config
    report: CompileReport
    parameter_moments: ParameterMoments | None = None  # for parameters without values (meta device)


def _normalize(state: PipelineState) -> None:
    state.gm = normalize_to_aten(state.gm, state.example_inputs)


def _variance(state: PipelineState) -> None:
    propagate(state.gm, state.example_inputs, state.config.grad_output_std, state.parameter_moments,
              symbolic=state.config.symbolic)
    for node in state.gm.graph.nodes:
        unknowns = {v for v in (node.meta.get(META_FWD), node.meta.get(META_BWD)) if isinstance(v, Unknown)}
        state.report.unknowns.update(unknowns)


def _fp8_plan(state: PipelineState) -> None:
    state.report.gemms = plan_fp8(state.gm, state.config)


def _fuse(state: PipelineState) -> None:
    if not state.config.fuse:
        return
    kernels, fired = fuse(state.gm)
    state.report.fusions.update(fired)
    state.report.gemms = [dataclasses.replace(d, fused_kernel=kernels[d.node]) if d.node in kernels else d
                          for d in state.report.gemms]


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[PipelineState], None]


PIPELINE: tuple[Pass, ...] = (
    Pass("normalize", _normalize),
    Pass("variance", _variance),
    Pass("fp8_plan", _fp8_plan),
    Pass("fuse", _fuse),
)


def run_pipeline(
    gm: fx.GraphModule,
    example_inputs: Sequence,
    config: Config,
    after_pass: Callable[[str, PipelineState], None] | None = None,
    parameter_moments: ParameterMoments | None = None,
) -> tuple[fx.GraphModule, CompileReport]:
    """Run every pass in order; return the rewritten graph and its report (also logged).

    `after_pass(name, state)` is called after each pass (e.g. `munit.inspect` measures the graph
    after "variance", before the FP8 rewrite).
    """
    state = PipelineState(gm, example_inputs, config, CompileReport(), parameter_moments)
    for p in PIPELINE:
        start = time.perf_counter()
        p.run(state)
        state.gm.graph.lint()
        state.report.pass_seconds[p.name] = time.perf_counter() - start
        if after_pass is not None:
            after_pass(p.name, state)
    _log_report(state.report)
    return state.gm, state.report


def _log_report(report: CompileReport) -> None:
    for d in report.gemms:
        if d.fp8:
            log.debug("munit: %s -> FP8 (s_x=%g, s_w=%g, s_g=%g) as %s", d.node, d.x_scale, d.w_scale, d.grad_scale,
                      d.fused_kernel)
        else:
            log.info("munit: %s stays in high precision: %s", d.node, d.reason)
    if report.unknown_ops:
        log.warning("%s; GEMMs that depend on them stay in high precision", report.summary())
    if not report.gemms:
        log.warning("munit: nothing converted to FP8: this graph has no linear/addmm GEMM")
    elif report.gemms_fp8 == 0:
        reasons = Counter(d.reason for d in report.gemms)
        log.warning(
            "munit: nothing converted to FP8: none of the %d GEMMs is eligible (%s)",
            len(report.gemms), "; ".join(f"{r} ×{n}" for r, n in reasons.items()),
        )
    else:
        log.info(report.summary())
