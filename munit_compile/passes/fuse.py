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

A written-out activation (GPT-2's `gelu_new`: mul, pow, add, tanh, ... on the Conv1D's view of the GEMM)
is recognised by `idioms.match_activation_idiom` ("gemm_activation_idiom"):

    before: fp8 = munit.fp8_linear.default(...);  x = aten.view.default(fp8, s);  ... y = aten.mul.Tensor(h, t)
    after:  fp8 = munit.fp8_linear.default(..., 1.0, "gelu_tanh");  x = aten.view.default(fp8, s)   # y → x
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
from munit_compile.passes import idioms

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


# ---------------------------------------------------------------- pattern 2: FP8 GEMM → written-out activation

VIEW_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})  # shape only
_WIDENED = frozenset({(torch.bfloat16, torch.float32), (torch.float16, torch.float32)})  # (GEMM, formula) dtypes


@dataclass(frozen=True)
class _GemmIdiom:
    gemm: fx.Node
    views: tuple[fx.Node, ...]  # single-user shape ops from the GEMM to the formula's input x (GPT-2's Conv1D)
    root: fx.Node               # the formula's last node: its value is act(x)
    formula: frozenset          # the nodes to erase (root included): x's only readers
    activation: str


def _view_chain(node: fx.Node) -> tuple[fx.Node, ...]:
    """The single-user shape-only ops applied to `node`, in order: z, view(z), ... (x is the last, or z)."""
    chain = []
    while len(node.users) == 1 and next(iter(node.users)).target in VIEW_OPS:
        node = next(iter(node.users))
        chain.append(node)
    return tuple(chain)


def _descendants(x: fx.Node, levels: int) -> list[fx.Node]:
    """The nodes at most `levels` user-steps below x, in graph order."""
    found, frontier = set(), {x}
    for _ in range(levels):
        frontier = {u for n in frontier for u in n.users} - found
        found |= frontier
    return sorted(found, key=list(x.graph.nodes).index)


def _match_gemm_activation_idiom(node: fx.Node) -> _GemmIdiom | None:
    """An fp8_linear without an activation whose output (through views) x is read only by a written-out
    activation (`idioms.IDIOMS`) that ends in the GEMM's dtype, or fp32 from a 16-bit GEMM (CUDA autocast's
    fp32 `pow`): the rewrite then upcasts the fused output, exactly."""
    if node.op != "call_function" or node.target is not FP8_LINEAR or linear_args(node)[-1] != "none":
        return None
    views = _view_chain(node)
    x = views[-1] if views else node
    for root in reversed(_descendants(x, idioms.IDIOM_DEPTH)):
        m = idioms.match_activation_idiom(root)
        if m is None or m[1] is not x or not set(x.users) <= m[2]:
            continue
        dtypes = (node.meta["val"].dtype, root.meta["val"].dtype)
        if dtypes[0] == dtypes[1] or dtypes in _WIDENED:
            return _GemmIdiom(node, views, root, m[2], m[0])
    return None


def _rewrite_gemm_activation_idiom(gm: fx.GraphModule, m: _GemmIdiom) -> fx.Node:
    """GEMM → fused GEMM, its views kept (now of act(z)), the root's readers → the last view (or its fp32
    upcast), the formula erased."""
    graph = gm.graph
    with graph.inserting_after(m.gemm):
        fused = graph.call_function(FP8_LINEAR, linear_args(m.gemm)[:-1] + (m.activation,))
    m.gemm.replace_all_uses_with(fused)
    out = m.views[-1] if m.views else fused
    for n in (fused, *m.views):  # their values are now the activation's (reshaped): σ forward and backward
        n.meta.update({**m.root.meta, "val": (m.gemm if n is fused else n).meta["val"]})
    if m.root.meta["val"].dtype != out.meta["val"].dtype:  # 16-bit act(z) → fp32: exact
        with graph.inserting_after(out):
            out = graph.call_function(aten._to_copy.default, (out,), {"dtype": m.root.meta["val"].dtype})
        out.meta.update(m.root.meta)
    m.root.replace_all_uses_with(out)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(m.formula, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    graph.erase_node(m.gemm)
    return fused


FUSIONS: tuple[Fusion, ...] = (
    Fusion("gemm_activation", _match_gemm_activation, _rewrite_gemm_activation),
    Fusion("gemm_activation_idiom", _match_gemm_activation_idiom, _rewrite_gemm_activation_idiom),
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
