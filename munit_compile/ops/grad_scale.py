"""`munit::grad_scale`: identity forward, gradient multiplied by a constant in backward.

    y = x,   dx = c·dy
Unit scaling uses it to give gradients unit scale where a forward multiplier cannot (the loss's
gradient, a GEMM's input-gradient path) without changing any forward value.
"""
from __future__ import annotations

import math

import torch


@torch.library.custom_op("munit::grad_scale", mutates_args=())
def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x (a copy: custom ops may not alias their inputs); backward dx = scale·dy."""
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"munit::grad_scale: scale must be a finite positive float, got {scale!r}")
    return x.clone()


@grad_scale.register_fake
def _grad_scale_fake(x, scale):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.scale = inputs[1]


def _backward(ctx, grad):
    return grad * ctx.scale, None


grad_scale.register_autograd(_backward, setup_context=_setup_context)
