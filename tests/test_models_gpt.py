import dataclasses

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from munit_compile.models import GPT, GPTConfig

TINY = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def make_inputs(config: GPTConfig, batch: int = 3, seq: int = 12):
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    targets = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    return idx, targets


def test_forward_shapes_and_optional_loss():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = make_inputs(TINY)
    logits, loss = model(idx)
    assert logits.shape == (3, 12, TINY.vocab_size)
    assert loss is None
    logits, loss = model(idx, targets)
    assert loss.shape == () and torch.isfinite(loss)


def test_loss_matches_independent_cross_entropy():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = make_inputs(TINY)
    logits, loss = model(idx, targets)
    log_probs = logits.double().log_softmax(dim=-1)
    expected = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits.transpose(1, 2), targets))


def test_untrained_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(TINY)
    _, loss = model(*make_inputs(TINY))
    assert abs(loss.item() - torch.log(torch.tensor(float(TINY.vocab_size))).item()) < 0.1


def test_init_and_untied_head():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    assert model.lm_head.weight.data_ptr() != model.token_emb.weight.data_ptr()
    assert model.lm_head.bias is None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert abs(module.weight.std().item() - 0.02) < 0.002, name
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0, name
    assert abs(model.token_emb.weight.std().item() - 0.02) < 0.002


def test_bias_false_removes_biases():
    model = GPT(dataclasses.replace(TINY, bias=False))
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())


def test_sequence_longer_than_seq_len_rejected():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, TINY.seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"d_model": 30, "n_head": 4}, "d_model"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"seq_len": 2.5}, "seq_len"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**overrides)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.d_model = 64


def test_compiles_without_graph_breaks():
    model = GPT(TINY)
    idx, targets = make_inputs(TINY)
    explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_forward_and_backward_match_eager():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = make_inputs(TINY)
    _, eager_loss = model(idx, targets)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    _, compiled_loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, targets)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for eager_grad, param in zip(eager_grads, model.parameters()):
        torch.testing.assert_close(param.grad, eager_grad)
