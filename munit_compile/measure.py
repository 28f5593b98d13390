"""Measure what the analysis predicts: run a munit-IR graph on real inputs, record σ and RMS of values and grads.

Used by `munit.inspect(measure=True)` and the tests: one forward and backward with the graph's real
example inputs; the backward starts from the graph's scalar loss output, or from `loss_fn(outputs)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx


@dataclass(frozen=True)
class Measured:
    """Measured statistics of one node: its value's σ and RMS, and its gradient's RMS (None if no grad)."""

    std: float
    rms: float
    grad_rms: float | None


def _std_rms(t: torch.Tensor) -> tuple[float, float]:
    t64 = t.detach().to(torch.float64)
    return (t64.std(unbiased=False).item() if t64.numel() > 1 else 0.0), math.sqrt(t64.pow(2).mean().item())


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.dtype.is_floating_point:
            if out.requires_grad:
                out.retain_grad()
            self.values[n.name] = out
        return out


def measure_graph(gm: fx.GraphModule, example_inputs: Sequence, loss_fn: Callable | None = None) -> dict[str, Measured]:
    """{node name: Measured} for every float tensor node of `gm` (placeholders included)."""
    # fresh leaves: parameters need grads; other inputs may carry autograd history from an earlier graph
    inputs = [x.detach().requires_grad_(isinstance(x, torch.nn.Parameter)) if isinstance(x, torch.Tensor) else x
              for x in example_inputs]
    rec = _Recorder(gm)
    with torch.enable_grad():
        outputs = rec.run(*inputs)
        loss = loss_fn(outputs) if loss_fn is not None else next(
            (o for o in outputs if isinstance(o, torch.Tensor) and o.numel() == 1 and o.requires_grad), None
        )
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
    result = {}
    for name, t in rec.values.items():
        std, rms = _std_rms(t)
        result[name] = Measured(std, rms, _std_rms(t.grad)[1] if t.grad is not None else None)
    return result


def measure_rms(gm: fx.GraphModule, example_inputs: Sequence, loss_fn: Callable | None = None) -> dict[str, tuple[float, float | None]]:
    """{node name: (rms of its value, rms of d loss/d value or None)} (see `measure_graph`)."""
    return {name: (m.rms, m.grad_rms) for name, m in measure_graph(gm, example_inputs, loss_fn).items()}
