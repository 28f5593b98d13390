"""What `unit_scale` needs to know about a captured graph: each weight GEMM and its role, each
parameter's role, and the residual adds with the norm that leads their branch.

A residual add is `add(skip, branch)` where `branch` depends on `skip` through at least one weight GEMM
(so rotary `q·cos + rot(q)·sin` or GELU's `x + c·x³` are not residuals). The branch's leading norm is the
node feeding all of the branch's first GEMMs, when the ops between `skip` and it include a normalization.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from munit_compile.ir import META_ROLE, aten, concrete_shape, tensor_of
from munit_compile.passes.fp8_plan import GEMM_OPERANDS, GemmOperands, feeds_output_or_loss
from munit_compile.passes.rules.shape import PASS_THROUGH

ROLES = ("hidden", "embedding", "head", "norm", "bias")
NORM_OPS = frozenset({aten.layer_norm.default, aten.rms_norm.default, aten.rsqrt.default})


@dataclass(frozen=True)
class Gemm:
    node: fx.Node
    operands: GemmOperands
    role: str  # "hidden" | "head"


@dataclass(frozen=True)
class Residual:
    add: fx.Node
    skip_index: int  # which argument of `add` is the skip path (the other is the branch)
    leading_norm: fx.Node | None  # the norm output feeding the branch's first GEMMs, if there is one

    @property
    def skip(self) -> fx.Node:
        return self.add.args[self.skip_index]

    @property
    def branch(self) -> fx.Node:
        return self.add.args[1 - self.skip_index]


def mark_parameters(gm: fx.GraphModule) -> None:
    """Tag get_attr nodes that read parameters (the FP8 plan's GEMM matchers look for the tag)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(_attr(gm, node.target), torch.nn.Parameter):
            node.meta[META_ROLE] = "parameter"


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def embedding_tables(gm: fx.GraphModule) -> list[fx.Node]:
    return [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding.default]


def find_gemms(gm: fx.GraphModule) -> list[Gemm]:
    """Every weight GEMM (linear, Conv1D's addmm, x @ Wᵀ) with role "head" (tied to an embedding, or N =
    vocabulary feeding the loss/logits) or "hidden"."""
    tables = embedding_tables(gm)
    table_tensors = {id(_attr(gm, t.target)) for t in tables if t.op == "get_attr"}
    vocab = {concrete_shape(tensor_of(t).shape)[0] for t in tables}
    found = []
    for node in gm.graph.nodes:
        matcher = GEMM_OPERANDS.get(node.target) if node.op == "call_function" else None
        operands = matcher(node) if matcher else None
        if operands is None or operands.w.op != "get_attr":
            continue
        tied = id(_attr(gm, operands.w.target)) in table_tensors
        head = tied or (operands.n in vocab and feeds_output_or_loss(node, operands.n))
        found.append(Gemm(node, operands, "head" if head else "hidden"))
    return found


def parameter_roles(gm: fx.GraphModule, gemms: list[Gemm]) -> dict[str, str]:
    """Qualified parameter name -> role: GEMM weights by their GEMM, embedding tables, GEMM biases
    ("bias"), every other parameter (norm gains and biases) "norm"."""
    roles: dict[str, str] = {}
    for t in embedding_tables(gm):
        if t.op == "get_attr":
            roles[t.target] = "embedding"
    for g in gemms:
        roles.setdefault(g.operands.w.target, g.role)
        if isinstance(g.operands.bias, fx.Node) and g.operands.bias.op == "get_attr":
            roles[g.operands.bias.target] = "bias"
    assigned = {id(gm.get_parameter(name)): role for name, role in roles.items()}
    for name, p in gm.named_parameters(remove_duplicate=False):  # a tied weight: every name, one role
        roles.setdefault(name, assigned.get(id(p), "norm"))
    return roles


def find_residuals(gm: fx.GraphModule, gemms: list[Gemm]) -> list[Residual]:
    """Residual adds in graph order (see the module docstring)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    gemm_nodes = {g.node for g in gemms}
    found = []
    for node in gm.graph.nodes:
        if node.target not in (aten.add.Tensor, aten.add_.Tensor) or node.kwargs.get("alpha", 1) != 1:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        ta, tb = tensor_of(a), tensor_of(b)
        if ta is None or tb is None or ta.shape != tb.shape or not ta.dtype.is_floating_point:
            continue
        for skip_index, (skip, branch) in enumerate(((a, b), (b, a))):
            if _reaches_through_gemm(skip, branch, gemm_nodes, order):
                found.append(Residual(node, skip_index, _leading_norm(skip, branch, gemm_nodes, order)))
                break
    return found


def _reaches_through_gemm(skip: fx.Node, branch: fx.Node, gemm_nodes: set, order: dict) -> bool:
    """Whether `branch` depends on `skip` along a path that passes a weight GEMM."""
    start = order[skip]
    stack, seen = [(branch, branch in gemm_nodes)], set()
    while stack:
        node, through = stack.pop()
        for arg in node.all_input_nodes:
            if arg is skip and through:
                return True
            state = (arg, through or arg in gemm_nodes)
            if order.get(arg, -1) > start and state not in seen:
                seen.add(state)
                stack.append(state)
    return False


def _ancestors_after(node: fx.Node, start: int, order: dict) -> set:
    found, stack = set(), [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if order.get(arg, -1) > start and arg not in found:
                found.add(arg)
                stack.append(arg)
    return found


def _strip_views(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in PASS_THROUGH and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _leading_norm(skip: fx.Node, branch: fx.Node, gemm_nodes: set, order: dict) -> fx.Node | None:
    """The node every first GEMM of the branch reads as x, if a normalization lies between skip and it."""
    inside = _ancestors_after(branch, order[skip], order) | {branch}
    first, stack, seen = [], [skip], set()
    while stack:
        for user in stack.pop().users:
            if user not in inside or user in seen:
                continue
            seen.add(user)
            if user in gemm_nodes:
                first.append(user)
            else:
                stack.append(user)
    if not first:
        return None
    sources = {_strip_views(GEMM_OPERANDS[g.target](g).x) for g in first}
    if len(sources) != 1:
        return None
    (source,) = sources
    prologue = _ancestors_after(source, order[skip], order) | {source}
    return source if any(n.target in NORM_OPS for n in prologue if n.op == "call_function") else None
