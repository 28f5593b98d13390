"""How long munit's analysis takes on a large graph: a Llama (default 48 layers, d 4096, seq 2048)
built on the meta device, so nothing is allocated. Parameters are stated as N(0, 0.02²) matrices and
unit norm gains (transformers' init); the rotary buffer is real (tiny).

Reports the wall time of each pipeline pass (normalize = pre-dispatch ATen tracing, variance = the
forward and backward analysis, fp8_plan) and of the Dynamo capture, median over --repeats runs.
"""
from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch   # noqa: E402

import munit_compile as munit   # noqa: E402
from benchmarks.common import benchmark_parser, environment, record  # noqa: E402
from munit_compile.passes.values import Moments   # noqa: E402


def transformers_init(p: torch.Tensor) -> Moments:
    """N(0, 0.02²) for weight matrices and embeddings, ones for norm gains."""
    return Moments.normal(0.0, 0.02**2) if p.dim() >= 2 else Moments(1.0, 1.0, gaussian=False, row_constant=True)


def build_llama(layers: int, width: int, heads: int, ffn: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    model.loss_type = "ForCausalLM"
    return model


def run_once(args) -> dict:
    torch._dynamo.reset()
    model = build_llama(args.layers, args.width, args.heads, args.ffn, args.vocab)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="meta")
    start = time.perf_counter()
    report = munit.inspect(model, input_ids=ids, labels=ids, use_cache=False, parameter_moments=transformers_init)
    total = time.perf_counter() - start
    passes = dict(report.pass_seconds)
    return {**passes, "capture": total - sum(passes.values()), "total": total,
            "gemms_total": report.summary["gemms_total"], "gemms_fp8": report.summary["gemms_fp8"],
            "unknown_ops": report.summary["unknown_ops"]}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("analysis-time", __doc__, "a 2-layer d=256 model, one run", plot=False)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.width, args.heads, args.ffn, args.vocab, args.seq, args.repeats = 2, 256, 4, 512, 1024, 128, 1
    runs = [run_once(args) for _ in range(args.repeats)]
    keys = ("capture", "normalize", "variance", "fp8_plan", "total")
    result = {
        "benchmark": "analysis-time",
        "model": f"llama {args.layers} layers, d {args.width}, ffn {args.ffn}, seq {args.seq} (meta device)",
        **environment(), "smoke": args.smoke,
        "median_seconds": {k: statistics.median(r[k] for r in runs) for k in keys},
        "gemms_total": runs[0]["gemms_total"], "gemms_fp8": runs[0]["gemms_fp8"], "unknown_ops": runs[0]["unknown_ops"],
    }
    print(f"{result['model']}: {result['gemms_fp8']}/{result['gemms_total']} GEMMs in FP8, unknown ops: {result['unknown_ops']}")
    for k in keys:
        print(f"  {k:10s} {result['median_seconds'][k]:7.2f} s  (median of {len(runs)})")
    record(result, args.json, headline(result))
    return 0


def headline(result: dict) -> dict:
    return {f"{k}_s": v for k, v in result["median_seconds"].items()}
