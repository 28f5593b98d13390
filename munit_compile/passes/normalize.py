"""Normalize a Dynamo (torch-IR) graph into the one IR every munit pass reads: pre-dispatch ATen.

    before: linear = torch._C._nn.linear(h, l_self_fc_weight, l_self_fc_bias)
    after:  linear = torch.ops.aten.linear.default(arg0_1, arg1_1, arg2_1)

Pre-dispatch tracing keeps the ops rules are written for (`aten.linear`, `aten.addmm`, `aten.layer_norm`,
`aten.scaled_dot_product_attention`, `aten.gelu`, `aten.cross_entropy_loss`, …) and resolves methods,
operators and modules. Placeholders keep their order, so example inputs line up.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from munit_compile.ir import META_SOURCE_NAME


def normalize_to_aten(gm: fx.GraphModule, example_inputs: Sequence) -> fx.GraphModule:
    """Trace `gm` at the pre-dispatch level under the caller's fake mode; every node gets meta["val"]."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        traced = make_fx(gm, pre_dispatch=True, tracing_mode="fake")(*example_inputs)
    else:
        fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        with fake_mode:
            traced = make_fx(gm, pre_dispatch=True, tracing_mode="real")(*fakes)
    sources = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for node, source in zip((n for n in traced.graph.nodes if n.op == "placeholder"), sources):
        node.meta[META_SOURCE_NAME] = source  # e.g. l_self_modules_fc_parameters_weight_ for arg3_1
    return traced
