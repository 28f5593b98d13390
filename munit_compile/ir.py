"""The graph view every munit pass shares: pre-dispatch ATen FX graphs plus `node.meta` keys.

Invariants after every pass: each tensor-producing node has `meta["val"]` (a fake tensor with the
node's shape and dtype); munit annotations live only under the keys below.
"""
from __future__ import annotations

import torch
import torch.fx as fx

META_FWD = "munit_fwd"        # forward statistics of the node's value (a passes.variance Value)
META_BWD = "munit_bwd"        # statistics of d(loss)/d(node) (a Value, or absent if no gradient flows)
META_PLAN = "munit_fp8_plan"  # the FP8 decision for a GEMM node (a passes.fp8_plan GemmDecision)
META_ROLE = "munit_role"      # placeholders: "parameter" | "buffer" | "input"
META_SOURCE_NAME = "munit_source_name"  # placeholders: the input's name in the Dynamo graph

aten = torch.ops.aten


def tensor_of(arg) -> torch.Tensor | None:
    """The fake tensor of a node argument, or None if the argument is not a tensor node."""
    if isinstance(arg, fx.Node):
        val = arg.meta.get("val")
        return val if isinstance(val, torch.Tensor) else None
    return None


def op_name(target) -> str:
    """A readable name for a node target: `aten.linear.default`, `munit.fp8_linear.default`, ..."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def concrete_int(size) -> int:
    """An int size; a symbolic size (dynamic shapes) gives its example value without adding a guard."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    node = size.node
    for attr in ("_hint", "hint"):  # SymNode keeps the example value; the attribute name varies by version
        hint = getattr(node, attr, None)
        if isinstance(hint, int):
            return hint
    raise ValueError(f"symbolic size {size} has no example value (data-dependent)")


def concrete_shape(shape) -> tuple[int, ...]:
    return tuple(concrete_int(s) for s in shape)


def numel(shape) -> int:
    """Product of the sizes (an int subclass such as symbolic.Dim keeps its expression)."""
    n = 1
    for s in shape:
        n = n * (s if isinstance(s, int) else concrete_int(s))
    return n
