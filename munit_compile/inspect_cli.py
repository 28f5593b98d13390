"""`munit inspect TARGET`: what munit predicts for a model, what it measured, and what the FP8 plan does.

    munit inspect hf:llama --measure --json r.json --plot r.png --mlir r.mlir
    munit inspect builtin:gpt --unit-scale                  # after munit.unit_scale: every FP8 scale is 1
    munit inspect my_pkg.models:make_model --only all       # or path/to/file.py:make_model

TARGET is one of
  hf:<model_type>        a transformers causal LM (`llama`, `gpt2`, `mistral`, `qwen2`, ...) built from a small
                         config of that type, random init, nothing downloaded; --layers --hidden --heads --vocab
  builtin:gpt            munit's own nanoGPT-style model (munit_compile.models.GPT); the same overrides
  package.module:factory a callable returning a model, or a (model, example_inputs) pair; example_inputs is a
  path/file.py:factory   tuple (positional), a dict (keyword) or one tensor. For a bare model the inputs are
                         token ids [batch, seq]: keyword input_ids=labels=ids for a transformers model, else
                         (ids, ids) when forward takes two positional arguments (the second the targets), else (ids,)

Token ids double as labels, so the loss and its gradient are part of the analysed graph.

Output: a table on stdout (GEMMs only unless --only all), progress on stderr, and optionally
  --json FILE   the whole report (every row), schema: `JSON_SCHEMA` below (`validate_json` checks a document)
  --plot FILE   a PNG: predicted and measured σ of every GEMM operand (x, W forward; d output backward) on a
                log2 axis, the σ after the static scale, and the E4M3 / E5M2 normal ranges shaded (implies --measure)
  --mlir FILE   the planned graph(s), forward and backward, in torch-mlir's torch dialect; munit's FP8 ops
                expanded into their saturating casts, so the f8E4M3FN / f8E5M2 tensor types are visible
                (needs the optional extra: pip install munit-compile[mlir])

Exit codes: 0 ok; 2 bad arguments or target (the message says what and how to fix it); 1 the analysis failed.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect as pyinspect
import json
import math
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PROG = "munit inspect"
MLIR_INSTALL_HINT = "pip install munit-compile[mlir]"
PLOT_INSTALL_HINT = "pip install munit-compile[plot]"

# FP8 normal ranges (ops/formats.py): what the --plot bands show
E4M3_NORMAL = (2.0**-6, 448.0)
E5M2_NORMAL = (2.0**-14, 57344.0)


class UsageError(Exception):
    """Bad arguments or target (exit 2); the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------- the --json document

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_SCALE = {"type": "number", "exclusiveMinimum": 0, "description": "static power-of-two scale s (cast input = σ·s)"}
_FP8_FORMAT = {"enum": ["e4m3", "e5m2"]}

ROW_SCHEMA = {
    "type": "object",
    "description": "one node of the analysed graph (pre-dispatch ATen)",
    "required": ["name", "op", "shape", "pred_std", "pred_grad_std", "meas_std", "meas_grad_std",
                 "fp8", "fused_kernel", "status", "reason"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "description": "FX node name"},
        "op": {"type": "string", "description": "e.g. aten.linear.default, or placeholder / get_attr"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "pred_std": {**_NUMBER_OR_NULL, "description": "predicted σ of the value; null where unknown"},
        "pred_grad_std": {**_NUMBER_OR_NULL, "description": "predicted RMS of d loss / d value"},
        "meas_std": {**_NUMBER_OR_NULL, "description": "measured σ (null without --measure)"},
        "meas_grad_std": {**_NUMBER_OR_NULL, "description": "measured gradient RMS (null without --measure)"},
        "fp8": {
            "type": ["object", "null"],
            "description": "the static FP8 plan of a GEMM, null for every other node and high-precision GEMMs",
            "required": ["x_format", "x_scale", "w_format", "w_scale", "grad_format", "grad_scale"],
            "additionalProperties": False,
            "properties": {"x_format": _FP8_FORMAT, "x_scale": _SCALE, "w_format": _FP8_FORMAT,
                           "w_scale": _SCALE, "grad_format": _FP8_FORMAT, "grad_scale": _SCALE},
        },
        "fused_kernel": {"type": ["string", "null"], "description": "the fused kernel the node runs in, if any"},
        "status": {"enum": ["ok", "unknown", "high_precision"]},
        "reason": {"type": "string", "description": "why unknown / high precision, or the predicted FP8 underflow"},
    },
}

JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "munit inspect report",
    "type": "object",
    "required": ["schema_version", "target", "options", "rows", "summary", "operand_checks"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": 1},
        "target": {"type": "string", "description": "TARGET as given on the command line"},
        "options": {
            "type": "object",
            "required": ["batch", "seq", "measure", "unit_scale"],
            "additionalProperties": False,
            "properties": {
                "batch": {"type": "integer", "minimum": 1},
                "seq": {"type": "integer", "minimum": 1},
                "measure": {"type": "boolean"},
                "unit_scale": {"type": "boolean"},
                "model": {"type": "object", "description": "the size of a hf: / builtin: model (layers, hidden, ...)"},
            },
        },
        "rows": {"type": "array", "items": ROW_SCHEMA, "description": "every node, whatever --only says"},
        "summary": {
            "type": "object",
            "required": ["gemms_total", "gemms_fp8", "unknown_ops", "frac_within_sqrt2", "max_abs_log2_error"],
            "additionalProperties": False,
            "properties": {
                "gemms_total": {"type": "integer", "minimum": 0, "description": "weight GEMMs (LM head included)"},
                "gemms_fp8": {"type": "integer", "minimum": 0, "description": "GEMMs planned in static FP8"},
                "unknown_ops": {"type": "array", "items": {"type": "string"},
                                "description": "ops where the analysis lost track"},
                "frac_within_sqrt2": {**_NUMBER_OR_NULL, "minimum": 0, "maximum": 1,
                                      "description": "share of GEMM operands predicted within √2 (measured only)"},
                "max_abs_log2_error": {**_NUMBER_OR_NULL, "minimum": 0,
                                       "description": "worst |log2(predicted/measured)| over GEMM operands"},
            },
        },
        "operand_checks": {
            "type": "array",
            "description": "per GEMM operand: predicted and measured σ (empty without --measure)",
            "items": {
                "type": "object",
                "required": ["gemm", "operand", "predicted", "measured", "log2_error"],
                "additionalProperties": False,
                "properties": {
                    "gemm": {"type": "string"},
                    "operand": {"enum": ["x", "w", "grad_out"]},
                    "predicted": {"type": "number", "exclusiveMinimum": 0},
                    "measured": {"type": "number", "exclusiveMinimum": 0},
                    "log2_error": {"type": "number"},
                },
            },
        },
    },
}

_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
}


def validate_json(value, schema: dict = JSON_SCHEMA, path: str = "$") -> list[str]:
    """The ways `value` breaks `schema` (the JSON Schema subset JSON_SCHEMA uses: type, enum, const,
    properties, required, additionalProperties, items, minimum, maximum, exclusiveMinimum); [] if none."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_JSON_TYPES[t](value) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if _JSON_TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= exclusive minimum {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing key {k!r}" for k in schema.get("required", ()) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: unexpected key {k!r}" for k in value if k not in props]
        for k, sub in props.items():
            if k in value:
                errors += validate_json(value[k], sub, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate_json(item, schema["items"], f"{path}[{i}]")
    return errors


def report_document(report, target: str, options: dict) -> dict:
    """The --json document (JSON_SCHEMA): the report's rows and summary, the operand checks, the call."""
    checks = [{"gemm": c.gemm, "operand": c.operand, "predicted": c.predicted, "measured": c.measured,
               "log2_error": c.log2_error} for c in report.operand_checks]
    doc = {"schema_version": 1, "target": target, "options": options, "rows": report.rows,
           "summary": report.summary, "operand_checks": checks}
    return _finite(doc)


def _finite(value):
    """A copy with non-finite floats as null: strict JSON has no NaN / Infinity."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- targets

@dataclass
class Target:
    """A model and the example inputs to call it with."""

    model: nn.Module
    args: tuple
    kwargs: dict
    description: str
    sizes: dict = field(default_factory=dict)  # layers/hidden/heads/vocab of a hf: or builtin: model


def _token_ids(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


DEFAULT_SIZES = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 320}  # hf: and builtin: models


def _sizes(args) -> dict:
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULT_SIZES.items()}


def _builtin_gpt(args) -> Target:
    from munit_compile.models import GPT, GPTConfig

    s = _sizes(args)
    try:
        cfg = GPTConfig(vocab_size=s["vocab"], seq_len=args.seq, n_layer=s["layers"], n_head=s["heads"],
                        d_model=s["hidden"])
    except ValueError as err:
        raise UsageError(f"builtin:gpt: {err} (set --layers/--hidden/--heads/--vocab)") from None
    ids = _token_ids(args.batch, args.seq, s["vocab"], args.seed)
    desc = f"builtin:gpt ({s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, vocab {s['vocab']})"
    return Target(GPT(cfg), (ids, ids), {}, desc, s)


BUILTINS: dict[str, Callable] = {"gpt": _builtin_gpt}


def causal_lm_types() -> list[str]:
    """The model types the installed transformers can build as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


_COMMON_TYPES = ("llama", "gpt2", "mistral", "qwen2", "gemma2", "phi3")
_FFN_SIZE_KEYS = ("intermediate_size", "ffn_dim", "d_ff", "moe_intermediate_size", "shared_expert_intermediate_size")


def hf_config(model_type: str, layers: int, hidden: int, heads: int, vocab: int, seq: int):
    """A small transformers config of `model_type`: the given sizes, FFN width 2·hidden, grouped KV heads
    (heads/2), head_dim hidden/heads, room for `seq` positions, no dropout, special token ids inside the vocab."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    attribute_map = getattr(type(default), "attribute_map", {})
    wanted = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "vocab_size": vocab}
    if hasattr(default, "max_position_embeddings"):
        wanted["max_position_embeddings"] = max(128, seq)
    if getattr(default, "num_key_value_heads", None) is not None:
        wanted["num_key_value_heads"] = heads // 2 if heads % 2 == 0 else heads
    if getattr(default, "head_dim", None) is not None:
        wanted["head_dim"] = hidden // heads
    for key in _FFN_SIZE_KEYS:
        if isinstance(getattr(default, key, None), int):
            wanted[key] = 2 * hidden
    for key, value in vars(default).items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            wanted[key] = 0.0
        if key.endswith("_token_id") and isinstance(value, int) and value >= vocab:
            wanted[key] = 0
    # a derived attribute (a property such as Falcon's head_dim) follows from the others: leave it out
    kwargs = {attribute_map.get(k, k): v for k, v in wanted.items()
              if not isinstance(getattr(type(default), attribute_map.get(k, k), None), property)}
    return AutoConfig.for_model(model_type, **kwargs)


def _hf(model_type: str, args) -> Target:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("hf: targets need transformers: pip install transformers") from None
    types = causal_lm_types()
    if model_type not in types:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        close = difflib.get_close_matches(model_type, types, n=4)
        examples = ", ".join(dict.fromkeys([*close, *(t for t in _COMMON_TYPES if t in types)]))
        what = "has no causal LM for" if model_type in CONFIG_MAPPING_NAMES else "knows no model type"
        raise UsageError(
            f"hf:{model_type}: transformers {transformers.__version__} {what} {model_type!r}; try one of: "
            f"{examples} ({len(types)} causal LM types in all: munit_compile.inspect_cli.causal_lm_types())"
        )
    s = _sizes(args)
    if s["hidden"] % s["heads"]:
        raise UsageError(f"--hidden {s['hidden']} must be a multiple of --heads {s['heads']}")
    from transformers import AutoModelForCausalLM

    try:
        cfg = hf_config(model_type, s["layers"], s["hidden"], s["heads"], s["vocab"], args.seq)
        model = AutoModelForCausalLM.from_config(cfg)
    except Exception as err:  # transformers validates configs with many error types
        first = " ".join(str(err).split())[:300] or type(err).__name__
        raise UsageError(
            f"transformers could not build hf:{model_type} with {s['layers']} layers, hidden {s['hidden']}, "
            f"{s['heads']} heads, vocab {s['vocab']}: {first} (try other --layers/--hidden/--heads, or a "
            f"module:factory target with a config you write)"
        ) from None
    model.loss_type = "ForCausalLM"
    ids = _token_ids(args.batch, args.seq, s["vocab"], args.seed)
    desc = (f"hf:{model_type} {type(model).__name__} ({s['layers']} layers, hidden {s['hidden']}, "
            f"{s['heads']} heads, vocab {s['vocab']})")
    return Target(model, (), {"input_ids": ids, "labels": ids, "use_cache": False}, desc, s)


def _load_factory(spec: str) -> Callable:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"target {spec!r}: expected package.module:factory, path/file.py:factory, "
                         f"hf:<model_type> or builtin:{'|'.join(BUILTINS)}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"target {spec!r}: file {where!r} not found")
        if str(path.resolve().parent) not in sys.path:  # its sibling modules import as they would under python FILE
            sys.path.insert(0, str(path.resolve().parent))
        mod_name = f"_munit_target_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(mod_name, None)
            raise UsageError(f"target {spec!r}: running {where} failed: {type(err).__name__}: {err}") from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` would: modules of this folder
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            missing = err.name or where
            hint = "check the spelling, install it, or run from the folder that holds it" if missing == where.split(".")[0] \
                or where.startswith(missing) else f"it imports {missing!r}, which is not installed"
            raise UsageError(f"target {spec!r}: cannot import module {where!r}: no module named {missing!r} ({hint})") from None
        except Exception as err:
            raise UsageError(f"target {spec!r}: importing module {where!r} failed: {type(err).__name__}: {err}") from None
    factory = getattr(module, name, None)
    if factory is None:
        candidates = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                            and getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"target {spec!r}: {where!r} has no {name!r}; callables defined there: "
                         f"{', '.join(candidates) or 'none'}")
    if not callable(factory):
        raise UsageError(f"target {spec!r}: {name!r} is a {type(factory).__name__}, not a callable returning a model")
    return factory


def _factory(spec: str, args) -> Target:
    factory = _load_factory(spec)
    for flag in ("layers", "hidden", "heads"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} applies to hf: and builtin: targets; {spec!r} builds its own model")
    result = factory()
    inputs = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, inputs = result
    if not isinstance(result, nn.Module):
        raise UsageError(f"target {spec!r}: the factory returned a {type(result).__name__}; it must return an "
                         f"nn.Module or a (model, example_inputs) pair")
    if inputs is None:
        return _default_inputs(result, spec, args)
    if isinstance(inputs, dict):
        return Target(result, (), dict(inputs), spec)
    if isinstance(inputs, torch.Tensor):
        return Target(result, (inputs,), {}, spec)
    if isinstance(inputs, (tuple, list)):
        return Target(result, tuple(inputs), {}, spec)
    raise UsageError(f"target {spec!r}: example_inputs must be a tuple, a dict or a tensor, got {type(inputs).__name__}")


def _default_inputs(model: nn.Module, spec: str, args) -> Target:
    """Token ids [batch, seq] for a model the factory returned alone (module docstring)."""
    vocab = args.vocab or getattr(getattr(model, "config", None), "vocab_size", None) or next(
        (m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if vocab is None:
        raise UsageError(f"target {spec!r}: cannot tell the vocabulary size for token-id inputs; pass --vocab, "
                         f"or return (model, example_inputs) from the factory")
    ids = _token_ids(args.batch, args.seq, vocab, args.seed)
    transformers = sys.modules.get("transformers")  # imported by any factory that built a transformers model
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        model.loss_type = "ForCausalLM"
        return Target(model, (), {"input_ids": ids, "labels": ids, "use_cache": False}, spec)
    params = [p for p in pyinspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return Target(model, (ids, ids) if len(params) >= 2 else (ids,), {}, spec)


def load_target(args) -> Target:
    """The model and example inputs TARGET names (UsageError when it names nothing buildable)."""
    spec = args.target
    if spec.startswith("hf:"):
        return _hf(spec[3:], args)
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        if name not in BUILTINS:
            raise UsageError(f"unknown built-in model {name!r}; choose from {', '.join(f'builtin:{b}' for b in BUILTINS)}")
        return BUILTINS[name](args)
    return _factory(spec, args)


# ---------------------------------------------------------------- the table

GEMM_OPS = ("aten.linear.default", "aten.addmm.default")


def is_gemm_row(row: dict, gemm_names: set[str] = frozenset()) -> bool:
    """A weight GEMM: planned in FP8, kept in high precision, or a linear the analysis lost track of."""
    return (row["fp8"] is not None or row["status"] == "high_precision" or row["name"] in gemm_names
            or (row["status"] == "unknown" and row["op"] in GEMM_OPS))


def _short_op(op: str) -> str:
    return op.removeprefix("aten.").removesuffix(".default")


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _log2_err(pred, meas) -> str:
    if not pred or not meas or pred <= 0 or meas <= 0:
        return "-"
    return f"{math.log2(pred / meas):+.2f}"


def _pow2(s: float) -> str:
    e = math.log2(s)
    return "1" if e == 0 else f"2^{int(e)}" if e == int(e) else f"{s:.3g}"


def render_table(report, only: str, console, title: str) -> None:
    """The rich table of the report's rows (GEMMs only unless only == "all") and its summary line."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    gemm_names = {c.gemm for c in report.operand_checks}
    rows = [r for r in report.rows if only == "all" or is_gemm_row(r, gemm_names)]
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", title_justify="left", pad_edge=False)
    for header, justify in (("node", "left"), ("op", "left"), ("shape", "left"), ("pred σ", "right"),
                            ("pred σ∇", "right"), ("meas σ", "right"), ("meas σ∇", "right"),
                            ("log2 err σ/σ∇", "right"), ("FP8 x/w/∇", "left"), ("scales x/w/∇", "left"),
                            ("fused", "left"), ("status: reason", "left")):
        table.add_column(header, justify=justify, overflow="fold")
    style = {"ok": "", "high_precision": "yellow", "unknown": "red"}
    for r in rows:
        fp8 = r["fp8"]
        formats = "/".join(fp8[k].upper() for k in ("x_format", "w_format", "grad_format")) if fp8 else "-"
        scales = "/".join(_pow2(fp8[k]) for k in ("x_scale", "w_scale", "grad_scale")) if fp8 else "-"
        err = f"{_log2_err(r['pred_std'], r['meas_std'])} {_log2_err(r['pred_grad_std'], r['meas_grad_std'])}"
        reason = r["reason"].replace("below the smallest normal after scaling:", "underflow after scaling:")
        status = r["status"] + (f": {reason}" if reason else "")
        cells = (r["name"], _short_op(r["op"]), "×".join(map(str, r["shape"])), _num(r["pred_std"]),
                 _num(r["pred_grad_std"]), _num(r["meas_std"]), _num(r["meas_grad_std"]),
                 err if r["meas_std"] is not None else "-", formats, scales, r["fused_kernel"] or "-", status)
        table.add_row(*(Text(c) for c in cells), style=style[r["status"]])
    console.print(table)
    console.print(summary_line(report), highlight=False)


def summary_line(report) -> str:
    s = report.summary
    unknown = ", ".join(s["unknown_ops"]) if s["unknown_ops"] else "none"
    line = f"GEMMs in FP8: {s['gemms_fp8']}/{s['gemms_total']} · unknown ops: {unknown}"
    if s["max_abs_log2_error"] is None:
        return line + " · not measured (--measure compares predictions with one forward/backward)"
    (worst,) = report.worst(1)
    return (f"{line} · GEMM operands within √2: {s['frac_within_sqrt2']:.0%} of {len(report.operand_checks)} · "
            f"worst |log2 error| {s['max_abs_log2_error']:.2f} ({worst.gemm} {worst.operand})")


# ---------------------------------------------------------------- the plot

def write_plot(report, path: str, title: str) -> None:
    """One PNG: per GEMM operand, predicted (hollow) and measured (filled) σ on a log2 axis, forward (x, W)
    and backward (d output), with σ after the static scale (what is cast) and the FP8 normal ranges shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fp8 = {r["name"]: r["fp8"] for r in report.rows if r["fp8"] is not None}
    gemms = list(dict.fromkeys(c.gemm for c in report.operand_checks))
    pos = {g: i for i, g in enumerate(gemms)}
    fig = Figure(figsize=(13, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    panels = (("forward: x and W (E4M3)", (("x", "tab:blue", "x_scale"), ("w", "tab:orange", "w_scale")),
               E4M3_NORMAL, "E4M3 normal range"),
              ("backward: d output (E5M2)", (("grad_out", "tab:green", "grad_scale"),), E5M2_NORMAL, "E5M2 normal range"))
    axes = fig.subplots(1, 2, sharey=False)
    for ax, (name, operands, band, band_label) in zip(axes, panels):
        ax.axhspan(*band, color="tab:green", alpha=0.08, zorder=0, label=band_label)
        for edge in band:
            ax.axhline(edge, color="tab:green", lw=0.8, ls="--", zorder=1)
        values = []
        for k, (operand, color, scale_key) in enumerate(operands):
            offset = (k - (len(operands) - 1) / 2) * 0.2
            checks = [c for c in report.operand_checks if c.operand == operand]
            xs = [pos[c.gemm] + offset for c in checks]
            ax.scatter(xs, [c.predicted for c in checks], s=40, facecolors="none", edgecolors=color,
                       label=f"{operand} predicted", zorder=3)
            ax.scatter(xs, [c.measured for c in checks], s=12, color=color, label=f"{operand} measured", zorder=4)
            scaled = [(pos[c.gemm] + offset, c.measured * fp8[c.gemm][scale_key]) for c in checks if c.gemm in fp8]
            if scaled:
                ax.scatter(*zip(*scaled), s=30, marker="_", color=color, label=f"{operand} measured × static scale",
                           zorder=4)
            values += [c.predicted for c in checks] + [c.measured for c in checks] + [v for _, v in scaled]
        ax.set_yscale("log", base=2)
        if values:
            lo, hi = min(values), max(values)
            ax.set_ylim(min(lo, band[0]) / 4, max(hi * 4, min(band[1], hi * 2**8)))
        ax.set_title(name)
        ax.set_ylabel("σ (log2 axis)")
        ax.set_xticks(range(len(gemms)))
        labels = [g + ("" if g in fp8 else " (hp)") for g in gemms]
        ax.set_xticklabels(labels if len(gemms) <= 40 else [""] * len(gemms), rotation=90, fontsize=7)
        ax.set_xlabel("GEMM (graph order; hp = kept in high precision)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png")


# ---------------------------------------------------------------- the MLIR export

def require_torch_mlir() -> None:
    """UsageError with the install line when the optional extra is missing (the thin guard)."""
    try:
        import torch_mlir.extras.fx_importer  # noqa: F401
    except ImportError:
        raise UsageError(f"--mlir needs torch-mlir, which is not installed: {MLIR_INSTALL_HINT}") from None


def _munit_decompositions() -> dict:
    """munit's custom ops as their exact references, so the export shows the FP8 casts themselves."""
    import munit_compile.ops  # noqa: F401  (registers the ops)
    from munit_compile.codegen import reference

    def fp8_linear(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha=1.0):
        return reference.fp8_linear(x, w, bias, x_scale, w_scale, fwd_format, alpha)

    return {
        torch.ops.munit.fp8_linear.default: fp8_linear,
        torch.ops.munit.fp8_gemm.default: reference.fp8_gemm,
        torch.ops.munit.grad_scale.default: lambda x, scale: x.clone(),
    }


def _joint_graph(planned, inputs, decompositions):
    """The planned graph's forward and backward as one ATen graph: (inputs[, d outputs]) -> (outputs, d params).

    The backward starts from the graph's scalar loss; a graph without one takes its outputs' gradients
    as extra inputs. Parameters (the graph's nn.Parameter inputs) are what it differentiates."""
    from torch.fx.experimental.proxy_tensor import make_fx

    values = [x.detach().requires_grad_(isinstance(x, nn.Parameter)) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    params = [i for i, x in enumerate(inputs) if isinstance(x, nn.Parameter)]
    output = next(n for n in planned.graph.nodes if n.op == "output")
    vals = [n.meta.get("val") for n in output.all_input_nodes]
    floats = [v for v in vals if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]
    has_loss = any(v.numel() == 1 for v in floats)
    seeds = [] if has_loss else [torch.ones(v.shape, dtype=v.dtype) for v in floats]

    def forward_backward(*flat):
        args, d_outs = list(flat[:len(values)]), list(flat[len(values):])
        outputs = planned(*args)
        outputs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs]) if isinstance(o, torch.Tensor)]
        float_outs = [o for o in outputs if o.dtype.is_floating_point]
        if has_loss:
            pairs = [(next(o for o in float_outs if o.numel() == 1), None)]
        else:
            pairs = list(zip(float_outs, d_outs))
        pairs = [(r, s) for r, s in pairs if r.requires_grad]
        grads = torch.autograd.grad([r for r, _ in pairs], [args[i] for i in params],
                                    None if has_loss else [s for _, s in pairs], allow_unused=True) \
            if pairs and params else ()
        return (*outputs, *[g for g in grads if g is not None])

    with torch.enable_grad():
        return make_fx(forward_backward, decomposition_table=decompositions, tracing_mode="fake")(*values, *seeds)


def write_mlir(target: Target, path: str, progress: "Progress") -> dict[str, int]:
    """Capture and plan `target` as the backend does, trace each planned graph's forward and backward into
    ATen (munit ops expanded), import it with torch-mlir into the torch dialect, and write it to `path`.
    Returns how many casts to each FP8 element type the module holds."""
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras.fx_importer import FxImporter

    from munit_compile.config import Config
    from munit_compile.pipeline import run_pipeline

    graphs = []

    def capture(gm, inputs):
        graphs.append((gm, inputs))
        return gm.forward

    with progress.step("export: capturing and planning the graph again for torch-mlir"):
        torch._dynamo.reset()
        torch.compile(target.model, backend=capture, dynamic=False)(*target.args, **target.kwargs)
        planned = [(run_pipeline(gm, inputs, Config())[0], inputs) for gm, inputs in graphs]
    with progress.step("export: tracing forward and backward, importing into the torch dialect"):
        context = ir.Context()
        torch_d.register_dialect(context)
        importer = FxImporter(context=context)
        decompositions = _munit_decompositions()
        for i, (gm, inputs) in enumerate(planned):
            joint = _joint_graph(gm, inputs, decompositions)
            importer.import_graph_module(joint, func_name="forward_backward" if len(planned) == 1
                                         else f"forward_backward_{i}")
        importer.module.operation.verify()
        text = str(importer.module)
    counts = {t: len(re.findall(rf"-> !torch\.vtensor<\[[^\]]*\],{t}>", text)) for t in ("f8E4M3FN", "f8E5M2")}
    header = (f"// munit inspect {target.description}: the planned graph{'s' if len(planned) > 1 else ''}, forward "
              f"and backward, in torch-mlir's torch dialect.\n// munit::fp8_linear / fp8_gemm are expanded into "
              f"their saturating casts: f8E4M3FN for x and W, f8E5M2 for output gradients.\n")
    Path(path).write_text(header + text)
    return counts


# ---------------------------------------------------------------- the command

class Progress:
    """Progress lines on stderr: a spinner on a terminal, plain lines otherwise; silent with --quiet."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)

    @contextmanager
    def step(self, what: str):
        if self.quiet:
            yield
            return
        start = time.perf_counter()
        if self.console.is_terminal:
            with self.console.status(what + " …"):
                yield
        else:
            print(f"{PROG}: {what} …", file=sys.stderr, flush=True)
            yield
        self.console.print(f"{PROG}: {what}: done in {time.perf_counter() - start:.1f} s")

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"{PROG}: {text}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would sys.exit(2); main turns this into the exit code
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].strip("`"),
                epilog="TARGET forms, outputs and exit codes: python -c 'import munit_compile.inspect_cli as m; "
                       "help(m)'. Example: munit inspect hf:llama --measure --json r.json --plot r.png")
    p.add_argument("target", metavar="TARGET",
                   help="hf:<model_type> (llama, gpt2, mistral, qwen2, ...), builtin:gpt, package.module:factory "
                        "or path/file.py:factory (a callable returning a model or (model, example_inputs))")
    p.add_argument("--batch", type=int, default=4, help="example batch size (default 4)")
    p.add_argument("--seq", type=int, default=32, help="example sequence length (default 32)")
    p.add_argument("--layers", type=int, help="hf:/builtin: layers (default 2)")
    p.add_argument("--hidden", type=int, help="hf:/builtin: hidden size (default 64)")
    p.add_argument("--heads", type=int, help="hf:/builtin: attention heads (default 4; KV heads heads/2)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default 320; a factory's model: its embedding's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the token ids (default 0)")
    p.add_argument("--measure", action="store_true", help="run one forward/backward; measured σ next to predicted")
    p.add_argument("--unit-scale", action="store_true", help="inspect munit.unit_scale(model) (μS): FP8 scales 1")
    p.add_argument("--only", choices=("gemms", "all"), default="gemms", help="table rows (default gemms)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (every row; schema in the module)")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG of predicted vs measured σ per GEMM operand "
                                                      "with the FP8 ranges (implies --measure)")
    p.add_argument("--mlir", metavar="FILE", help=f"export the planned graph (forward+backward) in torch-mlir's "
                                                  f"torch dialect ({MLIR_INSTALL_HINT})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--traceback", action="store_true", help="print the full traceback when the analysis fails")
    return p


def validate_args(args) -> None:
    """UsageError for values no run can use, before anything is built."""
    for flag in ("batch", "seq", "layers", "hidden", "heads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be a positive integer, got {value}")
    if args.vocab is not None and args.vocab < 2:
        raise UsageError(f"--vocab must be at least 2, got {args.vocab}")
    for flag in ("json", "plot", "mlir"):
        path = getattr(args, flag)
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"--{flag} {path}: folder {str(Path(path).resolve().parent)!r} does not exist")
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise UsageError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(f"--plot needs matplotlib: {PLOT_INSTALL_HINT}") from None
    if args.mlir is not None:
        require_torch_mlir()


def run(args) -> int:
    """Build, analyse and report (after validate_args); UsageError for a bad target, other errors propagate."""
    import munit_compile as munit

    progress = Progress(args.quiet)
    measure = args.measure or args.plot is not None
    if args.plot is not None and not args.measure:
        progress.note("--plot compares predicted with measured σ: measuring one forward/backward")
    torch.manual_seed(args.seed)
    with progress.step(f"building {args.target}"):
        target = load_target(args)
    progress.note(target.description)
    if args.unit_scale:
        with progress.step("unit scaling (munit.unit_scale: μS parametrization)"):
            target.model = munit.unit_scale(target.model, target.args, target.kwargs)
    what = "capturing the graph, analysing" + (" and measuring one forward/backward" if measure else "")
    with progress.step(what):
        torch._dynamo.reset()  # a fresh capture even if this process inspected a model of the same class
        report = munit.inspect(target.model, *target.args, measure=measure, **target.kwargs)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 250, highlight=False, markup=False, emoji=False)
    title = f"munit inspect {target.description}" + (" after unit_scale" if args.unit_scale else "")
    render_table(report, args.only, console, title)
    if args.json is not None:
        options = {"batch": args.batch, "seq": args.seq, "measure": measure, "unit_scale": args.unit_scale}
        if target.sizes:
            options["model"] = target.sizes
        doc = report_document(report, args.target, options)
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False))
        progress.note(f"wrote {args.json} (schema: munit_compile.inspect_cli.JSON_SCHEMA)")
    if args.plot is not None:
        with progress.step(f"plotting {args.plot}"):
            write_plot(report, args.plot, title)
    if args.mlir is not None:
        counts = write_mlir(target, args.mlir, progress)
        progress.note(f"wrote {args.mlir}: {counts['f8E4M3FN']} casts to f8E4M3FN, {counts['f8E5M2']} to f8E5M2")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`munit inspect ...`: 0 ok, 2 bad arguments or target, 1 the analysis failed."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        validate_args(args)
        return run(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # the model, the capture or the analysis failed
        if args.traceback:
            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{PROG}: failed: {type(err).__name__}: {first}" +
              ("" if args.traceback else " (--traceback shows where)"), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
