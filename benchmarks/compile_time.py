"""compile-time: what `backend="munit"` adds to the first training step, against `backend="inductor"`.

For each model, the wall time of `torch.compile(model, backend=...)` plus the first forward and backward
(where both compile), with Inductor's and AOTAutograd's on-disk caches off and Dynamo reset before each
run; munit and Inductor alternate (which goes first flips each repeat) and each reports the median over
--repeats. A throwaway compile of each backend first takes the process's one-time costs (imports, the
C++ toolchain probe) out of the first measured run. Also the median time of each munit pass (summed
over the graphs Dynamo captured), so a slow pass is named.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch   # noqa: E402

import munit_compile as munit   # noqa: E402
from benchmarks.common import benchmark_parser, environment, publish, pyplot, save_figure  # noqa: E402

TARGET_RATIO = 1.2  # the target: munit compiles within 20 % of Inductor


def gpt(width: int, layers: int, seq: int, batch: int):
    def build():
        from munit_compile.models import GPT, GPTConfig

        model = GPT(GPTConfig(vocab_size=512, seq_len=seq, n_layer=layers, n_head=max(1, width // 64), d_model=width))
        ids = torch.randint(0, 512, (batch, seq))
        return model, (ids, ids), {}
    return build


def llama(width: int, layers: int, seq: int, batch: int):
    def build():
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=512, hidden_size=width, intermediate_size=width * 8 // 3 // 16 * 16,
                             num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                             num_key_value_heads=max(1, width // 128))
        model = LlamaForCausalLM(config)
        model.loss_type = "ForCausalLM"
        ids = torch.randint(0, 512, (batch, seq))
        return model, (), {"input_ids": ids, "labels": ids, "use_cache": False}
    return build


MODELS = {
    "gpt-d128-l2": gpt(128, 2, 64, 8),
    "gpt-d256-l6": gpt(256, 6, 128, 8),
    "llama-d256-l4": llama(256, 4, 128, 4),
}
SMOKE_MODELS = {"gpt-d64-l1": gpt(64, 1, 32, 2)}


def _loss(out):
    return out[1] if isinstance(out, tuple) else out.loss


def first_step(build, backend_name: str) -> tuple[float, dict]:
    """Seconds for compile + first forward/backward, and munit's per-pass seconds (empty for Inductor)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args, kwargs = build()
    backend = munit.backend(munit.Config()) if backend_name == "munit" else "inductor"
    start = time.perf_counter()
    compiled = torch.compile(model, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(compiled(*args, **kwargs))
    loss.backward()
    seconds = time.perf_counter() - start
    passes: dict[str, float] = {}
    for report in getattr(backend, "reports", []):
        for name, s in report.pass_seconds.items():
            passes[name] = passes.get(name, 0.0) + s
    return seconds, passes


def _no_caches() -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = False


def measure(models: dict, repeats: int, warmup: bool = True) -> dict:
    _no_caches()
    if warmup:
        first = next(iter(models.values()))
        for name in ("inductor", "munit"):
            first_step(first, name)
    results = {}
    for model_name, build in models.items():
        times: dict[str, list[float]] = {"munit": [], "inductor": []}
        passes: list[dict] = []
        for rep in range(repeats):
            for backend_name in (("munit", "inductor") if rep % 2 == 0 else ("inductor", "munit")):
                seconds, p = first_step(build, backend_name)
                times[backend_name].append(seconds)
                if backend_name == "munit":
                    passes.append(p)
        munit_s, inductor_s = statistics.median(times["munit"]), statistics.median(times["inductor"])
        pass_s = {k: statistics.median(p.get(k, 0.0) for p in passes) for k in passes[0]} if passes else {}
        results[model_name] = {"munit_s": munit_s, "inductor_s": inductor_s, "ratio": munit_s / inductor_s,
                               "munit_pass_s": pass_s, "runs": times}
        print(f"  {model_name:14s} munit {munit_s:6.2f} s  inductor {inductor_s:6.2f} s  ratio {munit_s / inductor_s:.2f}"
              f"  passes: " + ", ".join(f"{k} {v:.2f} s" for k, v in pass_s.items()), file=sys.stderr)
    return results


def headline(result: dict) -> dict:
    return {f"{name}_ratio": m["ratio"] for name, m in result["models"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("compile-time", __doc__, "one tiny GPT, one repeat, no warm-up: plumbing only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    models, repeats = (SMOKE_MODELS, 1) if args.smoke else (MODELS, args.repeats)
    print(f"compile-time: {len(models)} models, median of {repeats}, caches off", file=sys.stderr)
    start = time.perf_counter()
    result = {"benchmark": "compile-time", **environment(), "smoke": args.smoke, "repeats": repeats,
              "target_ratio": TARGET_RATIO, "models": measure(models, repeats, warmup=not args.smoke)}
    result["seconds"] = time.perf_counter() - start
    worst = max(result["models"].items(), key=lambda kv: kv[1]["ratio"])
    if worst[1]["ratio"] > TARGET_RATIO and worst[1]["munit_pass_s"]:
        slowest = max(worst[1]["munit_pass_s"].items(), key=lambda kv: kv[1])
        result["slowest_pass"] = {"model": worst[0], "pass": slowest[0], "seconds": slowest[1]}
        print(f"  over the {TARGET_RATIO} target on {worst[0]}: slowest munit pass {slowest[0]} ({slowest[1]:.2f} s)",
              file=sys.stderr)
    publish(result, args.json, args.png, "compile_time", headline(result), plot)
    return 0


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    names = list(result["models"])
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(names))
    inductor = [result["models"][n]["inductor_s"] for n in names]
    ax.bar([i - 0.2 for i in x], inductor, width=0.4, label="inductor")
    bottom = [0.0] * len(names)
    for pass_name in dict.fromkeys(k for n in names for k in result["models"][n]["munit_pass_s"]):
        heights = [result["models"][n]["munit_pass_s"].get(pass_name, 0.0) for n in names]
        ax.bar([i + 0.2 for i in x], heights, width=0.4, bottom=bottom, label=f"munit: {pass_name}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    rest = [result["models"][n]["munit_s"] - b for n, b in zip(names, bottom)]
    ax.bar([i + 0.2 for i in x], rest, width=0.4, bottom=bottom, label="munit: Dynamo, aot_autograd, Inductor")
    for i, n in enumerate(names):
        ax.text(i + 0.2, result["models"][n]["munit_s"], f"{result['models'][n]['ratio']:.2f}×", ha="center", va="bottom")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("compile + first step (s)")
    ax.set_title(f"compile-time: {result['machine']}, commit {result['commit']}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
