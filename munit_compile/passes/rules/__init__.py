"""Variance rules, one small module per op family, registered by aten op.

A forward rule maps a `Site` (the node, its argument Values, shapes) to the output Value.
A backward rule maps (site, grad of the output) to the grads of the node's args, position by position
(None where no gradient flows). Each rule's docstring states its formula; σ² = var, m2 = E[x²].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from munit_compile.ir import concrete_shape, numel, tensor_of
from munit_compile.passes.symbolic import DimNames
from munit_compile.passes.values import Moments, Unknown

FORWARD_RULES: dict[Any, Callable] = {}
BACKWARD_RULES: dict[Any, Callable] = {}


def forward_rule(*ops):
    """Register `fn(site) -> Value` as the forward rule of each op in `ops`."""
    def register(fn):
        for op in ops:
            FORWARD_RULES[op] = fn
        return fn
    return register


def backward_rule(*ops):
    """Register `fn(site, grad: Moments) -> tuple` (grads of the node's args) for each op in `ops`."""
    def register(fn):
        for op in ops:
            BACKWARD_RULES[op] = fn
        return fn
    return register


@dataclass
class Site:
    """One node as a rule sees it: argument Values in place of argument nodes, plus shapes."""

    node: fx.Node
    args: tuple
    kwargs: dict
    out: Moments | Any = None  # the node's forward Value (set for backward rules)
    dims: DimNames | None = None  # symbolic analysis: sizes come as Dims carrying their symbols

    def _sizes(self, shape) -> tuple[int, ...]:
        return tuple(self.dims.dim(s) for s in shape) if self.dims is not None else concrete_shape(shape)

    def arg(self, i: int, name: str, default=None):
        """Argument `i` (or keyword `name`) as a Value or Python constant."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def shape(self, i: int) -> tuple[int, ...]:
        """Shape of tensor argument `i` (positional); symbolic sizes give their example values."""
        t = tensor_of(self.node.args[i])
        if t is None:
            raise ValueError(f"argument {i} of {self.node.format_node()} is not a tensor")
        return self._sizes(t.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self._sizes(self.node.meta["val"].shape)

    def broadcast_factor(self, i: int) -> float:
        """How many output elements each element of argument `i` feeds (its grads add up)."""
        t = tensor_of(self.node.args[i])
        if t is None:
            return 1.0
        return numel(self.out_shape) / max(numel(self._sizes(t.shape)), 1)


def is_tensor(value) -> bool:
    """Whether a rule argument is a tensor (its Value may be Unknown: gradients still flow into it)."""
    return isinstance(value, (Moments, Unknown))


def scaled(m: Moments, c: float) -> Moments:
    """Moments of c·X."""
    sampler = None if m.sampler is None else (lambda n, gen: c * m.sampler(n, gen))
    return Moments(m.mean * c, m.m2 * c * c, m.gaussian, m.row_constant, sampler=sampler)


def grad(m2: float) -> Moments:
    """A zero-mean gradient of second moment m2."""
    return Moments(0.0, m2, gaussian=True)


# Import the rule modules so they register themselves.
from munit_compile.passes.rules import (  # noqa: E402,F401
    activation,
    arith,
    attention,
    gemm,
    masking,
    norm,
    reduction,
    shape,
    sparse,
)
