"""Fold the ops that follow an FP8 GEMM into its epilogue: a table of (match, rewrite) patterns.

    before: fp8 = munit.fp8_linear.default(x, w, b, s_x, s_w, s_g, "e4m3", "e5m2")     # z, rounded to x.dtype
            act = aten.gelu.default(fp8, approximate="tanh")                           # act(z), rounded again
    after:  act = munit.fp8_linear.default(x, w, b, s_x, s_w, s_g, "e4m3", "e5m2", 1.0, "gelu_tanh")
                                                                                        # act(z) from fp32 z, rounded once

A pattern is a `Fusion`: `match(node)` returns what the rewrite needs, or None to decline (eligibility
apart from rewrite); `rewrite(gm, match)` edits the graph and returns the fused op's node, whose
arguments name the kernel the GEMM now runs as (`kernel_of`; the report's `fused_kernel`). The pass tries the patterns in table order at every node,
once, and counts which fired. The rewritten node keeps the replaced node's metadata (`val`, σ forward
and backward), so `meta` stays current; the graph is linted after the pass (pipeline).

Patterns not written yet (issue 5): norm → FP8 prologue (`codegen.triton.norm_cast`), the SwiGLU gate
product and the residual add in the epilogue, FP8 output for the next GEMM, saved FP8 copies for backward.
GPT-2's `gelu_new` is traced as its written-out formula (mul, pow, add, tanh, ...), not aten.gelu: it is
not matched.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

import munit_compile.ops  # noqa: F401  (registers munit::fp8_linear)
from munit_compile.ir import META_PLAN

aten = torch.ops.aten
FP8_LINEAR = torch.ops.munit.fp8_linear.default
_LINEAR_DEFAULTS = (1.0, "none")  # fp8_linear's trailing (alpha, activation) defaults
_N_REQUIRED = 8                    # fp8_linear's arguments before alpha


@dataclass(frozen=True)
class Fusion:
    name: str
    match: Callable[[fx.Node], Any]                   # node -> match, or None to decline
    rewrite: Callable[[fx.GraphModule, Any], fx.Node]  # (gm, match) -> the fused op's node


def linear_args(node: fx.Node) -> tuple:
    """An fp8_linear node's arguments with alpha and activation filled in (positional or keyword)."""
    args = list(node.args)
    for i, (name, default) in enumerate(zip(("alpha", "activation"), _LINEAR_DEFAULTS)):
        if len(args) <= _N_REQUIRED + i:
            args.append(node.kwargs.get(name, default))
    return tuple(args)


def kernel_name(activation: str) -> str:
    """The report's name of the FP8 GEMM kernel with this epilogue activation: fp8_gemm, fp8_gemm+gelu, ..."""
    return "fp8_gemm" if activation == "none" else f"fp8_gemm+{activation}"


def kernel_of(node: fx.Node) -> str:
    return kernel_name(linear_args(node)[-1])


# ---------------------------------------------------------------- pattern 1: FP8 GEMM → activation

def _gelu_activation(node: fx.Node) -> str | None:
    approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)


# aten op -> its name among `epilogue.ACTIVATIONS` (None declines: an unknown `approximate`)
ACTIVATION_OPS: dict[Any, Callable[[fx.Node], str | None]] = {
    aten.gelu.default: _gelu_activation,
    aten.silu.default: lambda node: "silu",
    aten.relu.default: lambda node: "relu",
}


@dataclass(frozen=True)
class _GemmActivation:
    gemm: fx.Node
    act: fx.Node
    activation: str


def _match_gemm_activation(node: fx.Node) -> _GemmActivation | None:
    """An fp8_linear without an activation whose only user is an activation of its output, same dtype."""
    if node.op != "call_function" or node.target is not FP8_LINEAR or linear_args(node)[-1] != "none":
        return None
    if len(node.users) != 1:
        return None  # z itself is needed elsewhere: fusing would have to write it too
    (user,) = node.users
    name_of = ACTIVATION_OPS.get(user.target) if user.op == "call_function" else None
    if name_of is None or not user.args or user.args[0] is not node:
        return None
    activation = name_of(user)
    if activation is None or user.meta["val"].dtype != node.meta["val"].dtype:
        return None
    return _GemmActivation(node, user, activation)


def _rewrite_gemm_activation(gm: fx.GraphModule, m: _GemmActivation) -> fx.Node:
    with gm.graph.inserting_before(m.act):
        fused = gm.graph.call_function(FP8_LINEAR, linear_args(m.gemm)[:-1] + (m.activation,))
    fused.meta.update(m.act.meta)  # its value is the activation's: val, σ forward and backward
    m.act.replace_all_uses_with(fused)
    gm.graph.erase_node(m.act)
    gm.graph.erase_node(m.gemm)
    return fused


FUSIONS: tuple[Fusion, ...] = (
    Fusion("gemm_activation", _match_gemm_activation, _rewrite_gemm_activation),
)


def fuse(gm: fx.GraphModule, fusions: tuple[Fusion, ...] = FUSIONS) -> tuple[dict[str, str], Counter]:
    """Apply the first matching pattern at every node; return ({GEMM decision's node: fused kernel},
    {pattern name: times it fired})."""
    kernels, fired = {}, Counter()
    alive = set(gm.graph.nodes)
    for node in list(gm.graph.nodes):
        if node not in alive:  # erased by an earlier rewrite
            continue
        for fusion in fusions:
            match = fusion.match(node)
            if match is None:
                continue
            plan = node.meta.get(META_PLAN)
            fused = fusion.rewrite(gm, match)
            if plan is not None:
                fused.meta[META_PLAN] = dataclasses.replace(plan, fused_kernel=kernel_of(fused))
                kernels[plan.node] = kernel_of(fused)
            fired[fusion.name] += 1
            alive = set(gm.graph.nodes)
            break
    gm.graph.lint()
    gm.recompile()
    return kernels, fired
