"""The μS graph rewrite (DESIGN §4), applied to a captured ATen graph whose parameters are get_attr nodes.

    hidden GEMM  y = (x Wᵀ)/√k + b          LM head  y = (x Wᵀ)/k        embedding  unchanged (×1)
    residual     x ← √(1−τ)·x + √τ·LN(f(x))  (res_post: f's leading norm removed)  or  √(1−τ)·x + √τ·f(x)
    unit backward (optional, forward unchanged): logits' gradient × 1/σ_CE (one global constant); each
                 hidden GEMM's output gradient × c (the engine's 1/σ at init) and its input gradient × 1/c,
                 so every parameter's gradient is its true gradient times one constant (invisible to
                 Adam-like optimizers) while every FP8 gradient operand is unit-scaled. Scaling an input
                 gradient by anything else would reweight branch against skip in the residual stream, or
                 a tied embedding's two uses against each other: a biased gradient.
A GEMM with a bias is rewritten as GEMM(x, W, b·m⁻¹)·m: one op for the FP8 plan, the same function.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from munit_compile.ir import aten, concrete_shape, numel, tensor_of
from munit_compile.passes.rules.sparse import cross_entropy_grad_m2
from munit_compile.unit_scale.analysis import Gemm, Residual, find_gemms, find_residuals, mark_parameters
from munit_compile.unit_scale.config import UnitScaleConfig, default_tau

grad_scale = torch.ops.munit.grad_scale.default
META_UNIT_INPUT = "munit_unit_input"  # probe graphs: this mul's constant is a GEMM input multiplier to set
META_UNIT_GRAD = "munit_unit_grad"    # probe graphs: this grad_scale's constant is a GEMM output-gradient scale
ASSERT_OPS = (aten._assert_tensor_metadata.default,)  # export's dtype asserts: they would forbid .to(dtype)


def multiplier(g: Gemm) -> float:
    """The static output multiplier of a GEMM: 1/√fan_in (hidden) or 1/fan_in (head)."""
    return 1 / math.sqrt(g.operands.k) if g.role == "hidden" else 1 / g.operands.k


def count_layers(residuals: list[Residual]) -> int:
    """Transformer layers ≈ residual adds / 2 (attention + MLP branch each)."""
    return max(1, round(len(residuals) / 2))


def rewrite(gm: fx.GraphModule, config: UnitScaleConfig, input_multipliers: dict[str, float] | None = None,
            output_grad_scales: dict[str, float] | None = None) -> dict:
    """Rewrite `gm` in place (see the module docstring); returns what was done, for the report.

    `input_multipliers`: weight name -> a static multiplier on that GEMM's input (unit σ at init; see
    `unit_multipliers`); `output_grad_scales`: weight name -> c, a `grad_scale(y, c)` after that GEMM's
    output and `grad_scale(x, 1/c)` on its input, so gradients upstream are exact). None for
    both: a probe graph with 1s on every hidden GEMM, tagged for `unit_multipliers` to set."""
    mark_parameters(gm)
    for node in [n for n in gm.graph.nodes if n.target in ASSERT_OPS]:
        gm.graph.erase_node(node)
    gemms = find_gemms(gm)
    residuals = find_residuals(gm, gemms)
    tau = config.tau if config.tau is not None else default_tau(count_layers(residuals))
    for g in gemms:  # first: residual rewrites read their operands from the graph as it then is
        probe = input_multipliers is None and g.role == "hidden"
        c = 1.0 if probe else (input_multipliers or {}).get(g.operands.w.target)
        c_grad = (1.0 if probe else (output_grad_scales or {}).get(g.operands.w.target)) if config.unit_backward else None
        _scale_gemm(gm.graph, g, c, c_grad, probe)
    for r in residuals:
        _rewrite_residual(gm.graph, r, tau, config.norm_placement)
    if config.attention_scale == "1/d":
        _inverse_head_dim_attention(gm.graph)
    if config.qk_norm:
        _normalize_queries_and_keys(gm.graph)
    logits_scale = _unit_loss_gradient(gm.graph, gemms) if config.unit_backward else None
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return {"tau": tau, "residuals": len(residuals), "gemms": {g.node.name: g.role for g in gemms},
            "norms_moved": sum(r.leading_norm is not None for r in residuals) if config.norm_placement == "res_post" else 0,
            "logits_grad_scale": logits_scale}


def _call(graph: fx.Graph, target, args, like: fx.Node, kwargs=None) -> fx.Node:
    node = graph.call_function(target, args, kwargs or {})
    if "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    return node


def _rewrite_residual(graph: fx.Graph, r: Residual, tau: float, placement: str) -> None:
    skip, branch = r.skip, r.branch  # as the graph now is (earlier rewrites replaced nodes)
    with graph.inserting_before(r.add):
        if placement == "res_post":
            if r.leading_norm is not None:
                r.leading_norm.replace_all_uses_with(skip, lambda user: user is not r.add)
            width = concrete_shape(tensor_of(branch).shape)[-1]
            branch = _call(graph, aten.layer_norm.default, (branch, [width], None, None, 1e-5), like=branch)
        skip = _call(graph, aten.mul.Tensor, (skip, math.sqrt(1 - tau)), like=skip)
        mixed = _call(graph, aten.add.Tensor, (skip, branch), like=r.add, kwargs={"alpha": math.sqrt(tau)})
    r.add.replace_all_uses_with(mixed)


def _scale_gemm(graph: fx.Graph, g: Gemm, input_multiplier: float | None,
                output_grad_scale: float | None, probe: bool) -> None:
    node, m = g.node, multiplier(g)
    bias, x = g.operands.bias, g.operands.x
    with graph.inserting_before(node):
        if input_multiplier is not None:
            x = _call(graph, aten.mul.Tensor, (x, input_multiplier), like=x)
            if probe:
                x.meta[META_UNIT_INPUT] = g.operands.w.target
        if output_grad_scale is not None:  # undoes the output's scale: exact gradient
            x = _call(graph, grad_scale, (x, 1.0 / output_grad_scale), like=x)
        if x is not g.operands.x:
            node.replace_input_with(g.operands.x, x)
        if isinstance(bias, fx.Node):
            node.replace_input_with(bias, _call(graph, aten.mul.Tensor, (bias, 1 / m), like=bias))
    with graph.inserting_after(node):
        scaled = _call(graph, aten.mul.Tensor, (node, m), like=node)
    node.replace_all_uses_with(scaled, lambda user: user is not scaled)
    if output_grad_scale is not None:
        with graph.inserting_after(scaled):
            out = _call(graph, grad_scale, (scaled, output_grad_scale), like=scaled)
        scaled.replace_all_uses_with(out, lambda user: user is not out)
        if probe:
            out.meta[META_UNIT_GRAD] = g.operands.w.target


def _inverse_head_dim_attention(graph: fx.Graph) -> None:
    """softmax(q·kᵀ/d) instead of /√d in every SDPA (its `scale` argument)."""
    for node in graph.nodes:
        if node.target is aten.scaled_dot_product_attention.default:
            head_dim = concrete_shape(tensor_of(node.args[0]).shape)[-1]
            if len(node.args) > 6:
                node.args = (*node.args[:6], 1.0 / head_dim, *node.args[7:])
            else:
                node.kwargs = {**node.kwargs, "scale": 1.0 / head_dim}


def _normalize_queries_and_keys(graph: fx.Graph) -> None:
    """q, k ← LN(q), LN(k) over the head dim (no affine) in every SDPA."""
    for node in list(graph.nodes):
        if node.target is aten.scaled_dot_product_attention.default:
            with graph.inserting_before(node):
                for i in (0, 1):
                    t = node.args[i]
                    head_dim = concrete_shape(tensor_of(t).shape)[-1]
                    normed = _call(graph, aten.layer_norm.default, (t, [head_dim], None, None, 1e-5), like=t)
                    node.args = (*node.args[:i], normed, *node.args[i + 1:])


def _unit_loss_gradient(graph: fx.Graph, gemms: list[Gemm]) -> float | None:
    """× 1/σ_CE on the head's output, σ_CE = √((1−1/V)/V)/N (mean cross-entropy over N tokens)."""
    heads = [g for g in gemms if g.role == "head"]
    if len(heads) != 1:
        return None
    head = heads[0].node
    scaled_out = next(iter(head.users))  # the multiplier inserted after the head
    shape = concrete_shape(tensor_of(head).shape)
    vocab, tokens = shape[-1], numel(shape) // shape[-1]
    scale = 1 / math.sqrt(cross_entropy_grad_m2(vocab, tokens))
    with graph.inserting_after(scaled_out):
        logits = _call(graph, grad_scale, (scaled_out, scale), like=scaled_out)
    scaled_out.replace_all_uses_with(logits, lambda user: user is not logits)
    return scale


UNIT_BAND = (2 ** -0.5, 2 ** 0.5)  # σ inside this band already gets FP8 scale 1


def unit_multipliers(gm: fx.GraphModule, example_inputs: list) -> tuple[dict[str, float], dict[str, float]]:
    """(input multipliers, output-gradient scales), weight name -> constant, for the hidden GEMMs of a
    probe graph (`rewrite(..., None)`) where the variance engine predicts σ outside [1/√2, √2] at init:
    inputs (attention outputs ≈ 0.45, GELU/SiLU outputs ≈ 0.6) × 1/σ, set in one forward pass before
    their consumers are analysed; each hidden GEMM's output gradient × 1/σ_grad (undone on its input)."""
    from munit_compile.ir import META_BWD, META_FWD
    from munit_compile.passes.values import Moments
    from munit_compile.passes.variance import propagate_backward, propagate_forward

    inputs: dict[str, float] = {}

    def set_multiplier(node: fx.Node) -> None:
        weight = node.meta.get(META_UNIT_INPUT)
        value = node.args[0].meta.get(META_FWD) if weight is not None else None
        if isinstance(value, Moments) and value.rms > 0 and not (UNIT_BAND[0] <= value.rms <= UNIT_BAND[1]):
            inputs[weight] = 1 / value.rms
            node.args = (node.args[0], inputs[weight])

    propagate_forward(gm, example_inputs, before_node=set_multiplier)
    propagate_backward(gm)
    grads: dict[str, float] = {}
    for node in gm.graph.nodes:
        weight, g = node.meta.get(META_UNIT_GRAD), node.meta.get(META_BWD)
        if weight is not None and isinstance(g, Moments) and g.rms > 0 and not (UNIT_BAND[0] <= g.rms <= UNIT_BAND[1]):
            grads[weight] = 1 / g.rms
    return inputs, grads
