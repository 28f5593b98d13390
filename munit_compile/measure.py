"""Measure what the analysis predicts: run a munit-IR graph on real inputs, record RMS of values and grads.

Used by tests and (later) by `munit.inspect(measure=True)`: one forward and backward with the graph's
real example inputs; the backward starts from the graph's scalar loss output, or from `loss_fn(outputs)`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.fx as fx


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.dtype.is_floating_point and out.requires_grad:
            out.retain_grad()
            self.values[n.name] = out
        return out


def measure_rms(
    gm: fx.GraphModule, example_inputs: Sequence, loss_fn: Callable | None = None
) -> dict[str, tuple[float, float | None]]:
    """{node name: (rms of its value, rms of d loss/d value or None)} for float nodes that carry a grad."""
    inputs = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.nn.Parameter) else x for x in example_inputs]
    rec = _Recorder(gm)
    outputs = rec.run(*inputs)
    loss = loss_fn(outputs) if loss_fn is not None else next(
        o for o in outputs if isinstance(o, torch.Tensor) and o.numel() == 1 and o.requires_grad
    )
    loss.backward()
    rms = lambda t: math.sqrt(t.detach().double().pow(2).mean().item())
    return {name: (rms(t), rms(t.grad) if t.grad is not None else None) for name, t in rec.values.items()}
