"""The `munit` torch.compile backend: Dynamo graph → munit pipeline → aot_autograd + Inductor.

    torch.compile(model, backend="munit")                          # defaults
    torch.compile(model, backend=munit.backend(munit.Config(...)))  # configured
"""
from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import torch
import torch.fx as fx

import munit_compile.ops  # noqa: F401  (registers the munit:: custom ops)
from munit_compile.config import Config
from munit_compile.pipeline import CompileReport, run_pipeline

log = logging.getLogger("munit_compile")


def munit_ops_tag() -> str:
    """A short hash of every munit:: op's schema. Inductor's on-disk cache keys a graph by its code, not by
    the schemas of the custom ops it calls: after an op gains an argument, a cached graph would call it
    with the old positions. The tag goes into the cache key (`torch.compiler.config.cache_key_tag`)."""
    schemas = sorted(str(getattr(torch.ops.munit, name).default._schema) for name in MUNIT_OPS)
    return "munit-" + hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16]


MUNIT_OPS = ("fp8_linear", "fp8_linear_q", "fp8_gemm", "grad_scale", "quantize")


def _inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    tag = getattr(torch.compiler.config, "cache_key_tag", None)
    if tag is None:  # a torch without the cache key tag
        return compile_fx(gm, example_inputs)
    with torch.compiler.config.patch(cache_key_tag=f"{tag}|{munit_ops_tag()}" if tag else munit_ops_tag()):
        return compile_fx(gm, example_inputs)


def _aot_eager(gm, example_inputs):
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(gm, example_inputs)


INNER_COMPILERS = {"inductor": _inductor, "aot_eager": _aot_eager}


class MunitBackend:
    """A configured munit backend; `reports` holds one CompileReport per graph it compiled."""

    def __init__(self, config: Config | None = None):
        if config is not None and not isinstance(config, Config):
            raise ValueError(f"munit.backend expects a munit.Config, got {type(config).__name__}")
        self.config = config or Config()
        self.reports: list[CompileReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence):
        try:
            # normalize traces a new graph: `gm` itself stays untouched for the fallback below
            planned, report = run_pipeline(gm, example_inputs, self.config)
        except Exception as err:
            if self.config.strict:
                raise
            log.warning(
                "munit: analysis failed on a graph (%s: %s); compiling it unchanged in high precision. "
                "Config(strict=True) raises instead.", type(err).__name__, err,
            )
            planned, report = gm, CompileReport(failure=f"{type(err).__name__}: {err}")
        self.reports.append(report)
        return INNER_COMPILERS[self.config.inner_compiler](planned, example_inputs)

    def __repr__(self) -> str:
        return f"MunitBackend({self.config})"


def backend(config: Config | None = None) -> MunitBackend:
    """A torch.compile backend using `config` (defaults when None)."""
    return MunitBackend(config)


def munit_backend(gm: fx.GraphModule, example_inputs: Sequence):
    """The `backend="munit"` entry point: the default configuration."""
    return _DEFAULT(gm, example_inputs)


_DEFAULT = MunitBackend()
