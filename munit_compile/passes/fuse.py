"""Fold the ops around an FP8 GEMM into it: a table of (match, rewrite) patterns over the munit graph.

    before: g = munit.fp8_linear(x, Wg, None, s_x, s_w, s_g, "e4m3", "e5m2")     # each op rounds to x.dtype
            u = munit.fp8_linear(x, Wu, None, s_x, s_w, s_g', "e4m3", "e5m2")     # and casts x again
            h = aten.mul(aten.silu(g), u)
            y = aten.add(r, munit.fp8_linear(h, Wd, ...), alpha=c)
    after:  x_q = munit.quantize(x, s_x, "e4m3")                                  # one cast, fused into x's producer
            u = munit.fp8_linear(x, Wu, ..., x_q=x_q)
            h, h_q = munit.fp8_linear_q(x, Wg, ..., activation="silu", gate=u, x_q=x_q, q_scale=s_h)
                                                       # silu(z)·u from fp32 z, and its FP8 copy for the next GEMM
            y = munit.fp8_linear(h, Wd, ..., residual=r, c_branch=c, x_q=h_q)

The patterns (`FUSIONS`, tried in order at every node until none fires):
- gemm_activation   act(fp8_linear)          → activation epilogue (gelu, gelu_tanh, silu, relu)
- gemm_activation_idiom  a written-out activation formula of fp8_linear → the same
- gemm_gate         fp8_linear · t           → gate epilogue (SwiGLU: silu(x Wgᵀ)·(x Wuᵀ))
- gemm_scale        fp8_linear · c           → c_branch·y (a constant output multiplier, μS's after GELU)
- gemm_residual     c₁·r + c₂·fp8_linear     → residual epilogue (fixed-τ: c₁ = √(1−τ), c₂ = √τ)
- fp8_input         every FP8 GEMM reading x → one `munit.quantize(x)` shared by them; backward saves it
- input_grad_scale  grad_scale(x, c) read by FP8 GEMMs → their x_grad_multiplier (no forward copy of x)
- output_grad_scale grad_scale(fp8_linear, c) → its grad_multiplier (when no epilogue op follows to absorb it)
- gemm_fp8_output   quantize(fp8_linear)     → fp8_linear_q: the epilogue also writes the next GEMM's operand
Each `match(node)` returns what its rewrite needs, or None to decline; a match needs the GEMM's output to
have no other reader (fusing would have to write it too). Rewritten GEMMs keep their FP8 plan, and the
fused node takes the replaced root's metadata (`val`, σ forward and backward). `kernel_of` names the kernel
a GEMM runs as (the report's `fused_kernel`): "fp8_gemm+silu+gate+fp8_out <- fp8 x", ... Ops that leave values
unchanged between a GEMM and its epilogue op (`TRANSPARENT`: zero dropout, row reshapes) are looked through,
and so is `munit::grad_scale` (identity forward; its constant becomes grad_multiplier).

A written-out activation (GPT-2's `gelu_new`: mul, pow, add, tanh, ... on the Conv1D's view of the GEMM)
is recognised by `idioms.match_activation_idiom` (gemm_activation_idiom; the formula must read only the
GEMM's output and end in its dtype).

Norms are not fused into a hand-written prologue kernel: Inductor fuses the quantize into the norm's kernel
(a pointwise epilogue of its reduction). The GEMM still writes y in BF16 next to its FP8 copy: y is the
next GEMM's autograd input, though only the copy is read (forward and backward).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from collections import Counter
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable

import torch
import torch.fx as fx

import munit_compile.ops  # noqa: F401  (registers munit::fp8_linear and munit::quantize)
from munit_compile.ir import META_PLAN
from munit_compile.ops.formats import cast_fp8
from munit_compile.passes import idioms

aten = torch.ops.aten
FP8_LINEAR = torch.ops.munit.fp8_linear.default
FP8_LINEAR_Q = torch.ops.munit.fp8_linear_q.default  # also writes the next GEMM's FP8 operand (gemm_fp8_output)
QUANTIZE = torch.ops.munit.quantize.default
GRAD_SCALE = torch.ops.munit.grad_scale.default  # identity forward: transparent, its constant goes to grad_multiplier
_SCHEMA = FP8_LINEAR_Q._schema.arguments  # fp8_linear's, then q_scale and q_format
LINEAR_PARAMS = tuple(a.name for a in _SCHEMA)  # x, w, bias, x_scale, ..., alpha, activation, gate, ..., x_q, ...
LINEAR_DEFAULTS = {a.name: a.default_value for a in _SCHEMA if a.has_default_value()}
_N_REQUIRED = len(LINEAR_PARAMS) - len(LINEAR_DEFAULTS)


@dataclass(frozen=True)
class Fusion:
    name: str
    match: Callable[[fx.Node], Any]              # node -> match, or None to decline
    rewrite: Callable[[fx.GraphModule, Any], None]


def is_fp8_linear(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is FP8_LINEAR


def is_fp8_gemm(node: Any) -> bool:
    """fp8_linear or fp8_linear_q: an FP8 GEMM with its plan (what the report lists)."""
    return is_fp8_linear(node) or isinstance(node, fx.Node) and node.op == "call_function" \
        and node.target is FP8_LINEAR_Q


def linear_args(node: fx.Node) -> dict[str, Any]:
    """An fp8_linear(_q) node's arguments by name, defaults filled in (positional or keyword)."""
    schema = node.target._schema.arguments
    args = dict(zip((a.name for a in schema), node.args))
    return {a.name: args.get(a.name, node.kwargs.get(a.name, a.default_value if a.has_default_value() else None))
            for a in schema}


def _call_args(args: dict[str, Any]) -> tuple[tuple, dict]:
    """(positional, keyword) for an fp8_linear(_q) call: the required arguments, then only non-defaults by
    name (an fp8_linear's args have no q_scale/q_format; an fp8_linear_q's keep theirs)."""
    required = tuple(args[n] for n in LINEAR_PARAMS[:_N_REQUIRED])
    return required, {n: args[n] for n in LINEAR_PARAMS[_N_REQUIRED:] if n in args and not _is_default(n, args[n])}


def _is_default(name: str, value: Any) -> bool:
    default = LINEAR_DEFAULTS[name]
    return value is None if default is None else (not isinstance(value, fx.Node) and value == default)


def kernel_name(args: dict[str, Any]) -> str:
    """The report's name of the kernel an fp8_linear with these arguments runs as (module docstring)."""
    parts = ["fp8_gemm"]
    parts += [args["activation"]] if args["activation"] != "none" else []
    parts += ["gate"] if args["gate"] is not None else []
    parts += ["scale"] if args["residual"] is None and args["c_branch"] != 1.0 else []
    parts += ["residual"] if args["residual"] is not None else []
    parts += ["fp8_out"] if "q_scale" in args else []
    return "+".join(parts) + (" <- fp8 x" if args["x_q"] is not None else "")


def kernel_of(node: fx.Node) -> str:
    return kernel_name(linear_args(node))


def _only_user(node: fx.Node) -> fx.Node | None:
    (user,) = node.users if len(node.users) == 1 else (None,)
    return user if user is not None and user.op == "call_function" else None


def _keeps_rows(node: fx.Node) -> bool:
    """A reshape that only regroups rows (last dim and element count kept): fp8_linear commutes with it."""
    before, after = _val(node.args[0]), _val(node)
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dim() >= 1
            and after.dim() >= 1 and before.shape[-1] == after.shape[-1] and before.numel() == after.numel())


def _dropout_off(node: fx.Node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return p == 0 or train is False


# ops between a GEMM and its epilogue op that leave every value as it is (when the predicate holds)
TRANSPARENT: dict[Any, Callable[[fx.Node], bool]] = {
    aten.view.default: _keeps_rows,
    aten.reshape.default: _keeps_rows,
    aten._unsafe_view.default: _keeps_rows,
    aten.alias.default: lambda node: True,
    aten.dropout.default: _dropout_off,
}


def _is_transparent(node: fx.Node) -> bool:
    """A forward-identity op on the way from a GEMM to what reads it (`TRANSPARENT`, or `grad_scale`)."""
    return node.target is GRAD_SCALE or node.target in TRANSPARENT and TRANSPARENT[node.target](node)


def _forward_chain(node: fx.Node) -> tuple[tuple[fx.Node, ...], fx.Node | None]:
    """(the transparent single-reader ops after node, in order; the sole op reading the last of them, or
    None where it has several readers or none)."""
    chain, user = [], _only_user(node)
    while user is not None and _is_transparent(user):
        chain.append(user)
        user = _only_user(user)
    return tuple(chain), user


def _grad_multiplier(chain: tuple[fx.Node, ...]) -> float:
    """The product of the `munit::grad_scale` constants in a chain (what z's gradient is multiplied by)."""
    return math.prod(float(n.args[1]) for n in chain if n.target is GRAD_SCALE)


def _val(node: Any) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_tensor_type(a: Any, b: Any) -> bool:
    va, vb = _val(a), _val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype)


def _replace_with_linear(gm: fx.GraphModule, m: "_EpilogueMatch") -> fx.Node:
    """Put fp8_linear(gemm's arguments + m.changes) where the epilogue op (root) is: it takes root's value
    and users and keeps gemm's FP8 plan; root, the interior nodes it folds, the transparent chain and gemm
    are erased. A chain that regrouped rows is applied to x (and x_q) instead:
    fp8_linear works row by row."""
    args = {**linear_args(m.gemm), **m.changes}
    args["grad_multiplier"] *= _grad_multiplier(m.chain)
    with gm.graph.inserting_before(m.root):
        if m.chain and _val(m.chain[-1]).shape != _val(m.gemm).shape:
            rows = list(_val(m.chain[-1]).shape[:-1])
            for name in ("x", "x_q"):
                if args[name] is not None:
                    args[name] = _reshape(gm, args[name], [*rows, _val(args[name]).shape[-1]])
        positional, keyword = _call_args(args)
        fused = gm.graph.call_function(FP8_LINEAR, positional, keyword)
    fused.meta.update(m.root.meta)
    if META_PLAN in m.gemm.meta:
        fused.meta[META_PLAN] = m.gemm.meta[META_PLAN]
    m.root.replace_all_uses_with(fused)
    gm.graph.erase_node(m.root)
    pending = set(m.interior)
    while pending:  # readers before what they read
        unread = {n for n in pending if not n.users}
        for node in unread:
            gm.graph.erase_node(node)
        pending -= unread
    for node in (*reversed(m.chain), m.gemm):
        gm.graph.erase_node(node)
    return fused


def _reshape(gm: fx.GraphModule, node: fx.Node, shape: list[int]) -> fx.Node:
    reshaped = gm.graph.call_function(aten.reshape.default, (node, shape))
    reshaped.meta["val"] = node.meta["val"].reshape(shape)
    return reshaped


# ---------------------------------------------------------------- gemm_activation: act(fp8_linear)

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
class _EpilogueMatch:
    gemm: fx.Node
    root: fx.Node                 # the epilogue op the fused GEMM replaces
    changes: dict[str, Any]       # fp8_linear arguments the fused op sets
    chain: tuple[fx.Node, ...]    # transparent ops between gemm and root (`TRANSPARENT`)
    interior: frozenset = frozenset()  # other nodes read only by root, folded too (a formula, mul(skip, c))


def _bare_epilogue(args: dict[str, Any], *steps: str) -> bool:
    """None of these epilogue steps (and none after them: act → gate → scale → residual) is fused yet."""
    after = {"activation": ("activation", "gate", "c_branch", "residual"), "gate": ("gate", "c_branch", "residual"),
             "scale": ("residual",), "residual": ("residual",)}
    names = {n for step in steps for n in after[step]}
    return all(_is_default(n, args[n]) for n in names)


def _reader(node: fx.Node) -> tuple[fx.Node, fx.Node, tuple[fx.Node, ...]] | None:
    """For an FP8 GEMM node: (its epilogue op, the value that op reads, the transparent chain between).
    A `grad_scale` in the chain scales z's gradient only while nothing is fused yet (it sits right after z)."""
    if not is_fp8_linear(node):
        return None
    chain, user = _forward_chain(node)
    if user is None or (_grad_multiplier(chain) != 1.0 and not _bare_epilogue(linear_args(node), "activation")):
        return None
    return user, chain[-1] if chain else node, chain


def _match_gemm_activation(node: fx.Node) -> _EpilogueMatch | None:
    """An fp8_linear with a bare epilogue whose only reader is an activation of its output, same dtype."""
    found = _reader(node)
    if found is None or not _bare_epilogue(linear_args(node), "activation"):
        return None
    user, value, chain = found
    name_of = ACTIVATION_OPS.get(user.target)
    if name_of is None or not user.args or user.args[0] is not value:
        return None
    activation = name_of(user)
    if activation is None or not _same_tensor_type(user, value):
        return None
    return _EpilogueMatch(node, user, {"activation": activation}, chain)


# ---------------------------------------------------------------- gemm_gate: fp8_linear · t

def _match_gemm_gate(node: fx.Node) -> _EpilogueMatch | None:
    """fp8_linear (no gate or residual yet) times a tensor of its shape and dtype, its only reader; of two
    FP8 GEMM factors, the one with the activation."""
    found = _reader(node)
    if found is None or not _bare_epilogue(linear_args(node), "gate"):
        return None
    user, value, chain = found
    if user.target is not aten.mul.Tensor or len(user.args) != 2 or user.kwargs:
        return None
    (other,) = [a for a in user.args if a is not value] or (None,)
    if other is None or not (_same_tensor_type(other, value) and _same_tensor_type(user, value)):
        return None
    if _has_activation(other) and not _has_activation(node):
        return None  # SwiGLU: the factor with the activation takes the other as its gate (it matches itself)
    return _EpilogueMatch(node, user, {"gate": other}, chain)


def _has_activation(node: Any) -> bool:
    return is_fp8_linear(node) and linear_args(node)["activation"] != "none"


# ---------------------------------------------------------------- gemm_scale: fp8_linear · c

def _constant(value: Any) -> float | None:
    return float(value) if isinstance(value, Real) and not isinstance(value, bool) else None


def _match_gemm_scale(node: fx.Node) -> _EpilogueMatch | None:
    """fp8_linear (no residual yet) times a Python constant, its only reader: c_branch ← c_branch·c
    (μS's output multipliers after an activation)."""
    found = _reader(node)
    if found is None or not _bare_epilogue(linear_args(node), "scale"):
        return None
    user, value, chain = found
    if user.target is not aten.mul.Tensor or len(user.args) != 2 or user.kwargs or value not in user.args:
        return None
    (c,) = [_constant(a) for a in user.args if a is not value] or (None,)
    if c is None or not math.isfinite(c) or not _same_tensor_type(user, value):
        return None
    return _EpilogueMatch(node, user, {"c_branch": linear_args(node)["c_branch"] * c}, chain)


# ---------------------------------------------------------------- gemm_residual: c₁·r + c₂·fp8_linear

def _skip_and_coefficient(r: fx.Node) -> tuple[fx.Node, float]:
    """r = mul(skip, c) with a constant c and no other reader folds into (skip, c); otherwise (r, 1)."""
    if r.op == "call_function" and r.target is aten.mul.Tensor and len(r.users) == 1 and len(r.args) == 2:
        tensors = [a for a in r.args if isinstance(a, fx.Node)]
        constants = [a for a in r.args if isinstance(a, Real) and not isinstance(a, bool)]
        if len(tensors) == 1 and len(constants) == 1 and _same_tensor_type(tensors[0], r):
            return tensors[0], float(constants[0])
    return r, 1.0


def _match_gemm_residual(node: fx.Node) -> _EpilogueMatch | None:
    """add(r, fp8_linear, alpha=c) or add(fp8_linear, r, alpha=c), r of the output's shape, its only reader."""
    found = _reader(node)
    if found is None or not _bare_epilogue(linear_args(node), "residual"):
        return None
    user, value, chain = found
    if user.target is not aten.add.Tensor or len(user.args) != 2 or set(user.kwargs) - {"alpha"}:
        return None
    a, b = user.args
    alpha = user.kwargs.get("alpha", 1)
    if a is b or value not in (a, b) or not isinstance(alpha, Real) or isinstance(alpha, bool):
        return None
    r = b if a is value else a
    r_val, y_val, out_val = _val(r), _val(value), _val(user)
    if not all(isinstance(v, torch.Tensor) for v in (r_val, y_val, out_val)):
        return None
    if r_val.shape != y_val.shape or out_val.shape != y_val.shape or not r_val.dtype.is_floating_point:
        return None
    if out_val.dtype != torch.promote_types(y_val.dtype, r_val.dtype):
        return None
    skip, c = _skip_and_coefficient(r)
    c_skip, c_branch = (c, float(alpha)) if b is value else (c * float(alpha), 1.0)  # add(a, b) = a + alpha·b
    c_branch *= linear_args(node)["c_branch"]  # a constant output multiplier folded before (gemm_scale)
    return _EpilogueMatch(node, user, {"residual": skip, "c_skip": c_skip, "c_branch": c_branch}, chain,
                          frozenset() if skip is r else frozenset({r}))  # the mul(skip, c) folded into c_skip


def _rewrite_epilogue(gm: fx.GraphModule, m: _EpilogueMatch) -> None:
    _replace_with_linear(gm, m)


# ---------------------------------------------------------------- fp8_input: one shared, saved FP8 copy of x

@dataclass(frozen=True)
class _SharedInput:
    x: fx.Node
    x_scale: float
    fmt: str
    readers: tuple[fx.Node, ...]  # the FP8 GEMMs that read x with this scale and format, in graph order


def _match_fp8_input(node: fx.Node) -> _SharedInput | None:
    """An FP8 GEMM that casts its x itself; with it, every other one casting the same x the same way."""
    if not is_fp8_linear(node):
        return None
    args = linear_args(node)
    if args["x_q"] is not None or not isinstance(_val(args["x"]), torch.Tensor):
        return None
    key = (args["x"], args["x_scale"], args["fwd_format"])
    same_cast = lambda a: a["x_q"] is None and (a["x"], a["x_scale"], a["fwd_format"]) == key  # noqa: E731
    readers = [u for u in args["x"].users if is_fp8_linear(u) and same_cast(linear_args(u))]
    order = {n: i for i, n in enumerate(node.graph.nodes)}  # only where the pattern fires: once per input
    return _SharedInput(*key, tuple(sorted(readers, key=order.__getitem__)))


def _rewrite_fp8_input(gm: fx.GraphModule, m: _SharedInput) -> None:
    with gm.graph.inserting_before(m.readers[0]):
        x_q = gm.graph.call_function(QUANTIZE, (m.x, m.x_scale, m.fmt))
    x_q.meta["val"] = cast_fp8(m.x.meta["val"], m.fmt, m.x_scale)
    for reader in m.readers:
        reader.args, reader.kwargs = _call_args({**linear_args(reader), "x_q": x_q})


# ---------------------------------------------------------------- gemm_activation_idiom: a written-out activation

def _descendants(x: fx.Node, levels: int) -> set[fx.Node]:
    """The nodes at most `levels` user-steps below x."""
    found, frontier = set(), {x}
    for _ in range(levels):
        frontier = {u for n in frontier for u in n.users} - found
        found |= frontier
    return found


def _match_gemm_activation_idiom(node: fx.Node) -> _EpilogueMatch | None:
    """An fp8_linear with a bare epilogue whose output x (through transparent ops) is read only by a
    written-out activation (`idioms.IDIOMS`) ending in x's dtype; of nested matches, the largest formula."""
    if not is_fp8_linear(node) or not _bare_epilogue(linear_args(node), "activation"):
        return None
    chain = _forward_chain(node)[0]
    x = chain[-1] if chain else node
    matches = [(root, m) for root in _descendants(x, idioms.IDIOM_DEPTH)
               if (m := idioms.match_activation_idiom(root)) is not None and m[1] is x and set(x.users) <= m[2]
               and _same_tensor_type(root, x)]
    if not matches:
        return None
    root, (activation, _, formula) = max(matches, key=lambda rm: len(rm[1][2]))
    return _EpilogueMatch(node, root, {"activation": activation}, chain, frozenset(formula - {root}))


# ---------------------------------------------------------------- input_grad_scale: grad_scale(x) read by GEMMs

@dataclass(frozen=True)
class _InputGradScale:
    node: fx.Node                 # y = grad_scale(x, c)
    readers: tuple[fx.Node, ...]  # FP8 GEMMs reading y as x, and quantize(y) nodes


def _match_input_grad_scale(node: fx.Node) -> _InputGradScale | None:
    """grad_scale(x, c) (identity forward: a copy, in an opaque op) read only as FP8 GEMMs' x and by
    quantize: each GEMM reads x itself and scales its dx by c (x_grad_multiplier) instead."""
    if node.op != "call_function" or node.target is not GRAD_SCALE or not node.users:
        return None
    readers = tuple(node.users)
    for user in readers:
        if user.target is QUANTIZE:
            if user.args[0] is not node:
                return None
        elif not (is_fp8_gemm(user) and linear_args(user)["x"] is node
                  and sum(a is node for a in (*user.args, *user.kwargs.values())) == 1):
            return None
    return _InputGradScale(node, readers)


def _rewrite_input_grad_scale(gm: fx.GraphModule, m: _InputGradScale) -> None:
    x, c = m.node.args
    for user in m.readers:
        if user.target is QUANTIZE:
            user.replace_input_with(m.node, x)
            continue
        args = linear_args(user)
        user.args, user.kwargs = _call_args({**args, "x": x, "x_grad_multiplier": args["x_grad_multiplier"] * float(c)})
    gm.graph.erase_node(m.node)


def _match_output_grad_scale(node: fx.Node) -> fx.Node | None:
    """grad_scale(y, c) of an fp8_linear's y (its only reader; no gate or residual fused, whose gradients c
    would scale too): the GEMM multiplies z's gradient by c itself (grad_multiplier)."""
    if node.op != "call_function" or node.target is not GRAD_SCALE:
        return None
    gemm = node.args[0]
    if not is_fp8_linear(gemm) or len(gemm.users) != 1:
        return None
    return node if _bare_epilogue({**linear_args(gemm), "c_branch": 1.0}, "gate") else None


def _rewrite_output_grad_scale(gm: fx.GraphModule, node: fx.Node) -> None:
    gemm, c = node.args
    args = linear_args(gemm)
    gemm.args, gemm.kwargs = _call_args({**args, "grad_multiplier": args["grad_multiplier"] * float(c)})
    node.replace_all_uses_with(gemm)
    gm.graph.erase_node(node)


# ---------------------------------------------------------------- gemm_fp8_output: the next GEMM's cast

@dataclass(frozen=True)
class _FP8Output:
    gemm: fx.Node
    cast: fx.Node  # munit.quantize of the GEMM's output (through transparent ops)


def _match_gemm_fp8_output(node: fx.Node) -> _FP8Output | None:
    """quantize(y) of an fp8_linear's y (through forward-identity ops) whose epilogue is final (no other
    pattern matches it): the epilogue writes the FP8 copy from its fp32 value instead."""
    if node.op != "call_function" or node.target is not QUANTIZE:
        return None
    gemm = node.args[0]
    while isinstance(gemm, fx.Node) and _is_transparent(gemm):
        gemm = gemm.args[0]
    if not is_fp8_linear(gemm) or any(f.match(gemm) is not None for f in FUSIONS[:-1]):
        return None
    return _FP8Output(gemm, node)


def _rewrite_gemm_fp8_output(gm: fx.GraphModule, m: _FP8Output) -> None:
    graph, (_, scale, fmt) = gm.graph, m.cast.args
    positional, keyword = _call_args({**linear_args(m.gemm), "q_scale": scale, "q_format": fmt})
    with graph.inserting_before(m.gemm):
        fused = graph.call_function(FP8_LINEAR_Q, positional, keyword)
        y, y_q = (graph.call_function(operator.getitem, (fused, i)) for i in (0, 1))
    y_val = m.gemm.meta["val"]
    y_q_val = cast_fp8(y_val, fmt, scale)
    fused.meta.update({**m.gemm.meta, "val": (y_val, y_q_val)})
    y.meta.update(m.gemm.meta)
    y_q.meta["val"] = y_q_val
    m.gemm.replace_all_uses_with(y)
    graph.erase_node(m.gemm)
    if y_q_val.shape != m.cast.meta["val"].shape:  # a row view came between: view the copy the same way
        with graph.inserting_before(m.cast):
            y_q = _reshape(gm, y_q, list(m.cast.meta["val"].shape))
    m.cast.replace_all_uses_with(y_q)
    graph.erase_node(m.cast)


FUSIONS: tuple[Fusion, ...] = (
    Fusion("gemm_activation", _match_gemm_activation, _rewrite_epilogue),
    Fusion("gemm_activation_idiom", _match_gemm_activation_idiom, _rewrite_epilogue),
    Fusion("gemm_gate", _match_gemm_gate, _rewrite_epilogue),
    Fusion("gemm_scale", _match_gemm_scale, _rewrite_epilogue),
    Fusion("gemm_residual", _match_gemm_residual, _rewrite_epilogue),
    Fusion("fp8_input", _match_fp8_input, _rewrite_fp8_input),
    Fusion("input_grad_scale", _match_input_grad_scale, _rewrite_input_grad_scale),
    Fusion("output_grad_scale", _match_output_grad_scale, _rewrite_output_grad_scale),
    Fusion("gemm_fp8_output", _match_gemm_fp8_output, _rewrite_gemm_fp8_output),  # last: needs a final epilogue
)


def fuse(gm: fx.GraphModule, fusions: tuple[Fusion, ...] = FUSIONS) -> tuple[dict[str, str], Counter]:
    """Apply the first matching pattern at every node, sweeping until none matches; return
    ({GEMM decision's node: kernel it runs as}, {pattern name: times it fired})."""
    fired = Counter()
    while True:
        fired_before = sum(fired.values())
        for node in list(gm.graph.nodes):
            if node._erased:  # erased by an earlier rewrite in this sweep
                continue
            for fusion in fusions:
                match = fusion.match(node)
                if match is not None:
                    fusion.rewrite(gm, match)
                    fired[fusion.name] += 1
                    break
        if sum(fired.values()) == fired_before:
            break
    kernels = {}
    for node in gm.graph.nodes:
        if is_fp8_gemm(node) and META_PLAN in node.meta:
            plan = node.meta[META_PLAN] = dataclasses.replace(node.meta[META_PLAN], fused_kernel=kernel_of(node))
            kernels[plan.node] = plan.fused_kernel
    gm.graph.lint()
    gm.recompile()
    return kernels, fired
