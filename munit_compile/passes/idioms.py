"""Written-out activations recognised as the epilogue's: a tiny declarative expression matcher over FX nodes.

    pattern                      matches
    Var("x")                     a graph node; the same name binds the same node everywhere in the pattern
    Const(0.5)                   a Python number equal to 0.5 within `rel_tol` (default: one fp32 spacing)
    Op(aten.mul.Tensor, p, q)    a call_function node of that target without kwargs whose args match p, q
                                 (in either order for the commutative `COMMUTATIVE` targets)
    Alt(p, q, ...)               any of p, q, ... (tried in order, with backtracking)

`match(pattern, root)` is the first assignment that also passes the closure check: every node the
pattern matched except the root is read only inside the matched subgraph (fusing erases those nodes,
so a value someone else reads would be lost). `IDIOMS` is the table of formulas written as data;
`match_activation_idiom(root)` names the epilogue activation (`codegen.epilogue.ACTIVATIONS`) a
formula computes. What the pre-dispatch graph of HF GPT-2's `gelu_new` looks like (fp32, and under
BF16 autocast, where only `meta["val"]` dtypes change: autocast runs below pre-dispatch tracing, so it
puts no `_to_copy` into the formula; with CUDA's autocast rule, `pow` in its fp32 list, the nodes from
pow on are fp32 and so is the root, which `passes.fuse` meets by upcasting the fused 16-bit output):

    mul   = aten.mul.Tensor(x, 0.5)           add_3 = aten.add.Tensor(x, mul_1)
    pow_1 = aten.pow.Tensor_Scalar(x, 3.0)    mul_2 = aten.mul.Tensor(add_3, 0.7978845608028654)
    mul_1 = aten.mul.Tensor(pow_1, 0.044715)  tanh  = aten.tanh.default(mul_2)
    add_4 = aten.add.Tensor(tanh, 1.0)        mul_3 = aten.mul.Tensor(mul, add_4)        # the root
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Union

import torch
import torch.fx as fx

from munit_compile.codegen.epilogue import GELU_TANH_KAPPA, SQRT1_2, SQRT_2_OVER_PI

aten = torch.ops.aten
COMMUTATIVE = frozenset({aten.mul.Tensor, aten.add.Tensor})
FP32_SPACING = 2.0 ** -23  # relative: constants closer than this are one fp32 number, or two adjacent ones


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Const:
    value: float
    rel_tol: float = FP32_SPACING


class Op:
    """target(*args): the args are patterns (a Var, Const, Op or Alt each)."""

    __slots__ = ("target", "args")

    def __init__(self, target, *args):
        self.target, self.args = target, args

    def __repr__(self) -> str:
        return f"Op({self.target}, {', '.join(map(repr, self.args))})"


class Alt:
    """Any one of the options."""

    __slots__ = ("options",)

    def __init__(self, *options):
        self.options = options

    def __repr__(self) -> str:
        return f"Alt({', '.join(map(repr, self.options))})"


Pattern = Union[Var, Const, Op, Alt]


@dataclass(frozen=True)
class Match:
    """Variables bound to nodes, and the nodes the Op patterns matched (the subgraph, root included)."""

    bindings: dict = field(default_factory=dict)
    nodes: frozenset = frozenset()

    def bind(self, name: str, node: fx.Node) -> Match:
        return Match({**self.bindings, name: node}, self.nodes)

    def with_node(self, node: fx.Node) -> Match:
        return Match(self.bindings, self.nodes | {node})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(pattern: Pattern, value, m: Match) -> Iterator[Match]:
    """Every extension of `m` under which `value` (a node or an argument) matches `pattern`."""
    if isinstance(pattern, Var):
        if pattern.name not in m.bindings:
            if isinstance(value, fx.Node):
                yield m.bind(pattern.name, value)
        elif m.bindings[pattern.name] is value:
            yield m
    elif isinstance(pattern, Const):
        if _is_number(value) and math.isclose(value, pattern.value, rel_tol=pattern.rel_tol, abs_tol=0.0):
            yield m
    elif isinstance(pattern, Alt):
        for option in pattern.options:
            yield from _matches(option, value, m)
    elif isinstance(pattern, Op):
        yield from _op_matches(pattern, value, m)
    else:
        raise TypeError(f"not a pattern: {pattern!r}")


def _op_matches(pattern: Op, node, m: Match) -> Iterator[Match]:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == pattern.target
            and not node.kwargs and len(node.args) == len(pattern.args)):
        return
    orders = [node.args]
    if pattern.target in COMMUTATIVE and len(node.args) == 2 and node.args[0] is not node.args[1]:
        orders.append(node.args[::-1])
    for args in orders:
        for m_args in _all_match(pattern.args, args, m):
            yield m_args.with_node(node)


def _all_match(patterns: tuple, values: tuple, m: Match) -> Iterator[Match]:
    if not patterns:
        yield m
        return
    for m_first in _matches(patterns[0], values[0], m):
        yield from _all_match(patterns[1:], values[1:], m_first)


def is_closed(nodes: frozenset, root: fx.Node) -> bool:
    """Every matched node but the root is read only by matched nodes (erasing them loses no value)."""
    return all(user in nodes for n in nodes if n is not root for user in n.users)


def match(pattern: Pattern, root: fx.Node) -> Match | None:
    """The first match of `pattern` at `root` whose subgraph is closed (`is_closed`), or None."""
    return next((m for m in _matches(pattern, root, Match()) if is_closed(m.nodes, root)), None)


def depth(pattern: Pattern) -> int:
    """The most Op levels on a path from the pattern's root to a leaf."""
    if isinstance(pattern, Op):
        return 1 + max((depth(a) for a in pattern.args), default=0)
    if isinstance(pattern, Alt):
        return max(depth(o) for o in pattern.options)
    return 0


# ---------------------------------------------------------------- the formulas, as data

X = Var("x")
mul, add, div = aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor


def half_x_times(s: Pattern) -> Alt:
    """0.5·x·s in the three groupings a formula is written in: (0.5·x)·s, x·(0.5·s), (x·s)·0.5."""
    return Alt(Op(mul, Op(mul, X, Const(0.5)), s), Op(mul, X, Op(mul, s, Const(0.5))),
               Op(mul, Op(mul, X, s), Const(0.5)))


CUBE = Alt(Op(aten.pow.Tensor_Scalar, X, Const(3, rel_tol=0.0)), Op(mul, Op(mul, X, X), X))  # x³: pow or x·x·x
KAPPA_CUBE = Alt(Op(mul, CUBE, Const(GELU_TANH_KAPPA)),                                     # κ·x³, x³·κ
                 Op(mul, Op(mul, Op(mul, X, Const(GELU_TANH_KAPPA)), X), X))               # κ·x·x·x
TANH_ARG = Alt(
    Op(mul, Op(add, X, KAPPA_CUBE), Const(SQRT_2_OVER_PI)),                                 # √(2/π)·(x + κx³)
    Op(mul, Op(mul, X, Const(SQRT_2_OVER_PI)),                           # HF gelu_fast: x·√(2/π)·(1 + κ·x·x)
       Op(add, Op(mul, Op(mul, X, Const(GELU_TANH_KAPPA)), X), Const(1.0))),
)
ERF_ARG = Alt(Op(div, X, Const(math.sqrt(2.0))), Op(mul, X, Const(SQRT1_2)))                # x/√2, x·(1/√2)


@dataclass(frozen=True)
class Idiom:
    name: str
    activation: str  # its name among `codegen.epilogue.ACTIVATIONS`
    pattern: Pattern


IDIOMS: tuple[Idiom, ...] = (
    Idiom("gelu_tanh", "gelu_tanh", half_x_times(Op(add, Op(aten.tanh.default, TANH_ARG), Const(1.0)))),
    Idiom("gelu_erf", "gelu", half_x_times(Op(add, Op(aten.erf.default, ERF_ARG), Const(1.0)))),
    Idiom("silu", "silu", Op(mul, X, Op(aten.sigmoid.default, X))),
)
IDIOM_DEPTH = max(depth(i.pattern) for i in IDIOMS)  # how far below its input x a formula's root can be


def match_activation_idiom(node: fx.Node) -> tuple[str, fx.Node, frozenset] | None:
    """(activation name, the formula's input x, the nodes to erase: the root and its closed subgraph) if
    `node` is the root of an `IDIOMS` formula, else None. Dtypes are not checked (the caller's eligibility)."""
    for idiom in IDIOMS:
        m = match(idiom.pattern, node)
        if m is not None:
            return idiom.activation, m.bindings[X.name], m.nodes
    return None
