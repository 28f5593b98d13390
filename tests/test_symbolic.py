"""Symbolic moments: sympy expressions over the graph's dims, next to the same numbers.

Checks that the expressions are the computation (they evaluate to the engine's numbers, and at new
batch/sequence sizes to what a fresh analysis at those sizes gives), that written-out idioms reduce to
the fused op's formula, and that turning the expressions on changes no number.
"""
from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import munit_compile as munit
from munit_compile.config import Config
from munit_compile.ir import META_BWD, META_FWD
from munit_compile.models.gpt import GPT, GPTConfig
from munit_compile.passes.symbolic import Dim, Sym, formulas_of_graph
from munit_compile.passes.variance import propagate
from munit_compile.pipeline import run_pipeline


def test_sym_and_dim_arithmetic_keeps_the_float_value_and_builds_the_expression():
    d, x = Dim(64, sympy.Symbol("d")), Sym(0.25, sympy.Symbol("m2_x"))
    y = d * x * 3.0 + 1
    assert float(y) == 64 * 0.25 * 3.0 + 1 and isinstance(y, Sym)
    assert sympy.simplify(y.expr - (3 * sympy.Symbol("d") * sympy.Symbol("m2_x") + 1)) == 0
    rows = Dim(6, sympy.Symbol("b")) * Dim(10, sympy.Symbol("t")) * d // d
    assert int(rows) == 60 and isinstance(rows, Dim) and rows.expr == sympy.Symbol("b") * sympy.Symbol("t")
    assert isinstance((x + 1e-6) ** -0.5, Sym) and float((x + 1e-6) ** -0.5) == (0.25 + 1e-6) ** -0.5
    assert type(abs(x)) is float  # what the rules cannot express stays a plain number


class NormLinearStack(nn.Module):
    """Embedding, two pre-norm residual linear blocks, final norm, untied head: every op algebraic."""

    def __init__(self, vocab: int = 40, width: int = 24, blocks: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width) for _ in range(blocks + 1))
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        for norm, fc in zip(self.norms, self.fcs):
            h = h + fc(norm(h))
        return self.head(self.norms[-1](h))


def analyse(model: nn.Module, ids: torch.Tensor):
    params = dict(model.named_parameters())

    def f(ids, *flat):
        return torch.func.functional_call(model, dict(zip(params, flat)), (ids,))

    flat = [nn.Parameter(p.detach().clone()) for p in params.values()]
    gm = make_fx(f, pre_dispatch=True)(ids, *flat)
    propagate(gm, [ids, *flat], symbolic=True)
    return gm


def test_closed_forms_evaluate_to_the_engine_numbers_and_to_a_reanalysis_at_new_sizes():
    torch.manual_seed(0)
    model = NormLinearStack()
    gm = analyse(model, torch.randint(0, 40, (3, 10)))
    formulas = formulas_of_graph(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    checked = 0
    for name, formula in formulas.items():
        assert not formula.closed("m2").atoms(sympy.Function), f"{name}: every op here is algebraic"
        assert formula.std() == pytest.approx(nodes[name].meta[META_FWD].std, rel=1e-9, abs=1e-15)
        if "grad_m2" in formula.symbols:
            assert formula.grad_std() == pytest.approx(nodes[name].meta[META_BWD].std, rel=1e-9)
            checked += 1
    assert checked >= 10
    bigger = analyse(model, torch.randint(0, 40, (5, 7)))
    for node in bigger.graph.nodes:
        if node.name in formulas and "grad_m2" in formulas[node.name].symbols:
            assert formulas[node.name].grad_std(batch=5, seq=7) == pytest.approx(node.meta[META_BWD].std, rel=1e-9)
            assert formulas[node.name].std(batch=5, seq=7) == pytest.approx(node.meta[META_FWD].std, rel=1e-9)
    with pytest.raises(ValueError, match="no dim named 'heads'"):
        formulas["addmm"].grad_std(heads=2) if "addmm" in formulas else formulas["linear"].grad_std(heads=2)


def test_gemm_formula_names_its_dims_and_weight():
    torch.manual_seed(0)
    gm = analyse(NormLinearStack(), torch.randint(0, 40, (3, 10)))
    linear = formulas_of_graph(gm)["linear"]
    local = linear.closed("m2", depth=1)
    assert {"d_model", "m2_arg5_1", "m2_rms_norm"} <= {s.name for s in local.free_symbols}, local
    seed = formulas_of_graph(gm)["linear_2"]  # the head's logits: mean-CE seed (1 - 1/V)/V/N²
    definition = seed.table.definitions[seed.symbols["grad_m2"]]
    dims = {s.name: s for s in definition.free_symbols}
    V, B, T = dims["vocab"], dims["batch"], dims["seq"]
    assert sympy.simplify(definition - (1 - 1 / V) / V / (B * T) ** 2) == 0, definition


RMS_NORMS = {
    "written_out": lambda x, w: x * torch.rsqrt(torch.mean(x**2, -1, keepdim=True) + 1e-6) * w,
    "fused": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
}


def test_written_out_rms_norm_has_the_fused_formula():
    gen = torch.Generator().manual_seed(3)
    x = nn.Parameter(0.3 + 2 * torch.randn(64, 512, generator=gen, dtype=torch.float64))
    w = nn.Parameter(1 + 0.2 * torch.randn(512, generator=gen, dtype=torch.float64))
    closed = {}
    for variant, f in RMS_NORMS.items():
        gm = make_fx(f, pre_dispatch=True)(x, w)
        propagate(gm, [x, w], grad_output_std=1.0, symbolic=True)
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        closed[variant] = formulas_of_graph(gm)[out.name].closed("m2")
    assert {s.name for s in closed["fused"].free_symbols} == {"m2_x_1", "m2_w_1"}
    assert sympy.simplify(closed["written_out"] - closed["fused"]) == 0, closed


def test_symbolic_analysis_changes_no_number_and_opaque_ops_refuse_new_sizes():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, seq_len=32, n_layer=2, n_head=2, d_model=48))
    ids = torch.randint(0, 96, (3, 20))
    rows = {}
    for symbolic in (False, True):
        report = munit.inspect(model, ids, ids, config=Config(symbolic=symbolic))
        rows[symbolic] = [(r["name"], r["pred_std"], r["pred_grad_std"], r["fp8"]) for r in report.rows]
    assert rows[True] == rows[False]
    down = next(r["name"] for r in report.rows if r["fp8"] is not None and "linear" in r["name"]
                and "gelu" in str(report.formula(r["name"]).closed("m2", depth=1)))
    assert report.formula(down).std() == pytest.approx(next(r["pred_std"] for r in report.rows if r["name"] == down))
    with pytest.raises(ValueError, match="gelu_m2"):
        report.formula(down).std(seq=64)
    with pytest.raises(KeyError, match="symbolic=False"):
        munit.inspect(model, ids, ids, config=Config(symbolic=False)).formula(down)


def test_dynamic_sizes_keep_their_symbols_named_batch_and_seq():
    torch.manual_seed(0)
    model = NormLinearStack()
    graphs = []

    def capture(gm, inputs):
        graphs.append((gm, inputs))
        return gm.forward

    torch.compile(model, backend=capture, dynamic=True)(torch.randint(0, 40, (3, 10)))
    gm, inputs = graphs[0]
    gm, _ = run_pipeline(gm, inputs, Config(symbolic=True, strict=True))
    formulas = formulas_of_graph(gm)
    seed = max((f for f in formulas.values() if "grad_m2" in f.symbols),
               key=lambda f: len(f.table.definitions.get(f.symbols["grad_m2"]).free_symbols)
               if f.table.definitions.get(f.symbols["grad_m2"]) is not None else 0)
    names = {s.name for s in seed.closed("grad_m2").free_symbols}
    assert {"batch", "seq"} <= names, names
