"""Small models the backend tests train: an MLP, a pre-LN transformer block, transformers Llama and GPT-2."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 320  # a multiple of 16 on purpose: the LM head must be excluded as an LM head, not by its shape


class MLP(nn.Module):
    def __init__(self, d=64, hidden=128):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class CumsumThenLinear(nn.Module):
    """A GEMM fed by an op the analysis has no rule for (cumsum)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), dim=-1))


class PreLNBlock(nn.Module):
    """x + attn(LN(x)); x + mlp(LN(x)) with causal SDPA and tanh-GELU."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _hf_decoder(LlamaConfig, LlamaForCausalLM)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    return model


def _hf_decoder(config_cls, model_cls):
    cfg = config_cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    model = model_cls(cfg)
    model.loss_type = "ForCausalLM"
    return model


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _hf_decoder(MistralConfig, MistralForCausalLM)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _hf_decoder(Qwen2Config, Qwen2ForCausalLM)


def builtin_gpt():
    from munit_compile.models import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=32, n_layer=2, n_head=4, d_model=64))


def hidden_gemm_modules(model: nn.Module) -> list[nn.Module]:
    """nn.Linear and transformers Conv1D modules other than the LM head, in definition order."""
    from transformers.pytorch_utils import Conv1D

    head = getattr(model, "lm_head", None)
    return [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
