"""passes.idioms: the expression matcher over FX nodes and the written-out activations it recognises.

Every variant is traced the way the pipeline traces models (pre-dispatch ATen) and checked twice: the
matcher names the activation, and the traced formula in float64 on fresh random data equals that
activation of `codegen.epilogue` to float64 rounding (≤ 1e-12 relative: the table row is the right math).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from munit_compile.codegen import epilogue
from munit_compile.passes import idioms
from munit_compile.passes.idioms import Alt, Const, Op, Var

aten = torch.ops.aten
C, K = math.sqrt(2.0 / math.pi), 0.044715


def gelu_new(x):  # transformers NewGELUActivation (GPT-2's gelu_new)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


VARIANTS = {
    "gelu_new": ("gelu_tanh", gelu_new),
    "cube_as_products": ("gelu_tanh", lambda x: 0.5 * x * (1.0 + torch.tanh(C * (x + K * (x * x * x))))),
    "kappa_x_x_x": ("gelu_tanh", lambda x: 0.5 * x * (1.0 + torch.tanh(C * (x + K * x * x * x)))),
    "x_half_first": ("gelu_tanh", lambda x: x * 0.5 * (1.0 + torch.tanh((x + x ** 3 * K) * C))),
    "half_inside": ("gelu_tanh", lambda x: x * (0.5 * (torch.tanh(C * (x + K * torch.pow(x, 3))) + 1.0))),
    "half_last": ("gelu_tanh", lambda x: x * (1.0 + torch.tanh(C * (K * torch.pow(x, 3.0) + x))) * 0.5),
    "gelu_fast": ("gelu_tanh",  # transformers FastGELUActivation: a 10-digit √(2/π)
                  lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))),
    "gelu_python": ("gelu", lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))),  # GELUActivation
    "gelu_erf_mul": ("gelu", lambda x: 0.5 * x * (torch.erf(x * (1 / math.sqrt(2.0))) + 1.0)),
    "silu": ("silu", lambda x: x * torch.sigmoid(x)),
    "silu_swapped": ("silu", lambda x: torch.sigmoid(x) * x),
}

NEAR_MISSES = {
    "kappa_0.04": lambda x: 0.5 * x * (1.0 + torch.tanh(C * (x + 0.04 * torch.pow(x, 3.0)))),
    "sqrt_2_over_pi_to_4_digits": lambda x: 0.5 * x * (1.0 + torch.tanh(0.7979 * (x + K * torch.pow(x, 3.0)))),
    "square_not_cube": lambda x: 0.5 * x * (1.0 + torch.tanh(C * (x + K * torch.pow(x, 2.0)))),
    "cube_nearly": lambda x: 0.5 * x * (1.0 + torch.tanh(C * (x + K * torch.pow(x, 3.0000001)))),
    "minus_one": lambda x: 0.5 * x * (torch.tanh(C * (x + K * torch.pow(x, 3.0))) - 1.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "erf_of_x": lambda x: x * 0.5 * (1.0 + torch.erf(x)),
}


def _root_of(fn, *shapes, dtype=torch.float32) -> fx.Node:
    """Trace fn at the pre-dispatch level (as `passes.normalize` does); return its first output's node."""
    gm = make_fx(fn, pre_dispatch=True)(*(torch.randn(s, dtype=dtype) for s in shapes))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return out[0] if isinstance(out, (tuple, list)) else out


def _formula_nodes(root: fx.Node) -> set[fx.Node]:
    return {n for n in root.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_is_matched_as_the_epilogue_activation_it_computes(name):
    activation, fn = VARIANTS[name]
    root = _root_of(fn, (8, 16))
    m = idioms.match_activation_idiom(root)
    assert m is not None
    matched_activation, x, nodes = m
    assert matched_activation == activation
    assert x.op == "placeholder" and nodes == _formula_nodes(root)  # the whole formula, x excluded
    z = torch.randn(4096, dtype=torch.float64) * 3
    expected = epilogue.ACTIVATIONS[activation](z)
    assert ((fn(z) - expected).abs() <= 1e-12 * (z.abs() + expected.abs())).all()


def test_the_input_may_be_any_node_and_dtypes_are_not_looked_at():
    root = _root_of(lambda a: gelu_new(a.view(-1) * 2.0), (4, 8), dtype=torch.bfloat16)
    activation, x, nodes = idioms.match_activation_idiom(root)
    assert activation == "gelu_tanh" and x.target is aten.mul.Tensor and x not in nodes
    assert x.args[0].target is aten.view.default


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_misses_are_declined(name):
    assert idioms.match_activation_idiom(_root_of(NEAR_MISSES[name], (8, 16))) is None


def test_a_variable_must_be_the_same_node_everywhere():
    """x in the cube and y elsewhere: not an activation of one input."""
    def two_inputs(x, y):
        return 0.5 * y * (1.0 + torch.tanh(C * (y + K * torch.pow(x, 3.0))))

    assert idioms.match_activation_idiom(_root_of(two_inputs, (8,), (8,))) is None
    assert idioms.match_activation_idiom(_root_of(lambda x, y: x * torch.sigmoid(y), (8,), (8,))) is None


def test_an_interior_node_read_outside_the_formula_is_declined():
    """tanh(...) is also returned: erasing the formula would lose it. The root itself may have any readers."""
    def tanh_escapes(x):
        t = torch.tanh(C * (x + K * torch.pow(x, 3.0)))
        return 0.5 * x * (1.0 + t), t

    assert idioms.match_activation_idiom(_root_of(tanh_escapes, (8,))) is None

    def root_read_twice(x):
        y = gelu_new(x)
        return y, y * 2.0

    assert idioms.match_activation_idiom(_root_of(root_read_twice, (8,)))[0] == "gelu_tanh"


# ---------------------------------------------------------------- the matcher's primitives on hand-built graphs

def _graph(*calls):
    """A graph with placeholders a, b and the given (target, args) calls, where "a", "b" and "%i" (the i-th
    call) name nodes; returns the last call's node."""
    g = fx.Graph()
    names = {"a": g.placeholder("a"), "b": g.placeholder("b")}
    for i, (target, args) in enumerate(calls):
        names[f"%{i}"] = g.call_function(target, tuple(names.get(a, a) if isinstance(a, str) else a for a in args))
    g.output(names[f"%{len(calls) - 1}"])
    return names[f"%{len(calls) - 1}"]


def test_commutative_targets_match_either_order_and_others_do_not():
    pattern_add = Op(aten.add.Tensor, Var("x"), Const(1.0))
    assert idioms.match(pattern_add, _graph((aten.add.Tensor, (1.0, "a")))) is not None
    pattern_sub = Op(aten.sub.Tensor, Var("x"), Const(1.0))
    assert idioms.match(pattern_sub, _graph((aten.sub.Tensor, ("a", 1.0)))) is not None
    assert idioms.match(pattern_sub, _graph((aten.sub.Tensor, (1.0, "a")))) is None


def test_constants_match_within_one_fp32_spacing_and_numbers_only():
    pattern = Op(aten.mul.Tensor, Var("x"), Const(K))
    for value, ok in ((K, True), (K * (1 + 2.0 ** -25), True), (K * (1 + 2.0 ** -21), False), (0.04, False)):
        assert (idioms.match(pattern, _graph((aten.mul.Tensor, ("a", value)))) is not None) is ok
    assert idioms.match(Op(aten.mul.Tensor, Var("x"), Const(1)), _graph((aten.mul.Tensor, ("a", True)))) is None
    assert idioms.match(Op(aten.mul.Tensor, Var("x"), Const(2.0)), _graph((aten.mul.Tensor, ("a", "b")))) is None


def test_backtracking_binds_a_variable_consistently_across_commuted_arguments():
    """(a·b)·a against (x·y)·x: the commuted inner order binds x=b first, which fails at the outer x."""
    pattern = Op(aten.mul.Tensor, Op(aten.mul.Tensor, Var("x"), Var("y")), Var("x"))
    root = _graph((aten.mul.Tensor, ("b", "a")), (aten.mul.Tensor, ("%0", "a")))
    m = idioms.match(pattern, root)
    assert m is not None and m.bindings["x"].name == "a" and m.bindings["y"].name == "b"
    assert idioms.match(pattern, _graph((aten.mul.Tensor, ("b", "a")), (aten.mul.Tensor, ("%0", "%0")))) is None


def test_kwargs_and_arity_are_part_of_the_match():
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    scaled_add = g.call_function(aten.add.Tensor, (a, b), {"alpha": 2.0})  # a + 2b, not a + b
    g.output(scaled_add)
    assert idioms.match(Op(aten.add.Tensor, Var("x"), Var("y")), scaled_add) is None
    assert idioms.match(Op(aten.tanh.default, Var("x"), Var("y")), _graph((aten.tanh.default, ("a",)))) is None


def test_alt_and_depth():
    pattern = Alt(Op(aten.tanh.default, Var("x")), Op(aten.sigmoid.default, Op(aten.neg.default, Var("x"))))
    assert idioms.depth(pattern) == 2
    m = idioms.match(pattern, _graph((aten.neg.default, ("a",)), (aten.sigmoid.default, ("%0",))))
    assert m is not None and len(m.nodes) == 2
    assert idioms.IDIOM_DEPTH == max(idioms.depth(i.pattern) for i in idioms.IDIOMS) >= 7
    with pytest.raises(TypeError, match="not a pattern"):
        idioms.match(Op(aten.tanh.default, "x"), _graph((aten.tanh.default, ("a",))))
