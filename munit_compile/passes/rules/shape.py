"""Views, layout and dtype changes: values pass through; gradients pass back, summed over broadcasts."""
from __future__ import annotations

import torch

import munit_compile.ops  # noqa: F401  (registers the munit ops the rules below name)

from munit_compile.ir import numel
from munit_compile.passes.rules import backward_rule, forward_rule, grad
from munit_compile.passes.values import Moments

aten = torch.ops.aten

PASS_THROUGH = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.t.default, aten.permute.default, aten.unsqueeze.default, aten.squeeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.contiguous.default, aten.clone.default,
    aten.alias.default, aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default,
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.view_as.default, aten.reshape_as.default,
    aten.movedim.int, aten.swapaxes.default, aten.view.dtype, aten.numpy_T.default, aten.mT.default,
    aten.adjoint.default,
)
BROADCASTING = (aten.expand.default, aten.expand_as.default, aten.repeat.default)
SELECTING = (aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.index.Tensor, aten.index_select.default)
# Rearrangements that keep every element (or duplicate each equally often): mean and m2 are unchanged
# exactly, so a folded constant need not be measured again after them.
SAME_MOMENTS = frozenset(PASS_THROUGH + BROADCASTING) - {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.view.dtype}
SPLITTING = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)


@forward_rule(*PASS_THROUGH, *BROADCASTING, *SELECTING)
def same_values(site):
    """y = x rearranged (or a subset / repetition of it): same element distribution."""
    return site.args[0]


@backward_rule(*PASS_THROUGH)
def pass_grad(site, g):
    """dx = dy rearranged."""
    return (g,)


@backward_rule(*BROADCASTING)
def sum_broadcast_grad(site, g):
    """dx = Σ over the copies of dy: m2 × (numel y / numel x)."""
    return (grad(g.m2 * site.broadcast_factor(0)),)


@backward_rule(*SELECTING)
def select_grad(site, g):
    """dx = dy scattered into zeros: m2 × (numel y / numel x)."""
    return (grad(g.m2 * site.broadcast_factor(0)),)


@forward_rule(*SPLITTING)
def split_values(site):
    """Each piece has the input's element distribution."""
    return tuple(site.args[0] for _ in site.node.meta["val"])


@backward_rule(*SPLITTING)
def split_grad(site, g):
    """dx = the pieces' grads side by side (zeros for pieces nobody used): numel-weighted m2."""
    pieces = site.node.meta["val"]
    total = sum(numel(p.shape) for p in pieces)
    m2 = sum(g[i].m2 * numel(pieces[i].shape) for i in g) / max(total, 1)
    return (grad(m2),)


@forward_rule(aten.cat.default, aten.stack.default)
def cat_values(site):
    """Concatenation: the numel-weighted mixture of the inputs' moments."""
    parts = [(v, numel(t.meta["val"].shape)) for v, t in zip(site.args[0], site.node.args[0])]
    total = sum(n for _, n in parts) or 1
    mean = sum(v.mean * n for v, n in parts) / total
    m2 = sum(v.m2 * n for v, n in parts) / total
    return Moments(mean, m2, all(v.gaussian for v, _ in parts))


@backward_rule(aten.cat.default, aten.stack.default)
def cat_grad(site, g):
    """Each input gets its slice of dy."""
    return ([g for _ in site.node.args[0]],)


@forward_rule(aten.pad.default, aten.constant_pad_nd.default)
def pad_values(site):
    """Padding with constant c: mixture of x and c by element count."""
    x = site.args[0]
    value = site.arg(3 if site.node.target is aten.pad.default else 2, "value", 0.0) or 0.0
    keep = numel(site.shape(0)) / max(numel(site.out_shape), 1)
    return Moments(keep * x.mean + (1 - keep) * value, keep * x.m2 + (1 - keep) * value * value, x.gaussian)


@backward_rule(aten.pad.default, aten.constant_pad_nd.default)
def pad_grad(site, g):
    """dx = dy without the padded border."""
    return (g,)


@forward_rule(torch.ops.munit.grad_scale.default)
def grad_scale(site):
    """munit::grad_scale: y = x."""
    return site.args[0]


@backward_rule(torch.ops.munit.grad_scale.default)
def grad_scale_grad(site, g):
    """dx = c·dy: m2 × c²."""
    c = site.args[1]
    return (grad(g.m2 * c * c), None)
