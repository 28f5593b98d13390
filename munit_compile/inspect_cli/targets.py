"""`munit inspect` targets: hf:<model_type>, builtin:gpt, package.module:factory, path/file.py:factory."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect as pyinspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from munit_compile.inspect_cli.common import UsageError


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
