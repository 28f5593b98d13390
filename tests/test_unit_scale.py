"""munit.unit_scale: the μS rewrite on the built-in GPT, transformers Llama and GPT-2 (Conv1D).

Checked against measurement (one forward/backward through the rewritten graph), against the model's
own eager run, and against torch.compile with the munit backend.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import munit_compile as munit
from munit_compile.config import Config
from munit_compile.unit_scale.analysis import find_gemms, find_residuals, mark_parameters
from munit_compile.unit_scale.config import default_tau
from small_models import VOCAB, builtin_gpt, gpt2, llama

MODELS = {"builtin_gpt": builtin_gpt, "llama": llama, "gpt2": gpt2}


def call_args(name: str, ids: torch.Tensor):
    if name == "builtin_gpt":
        return (ids, ids), {}
    return (), {"input_ids": ids, "labels": ids, "use_cache": False}


def loss_of(out):
    return out[1] if isinstance(out, tuple) else out.loss


@pytest.fixture(scope="module", params=list(MODELS))
def scaled(request):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 32))
    args, kwargs = call_args(request.param, ids)
    model = munit.unit_scale(MODELS[request.param](), args, kwargs)
    return request.param, model, args, kwargs


def test_weights_are_unit_and_predictions_match_measurement(scaled):
    name, model, args, kwargs = scaled
    for pname, p in model.named_parameters():
        role = model.munit_roles[pname]
        if role in ("hidden", "embedding", "head"):
            assert p.std().item() == pytest.approx(1.0, abs=0.1), (pname, role)
        if role == "bias":
            assert p.abs().max().item() == 0.0, pname
    report = munit.inspect(model, *args, measure=True, **kwargs)
    hidden = [r for r in report.rows if r["name"] in model.munit_rewrite["gemms"]
              and model.munit_rewrite["gemms"][r["name"]] == "hidden"]
    assert hidden and report.summary["gemms_fp8"] == len(hidden), report.summary
    assert report.summary["unknown_ops"] == []
    assert report.summary["frac_within_sqrt2"] >= 0.95, report.worst(5)  # GPT-2: one q/k/v grad at 0.74 log2
    for row in hidden:  # static scale 1 everywhere: no extra scaling
        assert (row["fp8"]["x_scale"], row["fp8"]["w_scale"], row["fp8"]["grad_scale"]) == (1.0, 1.0, 1.0), row
    checks = [c for c in report.operand_checks if model.munit_rewrite["gemms"].get(c.gemm) == "hidden"]
    assert len(checks) == 3 * len(hidden)
    print(f"\n{name}: worst operands", [(c.gemm, c.operand, round(c.predicted, 3), round(c.measured, 3)) for c in report.worst(3)])
    for c in checks:  # x, W and grad_out of every FP8 GEMM, predicted and measured
        assert 0.5 <= c.predicted <= 2.0 and 0.5 <= c.measured <= 2.0, c


def test_eager_and_compiled_agree_and_train(scaled):
    name, model, args, kwargs = scaled
    eager = loss_of(model(*args, **kwargs))
    assert math.isfinite(eager.item())
    for fp8, tolerance in ((False, 1e-5), (True, 2e-2)):
        torch._dynamo.reset()
        backend = munit.backend(Config(fp8=fp8, inner_compiler="aot_eager", strict=True))
        compiled = torch.compile(model, backend=backend)
        loss = loss_of(compiled(*args, **kwargs))
        assert loss.item() == pytest.approx(eager.item(), rel=tolerance), (fp8, loss.item(), eager.item())
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        model.zero_grad()
        if fp8:
            fp8_gemms = sum(d.fp8 for r in backend.reports for d in r.gemms)
            hidden = sum(role == "hidden" for role in model.munit_rewrite["gemms"].values())
            assert fp8_gemms == hidden


def test_state_dict_round_trip_and_modes(scaled):
    name, model, args, kwargs = scaled
    before = loss_of(model(*args, **kwargs)).item()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert loss_of(model(*args, **kwargs)).item() != pytest.approx(before)
    model.load_state_dict(state)
    assert loss_of(model(*args, **kwargs)).item() == pytest.approx(before, rel=1e-6)
    model.eval()
    assert loss_of(model(*args, **kwargs)).item() == pytest.approx(before, rel=1e-6)  # no dropout here
    model.train()


def test_dtype_change_recaptures():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16))
    model = munit.unit_scale(builtin_gpt(), (ids, ids))
    reference = loss_of(model(ids, ids)).double()
    model.to(torch.bfloat16)
    loss = loss_of(model(ids, ids))
    assert loss.dtype == torch.bfloat16 or loss.dtype == torch.float32
    assert loss.double().item() == pytest.approx(reference.item(), rel=0.05)


def test_residuals_found_by_dependency_and_tau_rule():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16))
    model = munit.unit_scale(builtin_gpt(), (ids, ids))
    assert model.munit_rewrite["residuals"] == 4 and model.munit_rewrite["norms_moved"] == 4
    assert model.munit_rewrite["tau"] == default_tau(2) == 0.5
    assert default_tau(4) == pytest.approx(0.4) and default_tau(32) == pytest.approx(0.05)

    class GeluByHandThenLinear(nn.Module):  # x + c·x³ is an add of x and something computed from x
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x + 0.044715 * x**3) + x

    gm = torch.fx.GraphModule(*_exported(GeluByHandThenLinear(), torch.randn(4, 16)))
    mark_parameters(gm)
    residuals = find_residuals(gm, find_gemms(gm))
    assert len(residuals) == 1 and residuals[0].leading_norm is None  # only `fc(…) + x`; no norm to move


def test_inverse_head_dim_attention_and_pre_norm_options():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16))
    config = munit.UnitScaleConfig(attention_scale="1/d", norm_placement="pre", tau=0.3, qk_norm=True)
    model = munit.unit_scale(builtin_gpt(), (ids, ids), config=config)
    graph = next(iter(model._graphs.values()))
    sdpa = [n for n in graph.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    head_dim = 64 // 4
    assert sdpa and all(n.kwargs.get("scale") == 1 / head_dim for n in sdpa)
    norms = [n for n in graph.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    qk = [a for n in sdpa for a in n.args[:2]]
    assert all(a.target is torch.ops.aten.layer_norm.default for a in qk)  # q and k normalized
    assert len(norms) == 2 * 2 + 1 + len(qk)  # pre-norms kept (2 per layer), the final norm, q/k norms
    assert model.munit_rewrite["tau"] == 0.3 and model.munit_rewrite["norms_moved"] == 0
    report = munit.inspect(model, ids, ids)
    assert report.summary["gemms_fp8"] == 8


def _exported(model, *args):
    module = torch.export.export(model, args, strict=False).module()
    return module, module.graph


@pytest.mark.parametrize("field, value, message", [
    ("tau", 0.0, "tau"), ("tau", 1.0, "tau"), ("tau", 1.5, "tau"),
    ("norm_placement", "post", "norm_placement"), ("attention_scale", "sqrt", "attention_scale"),
    ("qk_norm", "yes", "qk_norm"), ("unit_backward", 1, "unit_backward"), ("seed", 0.5, "seed"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        munit.UnitScaleConfig(**{field: value})


def test_model_that_cannot_be_captured_gets_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(ValueError, match="one graph"):
        munit.unit_scale(DataDependent(), (torch.randn(4, 16),))
    with pytest.raises(ValueError, match="UnitScaleConfig"):
        munit.unit_scale(builtin_gpt(), (torch.zeros(1, 4, dtype=torch.long),), config={"tau": 0.5})


def test_width_equal_to_vocabulary_has_one_head():
    """d_model = vocab (byte models at d 256): the blocks' output projections stay hidden GEMMs with
    multiplier 1/√k and the hidden LR, and the logits get their gradient scale."""
    from munit_compile.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=64))
    ids = torch.randint(0, 64, (2, 16))
    scaled = munit.unit_scale(model, (ids, ids))
    scaled(ids, ids)
    roles = scaled.munit_rewrite["gemms"]
    assert sorted(roles.values()).count("head") == 1 and len(roles) == 9, roles
    assert scaled.munit_rewrite["logits_grad_scale"] is not None
    heads = [n for n, r in scaled.munit_roles.items() if r == "head"]
    assert heads == ["model.lm_head.weight"], heads


def test_unit_backward_changes_each_gradient_by_one_constant_only(scaled):
    """The backward's scales must not reweight branch against skip: with every grad_scale set to 1 (the
    true gradient), each parameter's gradient differs only by a positive constant (Adam-invariant)."""
    name, model, args, kwargs = scaled
    graph = next(iter(model._graphs.values()))

    def grads():
        model.zero_grad(set_to_none=True)
        loss_of(model(*args, **kwargs)).backward()
        return {n: p.grad.double().flatten().clone() for n, p in model.named_parameters() if p.grad is not None}

    scaled_grads = grads()
    nodes = [n for n in graph.graph.nodes if n.target is torch.ops.munit.grad_scale.default]
    constants = [n.args[1] for n in nodes]
    assert nodes and any(abs(c - 1) > 0.1 for c in constants)
    try:
        for n in nodes:
            n.args = (n.args[0], 1.0)
        graph.recompile()
        true_grads = grads()
    finally:
        for n, c in zip(nodes, constants):
            n.args = (n.args[0], c)
        graph.recompile()
        model.zero_grad(set_to_none=True)
    assert scaled_grads.keys() == true_grads.keys()
    for pname, g in scaled_grads.items():
        t = true_grads[pname]
        if t.norm() == 0:
            continue
        cosine = float(g @ t / (g.norm() * t.norm()))
        assert cosine > 1 - 1e-6, (name, pname, cosine)
