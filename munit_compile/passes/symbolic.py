"""Symbolic moments: each tensor's mean and second moment as a sympy expression over the graph's dims.

A `Sym` is a float that also carries the sympy expression it was computed by; a `Dim` is an int size
that carries its dimension's symbol (batch, seq, vocab, d_model, heads, head_dim, ...). The variance
rules run on them unchanged: Python arithmetic (`k * x.m2 * w.m2`) builds the expression next to the
number; anything else (Gaussian quadrature, Monte Carlo, `math.sqrt`) returns a plain float, and the
node's expression becomes an opaque function of its inputs' symbols, e.g. `gelu_m2(mu_x, m2_x)`.

Each node's moments are then re-bound to fresh symbols (`mu_<node>`, `m2_<node>`, `g2_<node>` for its
gradient) whose values are the numbers, so every stored expression stays local (a few terms) and the
analysis stays linear in the graph size; `closed_form` substitutes them back down to parameters,
inputs and dims, e.g. m2(rms_norm(x)·w) = m2_x·m2_w/(m2_x + ε) whether the norm is one op or five.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from munit_compile.ir import META_BWD, META_FWD, META_SOURCE_NAME, aten, concrete_int, tensor_of
from munit_compile.passes.values import Moments

META_SYM_FWD = "munit_sym_fwd"  # SymbolicMoments: the node's local mean/m2 expressions
META_SYM_BWD = "munit_sym_bwd"  # sympy expression of the node's gradient m2 (local)


def as_expr(v) -> sympy.Expr:
    """The sympy expression of a number: its own for Sym/Dim, a literal otherwise."""
    expr = getattr(v, "expr", None)
    if expr is not None:
        return expr
    if isinstance(v, bool):
        return sympy.Integer(int(v))
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 2**53):
        return sympy.Integer(int(v))
    if isinstance(v, float) and math.isfinite(v) and (v * 1024).is_integer():
        return sympy.Rational(v)  # exact short fractions (0.5, -1.5) keep powers exact
    return sympy.Float(v)


def _binary(op, reflected: bool = False):
    def method(self, other):
        if not isinstance(other, (int, float)):
            return NotImplemented
        a, b = (other, self) if reflected else (self, other)
        return Sym(op(float(a), float(b)), op(as_expr(a), as_expr(b)))
    return method


class Sym(float):
    """A float computed by the variance rules, with the sympy expression that computed it."""

    __slots__ = ("expr",)

    def __new__(cls, value: float, expr: sympy.Expr):
        self = super().__new__(cls, value)
        self.expr = expr
        return self

    __add__, __radd__ = _binary(operator.add), _binary(operator.add, True)
    __sub__, __rsub__ = _binary(operator.sub), _binary(operator.sub, True)
    __mul__, __rmul__ = _binary(operator.mul), _binary(operator.mul, True)
    __truediv__, __rtruediv__ = _binary(operator.truediv), _binary(operator.truediv, True)
    __pow__, __rpow__ = _binary(operator.pow), _binary(operator.pow, True)

    def __neg__(self):
        return Sym(-float(self), -self.expr)

    def __pos__(self):
        return self

    def __repr__(self) -> str:
        return f"Sym({float(self)!r}, {self.expr})"


def _int_binary(op, reflected: bool = False):
    def method(self, other):
        if isinstance(other, float):
            return _binary(op, reflected)(Sym(float(self), self.expr), other)
        if not isinstance(other, int):
            return NotImplemented
        a, b = (other, self) if reflected else (self, other)
        return Dim(op(int(a), int(b)), op(as_expr(a), as_expr(b)))
    return method


def _dim_floordiv(reflected: bool = False):
    def method(self, other):
        if not isinstance(other, int):
            return NotImplemented
        a, b = (other, self) if reflected else (self, other)
        value = int(a) // int(b)
        exact = int(b) != 0 and int(a) % int(b) == 0
        expr = as_expr(a) / as_expr(b) if exact else sympy.floor(as_expr(a) / as_expr(b))
        return Dim(value, expr)
    return method


class Dim(int):
    """A tensor size with its dimension's symbol; products and exact quotients of Dims stay Dims.

    A float literal on the left (`1.0 / n`) is handled by float itself and drops the symbol: rules
    write integer literals (`1 / n`) or put a Sym first."""

    def __new__(cls, value: int, expr: sympy.Expr):
        self = super().__new__(cls, value)
        self.expr = expr
        return self

    __add__, __radd__ = _int_binary(operator.add), _int_binary(operator.add, True)
    __sub__, __rsub__ = _int_binary(operator.sub), _int_binary(operator.sub, True)
    __mul__, __rmul__ = _int_binary(operator.mul), _int_binary(operator.mul, True)
    __floordiv__, __rfloordiv__ = _dim_floordiv(), _dim_floordiv(True)

    def __truediv__(self, other):
        return Sym(float(self), self.expr).__truediv__(other)

    def __rtruediv__(self, other):
        return Sym(float(self), self.expr).__rtruediv__(other)

    def __repr__(self) -> str:
        return f"Dim({int(self)}, {self.expr})"


# ---------------------------------------------------------------- naming the graph's dimensions

def _dim_names_of_tokens(node: fx.Node) -> list[tuple[int, str]]:
    t = tensor_of(node)
    if node.op != "placeholder" or t is None or t.dtype.is_floating_point or t.dtype == torch.bool:
        return []
    return {1: [(0, "seq")], 2: [(0, "batch"), (1, "seq")]}.get(t.dim(), [])


def _arg_dims(position: int, names: dict[int, str]):
    """A naming source: argument `position` of the node, its dims named by {axis: name}."""
    def source(node: fx.Node):
        if len(node.args) <= position or tensor_of(node.args[position]) is None:
            return []
        return [(node.args[position], axis, name) for axis, name in names.items()]
    return source


# Which graph tensors name which dims, in priority order (an op: naming sources for its arguments).
DIM_NAMING: dict = {
    aten.embedding.default: (_arg_dims(0, {0: "vocab", 1: "d_model"}),),
    aten.scaled_dot_product_attention.default: (
        _arg_dims(0, {-3: "heads", -1: "head_dim"}), _arg_dims(1, {-3: "kv_heads"})),
    aten.linear.default: (_arg_dims(1, {0: "width", 1: "width"}),),
    aten.addmm.default: (_arg_dims(2, {0: "width", 1: "width"}),),
}


@dataclass
class DimNames:
    """sympy symbols for a graph's sizes. Static sizes are named by value (the first source wins, so
    two dims of equal size share a name; mark dims dynamic to keep them apart); symbolic sizes keep
    their own symbols, renamed after the token input's dims where they are batch/seq."""

    by_value: dict[int, sympy.Symbol]
    by_symbol: dict[sympy.Symbol, sympy.Symbol]

    @staticmethod
    def of_graph(gm: fx.GraphModule) -> "DimNames":
        names = DimNames({}, {})
        for node in gm.graph.nodes:
            for axis, name in _dim_names_of_tokens(node):
                names._name(tensor_of(node).shape[axis], name)
        for node in gm.graph.nodes:
            for source in DIM_NAMING.get(node.target, ()):
                for arg, axis, name in source(node):
                    shape = tensor_of(arg).shape
                    if -len(shape) <= axis < len(shape):
                        names._name(shape[axis], name)
        return names

    def _name(self, size, name: str) -> None:
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            if isinstance(expr, sympy.Symbol) and expr not in self.by_symbol:
                self.by_symbol[expr] = sympy.Symbol(name, positive=True, integer=True)
            return
        if int(size) > 1 and int(size) not in self.by_value:
            taken = sum(1 for s in self.by_value.values() if re.fullmatch(rf"{name}\d*", s.name))
            self.by_value[int(size)] = sympy.Symbol(name + (str(taken + 1) if taken else ""), positive=True,
                                                    integer=True)

    def dim(self, size) -> Dim:
        """`size` (int or SymInt) as a Dim: its example value and its symbol (unnamed sizes: the number)."""
        value = concrete_int(size)
        if isinstance(size, torch.SymInt):
            return Dim(value, size.node.expr.xreplace(self.by_symbol))
        return Dim(value, self.by_value.get(value, sympy.Integer(value)))

    def values(self) -> dict[sympy.Symbol, int]:
        """Each named static size's symbol and value (symbolic sizes are bound at evaluation)."""
        return {sym: value for value, sym in self.by_value.items()}


# ---------------------------------------------------------------- per-node symbols

@dataclass(frozen=True)
class SymbolicMoments:
    """A node's mean and second moment as local sympy expressions (in its inputs' symbols)."""

    mean: sympy.Expr
    m2: sympy.Expr


def _short(name: str) -> str:
    """A readable symbol name from an FX node name (Dynamo's l_self_modules_..._parameters_weight_)."""
    name = re.sub(r"^l_(self_)?", "", name)
    name = re.sub(r"(modules|parameters|buffers)_", "", name)
    return name.strip("_") or name


def _opaque(kind: str, op: str, inputs: list[sympy.Expr], where: str) -> sympy.Expr:
    """An expression the rules computed numerically: f(inputs) with f named after the op (with no
    symbolic inputs, f(at_<node>)). Known only at the traced shapes: `evaluate` refuses new sizes."""
    fn = sympy.Function(f"{op}_{kind}")
    return fn(*inputs) if inputs else fn(sympy.Symbol(f"at_{where}"))


def _input_symbols(values) -> list[sympy.Expr]:
    found = []
    for v in values:
        for stat in (getattr(v, "mean", None), getattr(v, "m2", None)):
            if isinstance(stat, Sym) and not stat.expr.is_number:
                found.append(stat.expr)
    return found


def _op_label(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "_schema", None)
    return name.name.split("::")[-1] if name is not None else getattr(target, "__name__", "op")


def bind_forward(node: fx.Node, value, inputs) -> object:
    """Record the node's local expressions and return `value` re-bound to the node's own symbols.

    `inputs`: the Values of the node's arguments (their Syms name what an opaque result depends on).
    Values that are not Moments (Unknown, NotFloat) pass through; a tuple output binds element i as
    `<node>_<i>` and records a tuple of SymbolicMoments."""
    prefix = _short(node.meta.get(META_SOURCE_NAME, node.name))
    if isinstance(value, tuple):
        pairs = [_bind_moments(f"{prefix}_{i}", node, v, inputs) if isinstance(v, Moments) else (v, None)
                 for i, v in enumerate(value)]
        node.meta[META_SYM_FWD] = tuple(local for _, local in pairs)
        return tuple(v for v, _ in pairs)
    if not isinstance(value, Moments):
        return value
    value, node.meta[META_SYM_FWD] = _bind_moments(prefix, node, value, inputs)
    return value


def _bind_moments(prefix: str, node: fx.Node, value, inputs):
    """(value with fresh symbols mu_<prefix>, m2_<prefix>; its SymbolicMoments)."""
    label, deps = _op_label(node), _input_symbols(inputs)
    leaf = node.op != "call_function" or value.concrete is not None
    local = {}
    for kind in ("mean", "m2"):
        stat = getattr(value, kind)
        if isinstance(stat, Sym):
            local[kind] = stat.expr
        elif float(stat) == 0.0:
            local[kind] = sympy.Integer(0)
        else:
            local[kind] = None if leaf else _opaque(kind, label, deps, prefix)
    mean_sym = sympy.Integer(0) if local["mean"] == 0 else sympy.Symbol(f"mu_{prefix}")
    bound = dataclasses.replace(value, mean=Sym(value.mean, mean_sym), m2=Sym(value.m2, sympy.Symbol(f"m2_{prefix}")))
    return bound, SymbolicMoments(local["mean"], local["m2"])


def bind_backward(node: fx.Node, g):
    """Record the gradient's local m2 expression and re-bind it to the symbol `g2_<node>`."""
    if not isinstance(g, Moments):
        return g
    prefix = _short(node.meta.get(META_SOURCE_NAME, node.name))
    node.meta[META_SYM_BWD] = g.m2.expr if isinstance(g.m2, Sym) else _opaque("grad_m2", _op_label(node), [], prefix)
    return dataclasses.replace(g, m2=Sym(g.m2, sympy.Symbol(f"g2_{prefix}")))


# ---------------------------------------------------------------- reading expressions back

@dataclass
class SymbolTable:
    """Every bound symbol of an analysed graph: its local expression (None for leaves) and value."""

    definitions: dict[sympy.Symbol, sympy.Expr | None]
    values: dict[sympy.Symbol, float]

    @staticmethod
    def of_graph(gm: fx.GraphModule) -> "SymbolTable":
        table = SymbolTable({}, {})
        for node in gm.graph.nodes:
            value, local = node.meta.get(META_FWD), node.meta.get(META_SYM_FWD)
            pairs = zip(value, local) if isinstance(value, tuple) and isinstance(local, tuple) else [(value, local)]
            for v, loc in pairs:
                for kind in ("mean", "m2"):
                    stat = getattr(v, kind, None)
                    if isinstance(stat, Sym) and isinstance(stat.expr, sympy.Symbol):
                        table.values[stat.expr] = float(stat)
                        table.definitions[stat.expr] = getattr(loc, kind, None) if loc is not None else None
            g = node.meta.get(META_BWD)
            if isinstance(getattr(g, "m2", None), Sym) and isinstance(g.m2.expr, sympy.Symbol):
                table.values[g.m2.expr] = float(g.m2)
                table.definitions[g.m2.expr] = node.meta.get(META_SYM_BWD)
        return table

    def closed_form(self, expr: sympy.Expr, depth: int | None = None) -> sympy.Expr:
        """`expr` with node symbols replaced by their definitions, `depth` levels deep (None: down to
        leaves — parameters, inputs, dims — and opaque functions). Memoized per (symbol, level)."""
        memo: dict[tuple, sympy.Expr] = {}

        def expand(sym: sympy.Symbol, level: int) -> sympy.Expr:
            key = (sym, level if depth is not None else 0)
            if key not in memo:
                definition = self.definitions.get(sym)
                if definition is None or (depth is not None and level >= depth):
                    memo[key] = sym
                else:
                    memo[key] = definition.xreplace(
                        {s: expand(s, level + 1) for s in definition.free_symbols if s in self.definitions})
            return memo[key]

        return expr.xreplace({s: expand(s, 0) for s in expr.free_symbols if s in self.definitions})

    def evaluate(self, expr: sympy.Expr, sizes: dict[str, int] | None = None, dims: "DimNames | None" = None) -> float:
        """The value of `expr` in closed form, with named dims set to `sizes` (others: as traced) and
        leaves to their measured values. Raises ValueError if an opaque (numerically computed) function
        remains: those are known only at the traced shapes."""
        closed = self.closed_form(expr)
        opaque = sorted({type(f).__name__ for f in closed.atoms(sympy.Function) if type(f).__name__.endswith(("_mean", "_m2"))})
        if opaque and sizes:
            raise ValueError(f"cannot evaluate at new sizes: {', '.join(opaque)} were computed numerically "
                             f"(quadrature or Monte Carlo) at the traced shapes only")
        bindings: dict = {}
        if dims is not None:
            bindings.update(dims.values())
        known = {sym.name: sym for sym in (dims.values() if dims is not None else {})}
        known.update({sym.name: sym for sym in closed.free_symbols})
        for name, size in (sizes or {}).items():
            if name not in known:
                dim_names = sorted(s.name for s in (dims.values() if dims is not None else {}))
                raise ValueError(f"no dim named {name!r} in this graph; its dims: {dim_names}")
            bindings[known[name]] = size
        bindings.update({s: v for s, v in self.values.items() if self.definitions.get(s) is None})
        if opaque:  # at the traced shapes an opaque function's value is its node's number
            return float(self.closed_form(expr, depth=0).xreplace(self.values | bindings))
        return float(closed.xreplace(bindings))


META_DIMS = "munit_dims"  # gm.meta key: the graph's DimNames (set by a symbolic propagate)


@dataclass
class Formula:
    """One node's predicted statistics as sympy expressions: `mean`, `m2` (forward) and `grad_m2`
    (backward) are the node's symbols; `closed(kind)` expands them over dims and leaves, and
    `std(**sizes)` / `grad_std(**sizes)` evaluate them (named dims at new sizes, if algebraic)."""

    name: str
    symbols: dict[str, sympy.Expr]  # "mean" | "m2" | "grad_m2" -> the node's symbol (or 0)
    table: SymbolTable
    dims: DimNames | None

    def closed(self, kind: str = "m2", depth: int | None = None) -> sympy.Expr:
        if kind not in self.symbols:
            raise KeyError(f"{self.name} has no {kind!r} expression; it has {sorted(self.symbols)}")
        return self.table.closed_form(self.symbols[kind], depth)

    def std(self, **sizes: int) -> float:
        """σ = √(m2 − μ²), evaluated with named dims at `sizes` (default: as traced)."""
        m2 = self.table.evaluate(self.symbols["m2"], sizes, self.dims)
        mean = self.table.evaluate(self.symbols["mean"], sizes, self.dims)
        return math.sqrt(max(m2 - mean * mean, 0.0))

    def grad_std(self, **sizes: int) -> float:
        """σ of d loss / d node (zero-mean), evaluated like `std`."""
        return math.sqrt(max(self.table.evaluate(self.symbols["grad_m2"], sizes, self.dims), 0.0))


def formulas_of_graph(gm: fx.GraphModule) -> dict[str, Formula]:
    """A Formula for every node a symbolic propagate annotated (empty if it did not run symbolically)."""
    table, dims, found = SymbolTable.of_graph(gm), gm.meta.get(META_DIMS), {}
    for node in gm.graph.nodes:
        symbols = {}
        value, g = node.meta.get(META_FWD), node.meta.get(META_BWD)
        for kind in ("mean", "m2"):
            if isinstance(getattr(value, kind, None), Sym):
                symbols[kind] = getattr(value, kind).expr
        if isinstance(getattr(g, "m2", None), Sym):
            symbols["grad_m2"] = g.m2.expr
        if symbols:
            found[node.name] = Formula(node.name, symbols, table, dims)
    return found
