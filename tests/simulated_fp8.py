"""An independent, eager, float64 simulation of static-scaled FP8 linear layers (test-only).

`patch_linear_modules` swaps each given nn.Linear / Conv1D forward for y = q₄(x)q₄(W)ᵀ + b with the
backward dx = q₅(dy)q₄(W), dW = q₅(dy)ᵀq₄(x), where q is scale → saturate → round → unscale.
"""
from __future__ import annotations

import torch
import torch.nn as nn

FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


def quantize64(t: torch.Tensor, fmt: str, scale: float) -> torch.Tensor:
    dtype, fmax = FORMATS[fmt]
    return torch.clamp(t.double() * scale, -fmax, fmax).to(dtype).double() / scale


class SimulatedFP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, scales):
        sx, sw, sg = scales
        xq = quantize64(x.reshape(-1, x.shape[-1]), "e4m3", sx)
        wq = quantize64(w, "e4m3", sw)
        ctx.save_for_backward(xq, wq)
        ctx.meta = (sg, x.shape, x.dtype, w.dtype, b is not None)
        y = xq @ wq.t()
        if b is not None:
            y = y + b.double()
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        xq, wq = ctx.saved_tensors
        sg, x_shape, x_dtype, w_dtype, has_bias = ctx.meta
        g = gy.reshape(-1, gy.shape[-1])
        gq = quantize64(g, "e5m2", sg)
        gx = (gq @ wq).to(x_dtype).reshape(x_shape)
        gw = (gq.t() @ xq).to(w_dtype)
        gb = g.double().sum(0).to(gy.dtype) if has_bias else None
        return gx, gw, gb, None


def _simulated_forward(module: nn.Module, scales):
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):   # weight is [in, out]: y = x @ W + b
        return lambda x: SimulatedFP8Linear.apply(x, module.weight.t(), module.bias, scales)
    return lambda x: SimulatedFP8Linear.apply(x, module.weight, module.bias, scales)


def patch_linear_modules(modules: list[nn.Module], scales: list[tuple[float, float, float]]) -> None:
    """Make each module compute simulated FP8 with its (s_x, s_w, s_g)."""
    assert len(modules) == len(scales), (len(modules), len(scales))
    for module, s in zip(modules, scales):
        module.forward = _simulated_forward(module, s)
