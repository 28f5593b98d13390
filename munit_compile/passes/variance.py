"""Analytic scale propagation: forward moments of every tensor, backward second moments of every gradient.

    propagate(gm, example_inputs, grad_output_std=None, parameter_moments=None)
      node.meta[META_FWD] = Moments | Unknown | NotFloat     (forward, in graph order)
      node.meta[META_BWD] = Moments | Unknown                (backward, from the loss)

Forward: parameters are measured (their σ at compile time); subgraphs of constants (masks, positions,
rotary tables) are folded exactly; every other op uses its rule in `passes.rules`. An op without a rule
gives `Unknown(op)`, which propagates to everything that depends on it. An in-place op updates the
tensor it writes (unknown when written only in part).
Backward starts at the loss when the graph returns a scalar (d loss = 1); otherwise each float output is
taken as logits of a mean cross-entropy over its tokens, σ = √((1−1/V)/V)/N, or `grad_output_std`.
"""
from __future__ import annotations

import dataclasses
import logging
import operator
from collections import defaultdict
from typing import Callable, Sequence

import torch
import torch.fx as fx

from munit_compile.ir import META_BWD, META_FWD, META_ROLE, aten, concrete_int, numel, op_name
from munit_compile.passes.rules import BACKWARD_RULES, FORWARD_RULES, Site, grad
from munit_compile.passes.rules.shape import SAME_MOMENTS
from munit_compile.passes.rules.sparse import cross_entropy_grad_m2
from munit_compile.passes.symbolic import META_DIMS, DimNames, bind_backward, bind_forward
from munit_compile.passes.values import Moments, NotFloat, Unknown, first_unknown

log = logging.getLogger("munit_compile")

FOLD_MAX_NUMEL = 1 << 22  # constant subgraphs larger than this are not folded (memory)

PARTIAL_VIEWS = frozenset({  # views of part of a tensor: an in-place write through them changes only that part
    aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.as_strided.default, aten.diagonal.default,
    aten.unfold.default, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
})

# Ops whose integer/bool tensor inputs are indices or masks, not values (their rules account for them).
INTEGER_INPUT_OPS = frozenset({
    aten.embedding.default, aten.cross_entropy_loss.default, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.scaled_dot_product_attention.default, aten.index_select.default, aten.gather.default,
    aten.index.Tensor,
})


ParameterMoments = Callable[[torch.Tensor], "Moments | None"]


def propagate(gm: fx.GraphModule, example_inputs: Sequence, grad_output_std: float | None = None,
              parameter_moments: ParameterMoments | None = None, symbolic: bool = False) -> None:
    """Annotate every node with forward and backward statistics (see the module docstring).

    `parameter_moments(param)` supplies the moments of parameters that have no values to measure
    (on the meta device): the init the user intends, e.g. N(0, 0.02²) for matrices, ones for norm gains.
    `symbolic=True` also records each node's moments as sympy expressions over the graph's dims
    (`passes.symbolic`); the numbers are the same either way.
    """
    dims = DimNames.of_graph(gm) if symbolic else None
    if dims is not None:
        gm.meta[META_DIMS] = dims
    propagate_forward(gm, example_inputs, parameter_moments, dims)
    propagate_backward(gm, grad_output_std, dims)


# ---------------------------------------------------------------- forward

def propagate_forward(gm: fx.GraphModule, example_inputs: Sequence,
                      parameter_moments: ParameterMoments | None = None, dims: DimNames | None = None,
                      before_node: Callable[[fx.Node], None] | None = None) -> None:
    """Forward half of `propagate`; `before_node(node)` runs before each call_function node's value is
    computed (its inputs' values are known then: unit_scale sets static multipliers from them)."""
    bind = (lambda node, value: bind_forward(node, value, _argument_values(node))) if dims is not None \
        else (lambda node, value: value)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        node.meta[META_FWD] = bind(node, _input_value(node, example, parameter_moments))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                node.meta[META_FWD] = bind(node, _input_value(node, _get_attr(gm, node.target)))
            except RuntimeError as err:  # e.g. a functorch-wrapped constant with no readable storage
                node.meta[META_FWD] = Unknown(f"constant {node.target}", f"cannot be read: {err}")
        elif node.op == "call_function":
            if before_node is not None:
                before_node(node)
            node.meta[META_FWD] = bind(node, forward_value(node, dims))
            if _mutates_first_arg(node):
                _record_in_place_write(node)


def _argument_values(node: fx.Node) -> list:
    return [n.meta.get(META_FWD) for n in node.all_input_nodes]


def _input_value(node: fx.Node, example, parameter_moments: ParameterMoments | None = None):
    """A graph input's Value: parameters measured, other float inputs measured and folded, ints not float."""
    if isinstance(example, (int, torch.SymInt)):
        return concrete_int(example)  # a (dynamic) size: its example value, so constants can be folded
    if not isinstance(example, torch.Tensor):
        return None
    role = "parameter" if isinstance(example, torch.nn.Parameter) else "buffer_or_input"
    node.meta.setdefault(META_ROLE, role)
    real = not (example.is_meta or isinstance(example, torch._subclasses.FakeTensor))
    if not example.dtype.is_floating_point:
        return NotFloat(concrete=example.detach() if real else None)
    if not real and role == "parameter" and parameter_moments is not None:
        return parameter_moments(example) or Unknown(f"parameter {node.name}", "parameter_moments gave None")
    if not real:
        hint = "; pass parameter_moments for meta-device parameters" if role == "parameter" else ""
        return Unknown(f"input {node.name}", f"no concrete value to measure{hint}")
    keep = role != "parameter" and example.numel() <= FOLD_MAX_NUMEL
    return Moments.of_tensor(example, keep=keep)


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def forward_value(node: fx.Node, dims: DimNames | None = None):
    """The Value of one call_function node, from its inputs' Values (sizes as Dims if `dims`)."""
    if node.target is operator.getitem:
        parent, index = node.args
        parent_value = parent.meta.get(META_FWD)
        return parent_value[index] if isinstance(parent_value, (tuple, list)) else parent_value
    args = fx.map_arg(node.args, lambda n: n.meta.get(META_FWD))
    kwargs = fx.map_arg(node.kwargs, lambda n: n.meta.get(META_FWD))
    folded = _fold(node, args, kwargs)
    if folded is not None:
        return folded
    val = node.meta.get("val")
    if isinstance(val, (int, torch.SymInt)):
        return _example_int(val)  # a size computed in the graph: its example value (for folding)
    if not isinstance(val, (torch.Tensor, tuple, list)):
        return None  # another Python/symbolic scalar (e.g. .item()): not a tensor, nothing to scale
    if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
        return NotFloat()
    unknown = first_unknown(*args, *kwargs.values())
    if unknown is not None:
        return unknown
    rule = FORWARD_RULES.get(node.target)
    if rule is None:
        return Unknown(op_name(node.target), "no variance rule")
    if any(isinstance(v, NotFloat) for v in _tensor_values(args, kwargs)) and node.target not in INTEGER_INPUT_OPS:
        return Unknown(op_name(node.target), "a float computed from a non-constant integer tensor")
    try:
        return rule(Site(node, args, kwargs, dims=dims))
    except Exception as err:  # a rule that cannot handle this use of its op must not abort compilation
        log.debug("variance rule for %s failed: %s", node.format_node(), err)
        return Unknown(op_name(node.target), f"rule failed: {err}")


def _mutates_first_arg(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.arguments:
        return False
    alias = target._schema.arguments[0].alias_info
    return alias is not None and alias.is_write and isinstance(node.args[0], fx.Node)


def _record_in_place_write(node: fx.Node) -> None:
    """An in-place op changes its first argument: later readers of that tensor see the new value.
    Written whole (x.mul_(s)), the tensor takes the op's result; written through a view
    (buf[:, t].copy_(v)), what the tensor now holds is not predicted: Unknown."""
    target, through_view = node.args[0], False
    while target.op == "call_function" and _is_view(target.target) and isinstance(target.args[0], fx.Node):
        through_view |= target.target in PARTIAL_VIEWS
        target = target.args[0]
    result = node.meta[META_FWD]
    if through_view or not isinstance(result, (Moments, NotFloat)):
        result = result if isinstance(result, Unknown) else Unknown(op_name(node.target), "in-place write into part of a tensor")
    target.meta[META_FWD] = result


def _is_view(target) -> bool:
    """Whether the op's output aliases its first input (a view), from its schema."""
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.returns:
        return False
    alias = target._schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _example_int(val):
    try:
        return concrete_int(val)
    except ValueError:  # data-dependent: no example value
        return None


def _tensor_values(args, kwargs):
    out = []
    fx.node.map_aggregate((args, kwargs), lambda v: out.append(v) if isinstance(v, (Moments, NotFloat, Unknown)) else v)
    return out


def _fold(node: fx.Node, args, kwargs):
    """Evaluate a node whose tensor inputs are all concrete constants (masks, positions, rotary tables)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    if torch.Tag.nondeterministic_seeded in node.target.tags or node.target._schema.is_mutable:
        return None
    values = _tensor_values(args, kwargs)
    if any(getattr(v, "concrete", None) is None for v in values):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and numel(val.shape) > FOLD_MAX_NUMEL or not values and "empty" in node.target.__name__:
        return None
    as_real = lambda v: v.concrete if isinstance(v, (Moments, NotFloat)) else concrete_int(v) if isinstance(v, torch.SymInt) else v
    real_args = fx.node.map_aggregate(args, as_real)
    real_kwargs = fx.node.map_aggregate(kwargs, as_real)
    if isinstance(real_kwargs.get("device"), torch.device) and real_kwargs["device"].type == "meta":
        real_kwargs = {**real_kwargs, "device": torch.device("cpu")}  # constants of a meta model: build on CPU
    try:
        result = node.target(*real_args, **real_kwargs)
    except Exception as err:
        log.debug("could not fold %s: %s", node.format_node(), err)
        return None
    if isinstance(result, (int, float, bool)):
        return result  # e.g. .item() of a folded constant: a Python number the rules take as a constant
    if not isinstance(result, torch.Tensor) or result.is_meta:
        return None
    if result.dtype.is_floating_point:
        source = values[0] if values else None
        if node.target in SAME_MOMENTS and isinstance(source, Moments) and source.concrete.dtype == result.dtype:
            return dataclasses.replace(source, concrete=result.detach())  # a rearranged constant: same moments
        return Moments.of_tensor(result, keep=True)
    return NotFloat(concrete=result)


# ---------------------------------------------------------------- backward

def propagate_backward(gm: fx.GraphModule, grad_output_std: float | None = None,
                       dims: DimNames | None = None) -> None:
    contributions: dict[fx.Node, list] = defaultdict(list)
    for node, g in output_seeds(gm, grad_output_std, dims):
        contributions[node].append(g)
    for node in reversed(gm.graph.nodes):
        if node not in contributions:
            continue
        g = _accumulate(contributions.pop(node))
        if dims is not None:
            g = bind_backward(node, g)
        node.meta[META_BWD] = g
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            parent, index = node.args
            contributions[parent].append((index, g))
            continue
        for arg, arg_grad in _input_grads(node, g, dims):
            contributions[arg].append(arg_grad)


def output_seeds(gm: fx.GraphModule, grad_output_std: float | None, dims: DimNames | None = None):
    """(node, d loss/d node) for the graph outputs the gradient starts from."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = [n for n in fx.node.map_aggregate(output.args[0], lambda x: x) if isinstance(n, fx.Node)] \
        if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    floats = [n for n in outs if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype.is_floating_point]
    losses = [n for n in floats if n.meta["val"].numel() == 1 and not isinstance(n.meta.get(META_FWD), NotFloat)]
    if losses:
        return [(n, grad(1.0)) for n in losses]
    seeds = []
    for n in floats:
        shape = n.meta["val"].shape
        if grad_output_std is not None:
            seeds.append((n, grad(grad_output_std**2)))
        elif len(shape) >= 1 and shape[-1] > 1:
            sizes = tuple(dims.dim(s) for s in shape) if dims is not None else tuple(int(s) for s in shape)
            vocab = sizes[-1]
            seeds.append((n, grad(cross_entropy_grad_m2(vocab, max(numel(sizes) // vocab, 1)))))
    return seeds


def _accumulate(parts: list):
    """Sum of independent gradient contributions (m2 adds); getitem parts stay keyed by index."""
    if parts and isinstance(parts[0], tuple):
        by_index: dict[int, list] = defaultdict(list)
        for index, g in parts:
            by_index[index].append(g)
        pieces = {i: _accumulate(gs) for i, gs in by_index.items()}
        return first_unknown(*pieces.values()) or pieces  # an unknown piece keeps its own origin
    unknown = first_unknown(*parts)
    if unknown is not None:
        return unknown
    return grad(sum(p.m2 for p in parts))


def _input_grads(node: fx.Node, g, dims: DimNames | None = None):
    """(arg node, its grad contribution) for each float tensor argument that is not a constant."""
    args = fx.map_arg(node.args, lambda n: n.meta.get(META_FWD))
    kwargs = fx.map_arg(node.kwargs, lambda n: n.meta.get(META_FWD))
    targets = _differentiable_args(node)
    if not targets:
        return []
    if isinstance(g, Unknown):
        return [(n, g) for n in targets]
    out_value = node.meta.get(META_FWD)
    rule = BACKWARD_RULES.get(node.target)
    if rule is None:
        return [(n, Unknown(op_name(node.target), "no gradient rule")) for n in targets]
    try:  # many gradient rules need no forward value (add, views); the rest fail on an unknown one
        grads = rule(Site(node, args, kwargs, out=out_value, dims=dims), g)
    except Exception as err:
        log.debug("gradient rule for %s failed: %s", node.format_node(), err)
        unknown = first_unknown(out_value, *args, *kwargs.values())
        reason = unknown or Unknown(op_name(node.target), f"gradient rule failed: {err}")
        return [(n, reason) for n in targets]
    pairs = []
    for arg, arg_grad in zip(node.args, grads):
        if isinstance(arg, (list, tuple)) and isinstance(arg_grad, (list, tuple)):
            pairs += [(a, ag) for a, ag in zip(arg, arg_grad) if a in targets and ag is not None]
        elif arg in targets and arg_grad is not None:
            pairs.append((arg, arg_grad))
    return pairs


def _differentiable_args(node: fx.Node) -> list[fx.Node]:
    """Argument nodes that carry a gradient: float, not folded constants."""
    found = []
    for arg in node.all_input_nodes:
        value = arg.meta.get(META_FWD)
        if isinstance(value, NotFloat) or getattr(value, "concrete", None) is not None:
            continue
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
            found.append(arg)
    return found
