"""End-to-end training steps through `backend="munit"`: FP8 where planned, same numbers as an
independent simulated-FP8 eager model, FP8-close to fp32, embedding and LM head left alone."""
from __future__ import annotations

import copy
import importlib
import logging

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import munit_compile as munit
from small_models import VOCAB, MLP, CumsumThenLinear, PreLNBlock, builtin_gpt, gpt2, hidden_gemm_modules, llama
from simulated_fp8 import patch_linear_modules

FAST = munit.Config(inner_compiler="aot_eager", strict=True)


def _float_input():
    return torch.randn(4, 16, 64)


def _token_input():
    return torch.randint(0, VOCAB, (2, 32))


def _mse_step(model, x):
    y = model(x)
    return ((y - 1.0) ** 2).mean()


def _lm_step(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _builtin_gpt_step(model, ids):
    return model(ids, ids)[1]


CASES = {
    "mlp": (MLP, _float_input, _mse_step),
    "preln_block": (PreLNBlock, _float_input, _mse_step),
    "llama": (llama, _token_input, _lm_step),
    "gpt2": (gpt2, _token_input, _lm_step),
    "builtin_gpt": (builtin_gpt, _token_input, _builtin_gpt_step),
}


def train_step(model, step, inputs):
    model.zero_grad(set_to_none=True)
    loss = step(model, inputs)
    loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in params if p.grad is not None}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def execution_order(model, modules, step, inputs):
    """The given modules in the order one forward pass calls them."""
    order, handles = [], [m.register_forward_pre_hook(lambda m, _: order.append(m)) for m in modules]
    with torch.no_grad():
        step(model, inputs)
    for h in handles:
        h.remove()
    seen = []
    for m in order:
        if m not in seen:
            seen.append(m)
    return seen


def count_munit_ops(model, step, inputs, vocab):
    """(fp8_linear and fp8_linear_q calls, fp8_gemm calls) in one training step; asserts none touches the
    vocabulary dim."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(model, step, inputs)
    counts = {"munit::fp8_linear": 0, "munit::fp8_linear_q": 0, "munit::fp8_gemm": 0}
    for event in prof.events():
        if event.name in counts:
            counts[event.name] += 1
            if event.name != "munit::fp8_gemm":
                n, k = event.input_shapes[1]
                assert vocab not in (n, k), f"an FP8 GEMM touches the vocabulary: {event.input_shapes}"
    return counts["munit::fp8_linear"] + counts["munit::fp8_linear_q"], counts["munit::fp8_gemm"]


@pytest.fixture(scope="module", params=list(CASES))
def compiled_case(request):
    """One compiled model per case, with its eager twins, inputs and the backend's report."""
    make, make_input, step = CASES[request.param]
    torch.manual_seed(0)
    model = make()
    inputs = make_input()
    be = munit.backend(FAST)
    compiled = torch.compile(copy.deepcopy(model), backend=be)
    loss, grads = train_step(compiled, step, inputs)
    return dict(name=request.param, model=model, compiled=compiled, backend=be, step=step,
                inputs=inputs, loss=loss, grads=grads)


def test_every_hidden_gemm_is_planned_in_fp8(compiled_case):
    model, be = compiled_case["model"], compiled_case["backend"]
    assert len(be.reports) == 1, "expected one graph (no graph breaks)"
    decisions = be.reports[0].gemms
    hidden = hidden_gemm_modules(model)
    assert sum(d.fp8 for d in decisions) == len(hidden)
    for d in decisions:
        if not d.fp8:
            assert "LM head" in d.reason, d
    for d in (d for d in decisions if d.fp8):
        assert (d.x_format, d.w_format, d.grad_format) == ("e4m3", "e4m3", "e5m2")


def test_fp8_ops_run_and_count(compiled_case):
    c = compiled_case
    hidden = len(hidden_gemm_modules(c["model"]))
    linear_calls, gemm_calls = count_munit_ops(c["compiled"], c["step"], c["inputs"], VOCAB)
    assert linear_calls == hidden
    # each layer's backward: dW always, dx unless x needs no grad (the MLP's first layer sees raw data)
    assert hidden * 2 - 1 <= gemm_calls <= hidden * 2


def test_matches_independent_simulated_fp8(compiled_case):
    c = compiled_case
    reference = copy.deepcopy(c["model"])
    modules = execution_order(reference, hidden_gemm_modules(reference), c["step"], c["inputs"])
    scales = [(d.x_scale, d.w_scale, d.grad_scale) for d in c["backend"].reports[0].gemms if d.fp8]
    patch_linear_modules(modules, scales)
    loss, grads = train_step(reference, c["step"], c["inputs"])
    assert abs(c["loss"].item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert grads.keys() == c["grads"].keys()
    worst = max(rel_err(c["grads"][n], grads[n]) for n in grads)
    assert worst < 1e-6, f"worst relative grad error vs simulated FP8: {worst:.2e}"


def test_within_fp8_tolerance_of_fp32(compiled_case):
    c = compiled_case
    loss, grads = train_step(copy.deepcopy(c["model"]), c["step"], c["inputs"])
    assert abs(c["loss"].item() - loss.item()) <= 2e-3 * abs(loss.item())
    errors = {n: rel_err(c["grads"][n], grads[n]) for n in grads}
    # E4M3 (3 mantissa bits) operands and E5M2 (2 bits) gradients: per-element error ≤ 2^-4 / 2^-3,
    # averaged over the contraction; the whole-tensor relative error stays well under 15 %.
    assert max(errors.values()) < 0.15, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert min(errors.values()) < 0.05


def test_backend_is_registered():
    assert "munit" in torch._dynamo.list_backends()


@pytest.mark.slow
def test_default_backend_string_with_inductor():
    torch.manual_seed(0)
    model = PreLNBlock()
    x = _float_input()
    eager_loss, eager_grads = train_step(copy.deepcopy(model), _mse_step, x)
    compiled = torch.compile(copy.deepcopy(model), backend="munit")
    loss, grads = train_step(compiled, _mse_step, x)
    assert abs(loss.item() - eager_loss.item()) <= 0.02 * abs(eager_loss.item())
    linear_calls, _ = count_munit_ops(compiled, _mse_step, x, VOCAB)
    assert linear_calls == 4
    assert max(rel_err(grads[n], eager_grads[n]) for n in grads) < 0.15


class TinyHead(nn.Module):
    """No FP8-eligible GEMM: 10 -> 7 is not a multiple of 16."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 7)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def test_model_without_eligible_gemm_runs_unchanged_and_says_why(caplog):
    model, x = TinyHead(), torch.randn(8, 10)
    be = munit.backend(FAST)
    with caplog.at_level(logging.WARNING, logger="munit_compile"):
        out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x))
    (decision,) = be.reports[0].gemms
    assert not decision.fp8 and "K=10" in decision.reason and "multiples of 16" in decision.reason
    assert any("nothing converted to FP8" in r.getMessage() and "K=10" in r.getMessage() for r in caplog.records)


def test_unknown_op_keeps_dependent_gemm_high_precision(caplog):
    model, x = CumsumThenLinear(), torch.randn(8, 32)
    be = munit.backend(FAST)
    with caplog.at_level(logging.WARNING, logger="munit_compile"):
        out = torch.compile(model, backend=be)(x)
    fc1, fc2 = be.reports[0].gemms
    assert not fc2.fp8 and "aten.cumsum" in fc2.reason
    # fc1's output gradient flows back through cumsum, whose gradient rule is unknown too
    assert not fc1.fp8 and "aten.cumsum" in fc1.reason
    assert any("aten.cumsum" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, model(x))


def test_fp8_disabled_in_config_changes_nothing():
    model, x = MLP(), _float_input()
    be = munit.backend(munit.Config(fp8=False, inner_compiler="aot_eager"))
    out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x))
    assert all(not d.fp8 and "fp8=False" in d.reason for d in be.reports[0].gemms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_models_keep_their_dtype_and_match_simulated_fp8(dtype):
    model, x = MLP().to(dtype), _float_input().to(dtype)
    # the simulated model rounds the GEMM output before its GELU: compare with the unfused graph (the
    # fused one rounds once; tests/test_fuse.py bounds that difference)
    be = munit.backend(FAST.replace(fuse=False))
    compiled = torch.compile(copy.deepcopy(model), backend=be)
    out = compiled(x)
    assert out.dtype == dtype
    loss, grads = train_step(compiled, _mse_step, x)
    assert all(g.dtype == dtype for g in grads.values())
    reference = copy.deepcopy(model)
    patch_linear_modules(
        execution_order(reference, hidden_gemm_modules(reference), _mse_step, x),
        [(d.x_scale, d.w_scale, d.grad_scale) for d in be.reports[0].gemms if d.fp8],
    )
    ref_loss, ref_grads = train_step(reference, _mse_step, x)
    # Both round each GEMM's output once to `dtype`; they may differ by one ulp of `dtype` there.
    tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}[dtype]
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) < tol


@pytest.mark.parametrize("case", ["builtin_gpt", "llama"])
def test_dynamic_shapes_compile_plan_and_train(case, caplog):
    make, _, step = CASES[case]
    model = make()
    be = munit.backend(FAST)
    compiled = torch.compile(copy.deepcopy(model), backend=be, dynamic=True)
    with caplog.at_level(logging.WARNING, logger="munit_compile"):
        for seq in (16, 24):
            ids = torch.randint(0, VOCAB, (2, seq))
            loss, _ = train_step(compiled, step, ids)
            ref_loss, _ = train_step(copy.deepcopy(model), step, ids)
            assert abs(loss.item() - ref_loss.item()) <= 2e-3 * ref_loss.item()
    report = be.reports[-1]
    assert report.gemms_fp8 == len(hidden_gemm_modules(model)) and not report.unknown_ops
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_failing_pass_falls_back_to_high_precision_unless_strict(monkeypatch, caplog):
    import munit_compile.pipeline as pipeline

    def broken(state):
        raise RuntimeError("boom in variance")

    monkeypatch.setattr(pipeline, "PIPELINE", tuple(
        pipeline.Pass(p.name, broken if p.name == "variance" else p.run) for p in pipeline.PIPELINE
    ))
    model, x = MLP(), _float_input()
    be = munit.backend(munit.Config(inner_compiler="aot_eager"))
    with caplog.at_level(logging.WARNING, logger="munit_compile"):
        out = torch.compile(copy.deepcopy(model), backend=be)(x)
    torch.testing.assert_close(out, model(x))
    assert be.reports[0].failure == "RuntimeError: boom in variance" and not be.reports[0].gemms
    assert any("boom in variance" in r.getMessage() and "high precision" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match="boom in variance"):
        torch.compile(copy.deepcopy(model), backend=munit.backend(FAST))(x)


def test_inductor_cache_key_names_the_munit_op_schemas(monkeypatch):
    """Inductor's graph cache keys on the graph's code, not on custom op schemas: the backend adds a hash of
    every munit:: schema to the key, so a graph cached before an op gained an argument is not reused."""
    backend_module = importlib.import_module("munit_compile.backend")  # munit_compile.backend is also a function
    seen = []
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx",
                        lambda gm, inputs: seen.append(torch.compiler.config.cache_key_tag) or gm.forward)
    backend_module._inductor(torch.fx.symbolic_trace(nn.Linear(4, 4)), [torch.randn(2, 4)])
    tag = backend_module.munit_ops_tag()
    assert seen == [tag] and torch.compiler.config.cache_key_tag == ""
    schemas = [str(getattr(torch.ops.munit, n).default._schema) for n in backend_module.MUNIT_OPS]
    assert all("munit::" in s for s in schemas) and len(tag) == len("munit-") + 16
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("munit::")}
    assert registered == set(backend_module.MUNIT_OPS)  # a new op must join the tag
