"""μS parameter groups and the decoupled-decay optimizers, against independent references."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

from munit_compile.models.gpt import GPT, GPTConfig
from munit_compile.optim import AdamW, Lion, infer_roles, param_groups

SHAPES = [(7, 5), (11,), (3, 4, 2)]
STEPS = 6


# ---------------------------------------------------------------------------------------------------
# float64 references, written out from the update rules
# ---------------------------------------------------------------------------------------------------


def reference_adamw(w0, grads, lrs, betas, eps, wd):
    """Per step: w ← (1−wd)·w; then Adam with bias correction, in float64."""
    b1, b2 = betas
    w = w0.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        w = (1 - wd) * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        w = w - lr * m_hat / (v_hat.sqrt() + eps)
    return w


def reference_lion(w0, grads, lrs, betas, wd):
    """Per step: w ← (1−wd)·w − lr·sign(β1·m + (1−β1)·g); m ← β2·m + (1−β2)·g, in float64."""
    b1, b2 = betas
    w = w0.double().clone()
    m = torch.zeros_like(w)
    for g, lr in zip(grads, lrs):
        g = g.double()
        w = (1 - wd) * w - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    return w


def _params(dtype=torch.float32):
    return [nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]


def _grads(params, steps=STEPS):
    """grads[i][t]: fresh random gradient of params[i] at step t (varied scale per parameter)."""
    return [[torch.randn_like(p) * 10.0 ** (i - 1) for _ in range(steps)] for i, p in enumerate(params)]


def _run(opt, params, grads, scheduler=None):
    for t in range(len(grads[0])):
        for p, g in zip(params, grads):
            p.grad = g[t].clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


# ---------------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------------


def test_adamw_without_decay_matches_torch_adam():
    ours = _params()
    start, theirs = _clone(ours), _clone(ours)
    grads = _grads(ours)
    _run(AdamW(ours, lr=3e-2, betas=(0.9, 0.95), eps=1e-8), ours, grads)
    _run(torch.optim.Adam(theirs, lr=3e-2, betas=(0.9, 0.95), eps=1e-8), theirs, grads)
    for a, b, s in zip(ours, theirs, start):
        assert not torch.equal(a, s)  # the parameters did move
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_decay_is_decay_then_adam_not_lr_times_decay():
    lr, wd, betas, eps = 1e-2, 0.05, (0.8, 0.9), 1e-8
    ours = _params()
    start = _clone(ours)
    torch_adamw = _clone(ours)
    grads = _grads(ours)
    _run(AdamW(ours, lr=lr, betas=betas, eps=eps, weight_decay=wd), ours, grads)
    _run(torch.optim.AdamW(torch_adamw, lr=lr, betas=betas, eps=eps, weight_decay=wd), torch_adamw, grads)
    for p, w0, g, t in zip(ours, start, grads, torch_adamw):
        ref = reference_adamw(w0, g, [lr] * STEPS, betas, eps, wd)
        torch.testing.assert_close(p.double(), ref, rtol=1e-5, atol=1e-6)
        # torch.optim.AdamW decays by lr·wd per step: far less shrinkage than ours.
        assert (p.double() - t.double()).abs().max() > 100 * 1e-5 * ref.abs().max()


def test_adamw_equals_torch_adamw_with_decay_divided_by_lr_at_constant_lr():
    lr, wd = 1e-2, 1e-3
    ours = _params()
    theirs = _clone(ours)
    grads = _grads(ours)
    _run(AdamW(ours, lr=lr, weight_decay=wd), ours, grads)
    _run(torch.optim.AdamW(theirs, lr=lr, betas=(0.9, 0.95), weight_decay=wd / lr), theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Lion
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_lion_matches_reference(wd):
    lr, betas = 3e-3, (0.9, 0.99)
    ours = _params()
    start = _clone(ours)
    grads = _grads(ours)
    _run(Lion(ours, lr=lr, betas=betas, weight_decay=wd), ours, grads)
    for p, w0, g in zip(ours, start, grads):
        ref = reference_lion(w0, g, [lr] * STEPS, betas, wd)
        torch.testing.assert_close(p.double(), ref, rtol=1e-6, atol=1e-6)
        # sign updates move elements by lr per step, so several steps of drift show up
        assert (p.double() - w0.double()).abs().max() > 2 * lr


# ---------------------------------------------------------------------------------------------------
# Decay independent of the LR and its schedule
# ---------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "AdamW": lambda ps, wd: AdamW(ps, lr=1e-2, weight_decay=wd),
    "Lion": lambda ps, wd: Lion(ps, lr=1e-2, weight_decay=wd),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decay_applies_when_schedule_sets_lr_to_zero(name):
    wd = 0.03
    params = _params()
    start = _clone(params)
    opt = OPTIMIZERS[name](params, wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    assert opt.param_groups[0]["lr"] == 0.0
    _run(opt, params, _grads(params), sched)
    for p, w0 in zip(params, start):
        torch.testing.assert_close(p.double(), w0.double() * (1 - wd) ** STEPS, rtol=1e-6, atol=0)


def test_adamw_under_schedule_matches_reference_with_constant_decay():
    base_lr, wd, betas, eps = 2e-2, 0.01, (0.9, 0.95), 1e-8
    factors = [1.0, 0.5, 0.25, 2.0, 0.0, 1.5]
    params = _params()
    start = _clone(params)
    grads = _grads(params)
    opt = AdamW(params, lr=base_lr, betas=betas, eps=eps, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[min(step, STEPS - 1)])
    _run(opt, params, grads, sched)
    lrs = [base_lr * f for f in factors]
    for p, w0, g in zip(params, start, grads):
        ref = reference_adamw(w0, g, lrs, betas, eps, wd)
        torch.testing.assert_close(p.double(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Low precision, state_dict
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_low_precision_params_keep_float32_state(name, dtype):
    """A bf16/fp16 step equals the float32 step from the same value, rounded once at the end."""
    low = _params(dtype)
    shadow = [nn.Parameter(p.detach().float()) for p in low]
    opt_low, opt_f32 = OPTIMIZERS[name](low, 1e-3), OPTIMIZERS[name](shadow, 1e-3)
    grads = _grads(low)
    for t in range(STEPS):
        for p, s, g in zip(low, shadow, grads):
            p.grad, s.grad = g[t].clone(), g[t].float()
        opt_low.step()
        opt_f32.step()
        for p, s in zip(low, shadow):
            assert p.dtype == dtype
            torch.testing.assert_close(p, s.detach().to(dtype), rtol=0, atol=0)
            s.data.copy_(p.float())  # the shadow continues from the rounded value, as the real param does
    for p, s in zip(low, shadow):
        for key, value in opt_low.state[p].items():
            if torch.is_tensor(value):
                assert value.dtype == torch.float32, key
                torch.testing.assert_close(value, opt_f32.state[s][key], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_resumes_exactly(name, dtype):
    params = _params(dtype)
    resumed = _clone(params)
    grads = _grads(params, steps=2 * STEPS)
    first, second = [g[:STEPS] for g in grads], [g[STEPS:] for g in grads]
    opt = OPTIMIZERS[name](params, 0.01)
    _run(opt, params, first)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a checkpoint: no tensors shared with the live optimizer
    buffer.seek(0)
    saved = torch.load(buffer)
    for p, r in zip(params, resumed):
        r.data.copy_(p.detach())
    opt2 = OPTIMIZERS[name](resumed, 0.01)
    opt2.load_state_dict(saved)
    for p in resumed:
        for key, value in opt2.state[p].items():
            if torch.is_tensor(value):
                assert value.dtype == torch.float32, key  # not cast down to the bf16 param dtype
    _run(opt, params, second)
    _run(opt2, resumed, second)
    for a, b in zip(params, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# param_groups on a nanoGPT-like model
# ---------------------------------------------------------------------------------------------------


class TinyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class TinyGPT(nn.Module):
    def __init__(self, vocab=96, d=256, seq=32, layers=2, tie=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight


def _by_role(groups):
    return {g["role"]: g for g in groups}


def test_roles_inferred_on_nanogpt_like_model():
    roles = infer_roles(TinyGPT())
    assert roles["wte.weight"] == roles["wpe.weight"] == "embedding"
    assert roles["lm_head.weight"] == "head"
    assert roles["ln_f.weight"] == roles["ln_f.bias"] == roles["blocks.1.ln2.bias"] == "norm"
    assert roles["blocks.0.qkv.bias"] == roles["blocks.1.out.bias"] == "bias"
    hidden = {n for n, r in roles.items() if r == "hidden"}
    assert hidden == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "fc", "out")}


def test_param_groups_lr_and_decay():
    model = TinyGPT(d=256)
    lr, wd = 0.01, 1e-4
    groups = _by_role(param_groups(model, lr=lr, weight_decay=wd, base_width=64))
    assert list(groups) == ["embedding", "hidden", "head", "norm", "bias"]
    assert groups["hidden"]["lr"] == pytest.approx(lr / 2, rel=1e-12)  # √(64/256) = 1/2
    for role in ("embedding", "head", "norm", "bias"):
        assert groups[role]["lr"] == lr
        assert groups[role]["weight_decay"] == 0.0
    assert groups["hidden"]["weight_decay"] == wd
    assert groups["head"]["names"] == ["lm_head.weight"]
    # every trainable parameter is in exactly one group
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    # explicit width, decay_roles, no base width
    groups = _by_role(param_groups(model, lr=lr, weight_decay=wd, base_width=64, width=1024,
                                   decay_roles=("hidden", "head")))
    assert groups["hidden"]["lr"] == pytest.approx(lr / 4, rel=1e-12)
    assert groups["head"]["weight_decay"] == wd and groups["embedding"]["weight_decay"] == 0.0
    assert _by_role(param_groups(model, lr=lr))["hidden"]["lr"] == lr


def test_param_groups_drive_adamw_first_step_sizes():
    """Adam's first step moves each element by ≈ lr: hidden weights lr/2, the rest lr."""
    model = TinyGPT(d=256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdamW(param_groups(model, lr=1e-2, base_width=64))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for group in opt.param_groups:
        expected = 1e-2 / 2 if group["role"] == "hidden" else 1e-2
        for name, p in zip(group["names"], group["params"]):
            step = (p.detach() - before[name]).abs()
            torch.testing.assert_close(step.median().item(), expected, rtol=1e-4, atol=0)


def test_munit_roles_and_width_override_inference():
    model = TinyGPT(d=256)
    roles = infer_roles(model)
    roles["blocks.0.proj.weight"] = "head"  # something inference would not say
    model.munit_roles = roles
    model.munit_width = 1024
    groups = _by_role(param_groups(model, lr=1.0, base_width=64))
    assert groups["head"]["names"] == ["blocks.0.proj.weight", "lm_head.weight"]
    assert "blocks.0.proj.weight" not in groups["hidden"]["names"]
    assert groups["hidden"]["lr"] == pytest.approx(0.25)  # munit_width, not the embedding dim
    # an explicit `roles` argument wins over the attribute
    explicit = infer_roles(model) | {"blocks.0.proj.weight": "hidden"}
    groups = _by_role(param_groups(model, lr=1.0, roles=explicit))
    assert groups["head"]["names"] == ["lm_head.weight"]


@pytest.mark.parametrize("vocab", [96, 1024])  # 1024 = 4·d: the MLP's fc weight has vocab rows too
def test_tied_embedding_and_head_counted_once(vocab):
    model = TinyGPT(vocab=vocab, tie=True)
    groups = _by_role(param_groups(model, lr=1e-3, weight_decay=1e-4, base_width=64))
    assert "head" not in groups
    names = [n for g in groups.values() for n in g["names"]]
    assert names.count("wte.weight") == 1 and "lm_head.weight" not in names
    assert groups["embedding"]["weight_decay"] == 0.0
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    # the head's alias name is accepted in explicit roles and resolves to the shared tensor
    roles = {n: "hidden" for n, _ in model.named_parameters()} | {"lm_head.weight": "embedding"}
    roles.pop("wte.weight")
    assert _by_role(param_groups(model, lr=1.0, roles=roles))["embedding"]["names"] == ["wte.weight"]


def test_head_found_when_an_mlp_layer_has_vocab_rows():
    """GPT with vocab 256, d 64, MLP 4·64 = 256: only the last vocab-row weight is the head;
    seq_len = d_model so a position table's size is not mistaken for the vocabulary."""
    model = GPT(GPTConfig(vocab_size=256, seq_len=64, d_model=64, n_layer=2))
    roles = infer_roles(model)
    assert [n for n, r in roles.items() if r == "head"] == ["lm_head.weight"]
    assert roles["blocks.0.mlp.up.weight"] == roles["blocks.1.attn.out_proj.weight"] == "hidden"
    assert roles["pos_emb.weight"] == "embedding"


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
        (dict(lr=1e-3, weight_decay=1.0), "weight_decay"),
        (dict(lr=1e-3, base_width=0), "base_width"),
        (dict(lr=1e-3, base_width=64.0), "base_width"),
        (dict(lr=1e-3, base_width=64, width=-8), "width"),
        (dict(lr=1e-3, roles={"wte.weight": "embeding"}), "roles"),
        (dict(lr=1e-3, roles={"wte.weight": "embedding"}), "has no role"),
        (dict(lr=1e-3, roles={"nope.weight": "hidden"}), "roles"),
        (dict(lr=1e-3, decay_roles="hidden"), "decay_roles"),
        (dict(lr=1e-3, decay_roles=("hiden",)), "decay_roles"),
    ],
)
def test_param_groups_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        param_groups(TinyGPT(d=32), **kwargs)


def test_param_groups_needs_width_without_embedding():
    with pytest.raises(ValueError, match="width"):
        param_groups(nn.Sequential(nn.Linear(8, 8)), lr=1e-3, base_width=4)
    groups = param_groups(nn.Sequential(nn.Linear(8, 8)), lr=1e-3, base_width=4, width=16)
    assert _by_role(groups)["hidden"]["lr"] == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda ps: AdamW(ps, lr=-1.0), "lr"),
        (lambda ps: AdamW(ps, betas=(1.0, 0.9)), r"betas\[0\]"),
        (lambda ps: AdamW(ps, betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda ps: AdamW(ps, betas=0.9), "betas"),
        (lambda ps: AdamW(ps, eps=-1e-8), "eps"),
        (lambda ps: AdamW(ps, weight_decay=1.0), "weight_decay"),
        (lambda ps: AdamW([{"params": ps, "weight_decay": -1e-4}]), "weight_decay"),
        (lambda ps: Lion(ps, lr=math.nan), "lr"),
        (lambda ps: Lion(ps, betas=(0.9, 1.5)), r"betas\[1\]"),
        (lambda ps: Lion(ps, weight_decay=-1e-4), "weight_decay"),
        (lambda ps: Lion([{"params": ps, "lr": -1.0}]), "lr"),
    ],
)
def test_optimizer_bad_hyperparameters_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make(_params())
