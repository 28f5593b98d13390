"""`munit.unit_scale(model, example_inputs)`: the model, μS-parametrized by a graph rewrite (DESIGN §4).

    model = munit.unit_scale(model, (ids, ids))            # or example_kwargs={"input_ids": ids, ...}
    opt = munit.optim.AdamW(munit.param_groups(model, lr=2**-6, base_width=64))
    model = torch.compile(model, backend="munit")           # hidden GEMMs in FP8 with scale 1

The forward is captured with `torch.export` (one graph; a graph break is an error naming it), rewritten
(`rewrite.py`), and run as an `nn.Module` that owns the original model's parameters, re-initialized
N(0, 1) (biases zero, norm gains one). The graph is re-captured, without re-initializing, when the
call's input shapes, the module's train/eval mode, or its parameters' dtype/device change.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from munit_compile.unit_scale.analysis import ROLES, find_gemms, mark_parameters, parameter_roles
from munit_compile.unit_scale.config import UnitScaleConfig, default_tau
from munit_compile.unit_scale.rewrite import rewrite, unit_multipliers

log = logging.getLogger("munit_compile")

__all__ = ["unit_scale", "UnitScaled", "UnitScaleConfig", "default_tau", "ROLES"]

INIT = {  # role -> re-initialization of the parameter, in place (norm gains keep theirs: ones)
    "hidden": lambda p, gen: p.normal_(0.0, 1.0, generator=gen),
    "embedding": lambda p, gen: p.normal_(0.0, 1.0, generator=gen),
    "head": lambda p, gen: p.normal_(0.0, 1.0, generator=gen),
    "bias": lambda p, gen: p.zero_(),
}


class UnitScaled(nn.Module):
    """A μS version of `model` (see the module docstring). `munit_roles` maps each parameter name (as in
    `named_parameters()`) to its role; `munit_width` is the model width (`param_groups` reads both);
    `munit_rewrite` says what the rewrite did (τ, residuals, GEMM roles, norms moved)."""

    def __init__(self, model: nn.Module, config: UnitScaleConfig):
        super().__init__()
        self.model = model
        self.config = config
        self._graphs: dict = {}
        self.munit_roles: dict[str, str] = {}
        self.munit_width: int | None = None
        self.munit_rewrite: dict = {}
        self.input_multipliers: dict[str, float] = {}  # weight name -> static multiplier on its GEMM's input
        self.output_grad_scales: dict[str, float] = {}  # weight name -> gradient scale on its GEMM's output

    def forward(self, *args, **kwargs):
        key = self._key(args, kwargs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key, args, kwargs)
        return graph(*args, **kwargs)

    def _key(self, args, kwargs) -> tuple:
        """What a captured graph is specialized to: train/eval (dropout is baked per mode), the
        parameters' dtype and device, and the inputs' shapes and dtypes."""
        def sig(v):
            return (tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else repr(v)
        param = next(self.model.parameters())
        return (self.training, param.dtype, param.device.type, tuple(map(sig, args)),
                tuple((k, sig(v)) for k, v in sorted(kwargs.items())))

    @torch._dynamo.disable
    def _capture(self, key, args, kwargs) -> torch.fx.GraphModule:
        graph = capture(self.model, args, kwargs)
        self.munit_rewrite = rewrite(graph, self.config, self.input_multipliers, self.output_grad_scales)
        self.munit_rewrite["input_multipliers"] = len(self.input_multipliers)
        self.munit_rewrite["output_grad_scales"] = len(self.output_grad_scales)
        self._graphs[key] = graph
        return graph

    def _apply(self, fn, recurse=True):
        self._graphs.clear()  # a dtype/device change: re-capture with the converted parameters
        return super()._apply(fn, recurse)


def capture(model: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """The model's forward as one ATen graph whose get_attr nodes read the model's own parameters."""
    try:
        exported = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    except Exception as err:
        raise ValueError(
            f"munit.unit_scale: could not capture {type(model).__name__}'s forward as one graph "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); unit_scale needs a forward "
            "that torch.export can trace (no data-dependent control flow; for transformers models pass "
            "use_cache=False)") from err
    module = exported.module()
    graph = torch.fx.GraphModule(module, module.graph)  # a plain GraphModule: train()/eval() allowed
    own = dict(model.named_parameters(remove_duplicate=False))
    for name, p in graph.named_parameters(remove_duplicate=False):
        if name in own and own[name] is not p:  # make the graph read (and train) the model's tensors
            _set_attr(graph, name, own[name])
    return graph


def graph_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The call's inputs in the order of the captured graph's placeholders (its pytree input spec)."""
    from torch.fx._pytree import tree_flatten_spec

    return list(tree_flatten_spec((tuple(args), dict(kwargs)), gm.graph._codegen.pytree_info.in_spec))


def _set_attr(module: nn.Module, name: str, value) -> None:
    *path, last = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, last, value)


def unit_scale(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None,
               config: UnitScaleConfig | None = None) -> UnitScaled:
    """Re-initialize `model`'s parameters in place for μS and return the rewritten model (module docstring)."""
    config = config or UnitScaleConfig()
    if not isinstance(config, UnitScaleConfig):
        raise ValueError(f"unit_scale: config must be a munit.UnitScaleConfig, got {type(config).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})
    scaled = UnitScaled(model, config)
    graph = capture(model, example_inputs, example_kwargs)
    mark_parameters(graph)
    by_tensor = {id(graph.get_parameter(name)): role for name, role in parameter_roles(graph, find_gemms(graph)).items()}
    own = dict(model.named_parameters())  # tied weights once, under the name export may not have used
    roles = {name: by_tensor.get(id(p), "norm") for name, p in own.items()}
    scaled.munit_roles = {f"model.{name}": role for name, role in roles.items()}
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    with torch.no_grad():
        for name, p in own.items():
            if p.is_meta or roles[name] not in INIT:
                continue
            fresh = torch.empty(p.shape, dtype=torch.float32)  # drawn in fp32: the same init for every dtype
            INIT[roles[name]](fresh, gen)
            p.copy_(fresh)
    embeddings = [p for name, p in own.items() if roles[name] == "embedding"]
    scaled.munit_width = int(embeddings[0].shape[1]) if embeddings else None
    scaled.train(model.training)
    rewrite(graph, config, input_multipliers=None)  # the captured graph reads the re-initialized tensors
    scaled.input_multipliers, scaled.output_grad_scales = unit_multipliers(
        graph, graph_inputs(graph, example_inputs, example_kwargs))
    scaled._capture(scaled._key(example_inputs, example_kwargs), example_inputs, example_kwargs)
    log.info("munit.unit_scale: %s", scaled.munit_rewrite)
    return scaled
