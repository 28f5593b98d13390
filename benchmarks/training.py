"""Training runs shared by the quality benchmarks: data, the two parametrizations, one training loop.

    recipe = Recipe(parametrization="mus", precision="fp8", lr=2**-5, width=256)
    result = train(recipe, load_corpus(path))   # {"final_val_loss", "tokens", "curve", "seconds"}

Data: byte-level text (vocab 256). The Shakespeare corpus is split by work (the last three works are
validation, unseen in training); a corpus without work titles is split 90/10. Batches come from a
seeded generator, so every run of a benchmark sees the same data in the same order.

Parametrizations (built-in GPT, pre-LN, GELU MLP):
  sp   the model's standard init (N(0, 0.02²), nanoGPT), torch AdamW, coupled weight decay on matrices.
  mus  `munit.unit_scale` (DESIGN §4) with `munit.param_groups` and `munit.optim`, decoupled decay.
Precision: "bf16" runs under torch.autocast(bfloat16); "fp8" also compiles with the munit backend
(hidden GEMMs in FP8 with static scales; emulated exactly on CPU).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

import munit_compile as munit
from munit_compile.models import GPT, GPTConfig

DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "shakespeare.txt")
VOCAB = 256
TITLE_MARK = b"by William Shakespeare"  # the line under each work's title
VAL_WORKS = 3
EVAL_BATCHES = 16


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor
    val: torch.Tensor
    description: str


def load_corpus(path: str | None = None) -> Corpus:
    """Byte tokens of `path` (default: the shared Shakespeare), split by work; a small built-in text
    (Python's pydoc topics) when the file is absent, so smoke runs need nothing outside the project."""
    path = path or DEFAULT_CORPUS
    if not os.path.exists(path):
        from pydoc_data.topics import topics

        raw = "".join(topics.values()).encode("utf-8")
        return _split_fraction(raw, f"pydoc topics ({len(raw) / 1e6:.1f} MB; {path} not found)")
    raw = open(path, "rb").read()
    lines = raw.split(b"\n")
    offsets, starts, titles, offset = [], [], [], 0
    for line in lines:
        offsets.append(offset)
        offset += len(line) + 1
    for i, line in enumerate(lines):
        if line.strip() == TITLE_MARK and i >= 2:
            starts.append(offsets[i - 2])
            titles.append(lines[i - 2].decode(errors="replace").strip())
    if len(starts) <= VAL_WORKS:
        return _split_fraction(raw, f"{os.path.basename(path)} (no work titles found: last 10 % held out)")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = starts[-VAL_WORKS]
    about = (f"{os.path.basename(path)}: {len(starts)} works, {cut / 1e6:.2f} MB train, validation = last "
             f"{VAL_WORKS} works ({', '.join(titles[-VAL_WORKS:])}; {(len(raw) - cut) / 1e6:.2f} MB)")
    return Corpus(data[:cut], data[cut:], about)


def _split_fraction(raw: bytes, about: str) -> Corpus:
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(len(data) * 0.9)
    return Corpus(data[:cut], data[cut:], about)


@dataclass(frozen=True)
class Recipe:
    """One training run. `lr` is the peak LR (for mus: of the embedding/head/norms; hidden layers get
    lr·√(base_width/width)). Schedule: linear warmup over `warmup` of the steps, cosine to `final_lr`·lr."""

    parametrization: str = "sp"  # "sp" | "mus"
    precision: str = "bf16"      # "bf16" | "fp8" | "fp32"
    lr: float = 1e-3
    width: int = 256
    layers: int = 4
    heads: int = 4
    seq: int = 128
    batch: int = 16
    steps: int = 1000
    seed: int = 0
    data_seed: int = 0
    optimizer: str = "adamw"     # "adamw" | "lion" (mus only)
    weight_decay: float = 0.1    # sp: AdamW's (coupled, × lr); mus: per step, decoupled
    base_width: int = 256
    tau: float | None = None
    attention_scale: str = "model"  # mus: "model" (1/√d) or "1/d"
    norm_placement: str = "res_post"  # mus: "res_post" or "pre"
    qk_norm: bool = True              # mus: LayerNorm on q and k before attention
    warmup: float = 0.05
    final_lr: float = 0.1
    eval_every: int = 100

    def label(self) -> str:
        return f"{self.parametrization}_{self.precision}"


def lr_factor(step: int, recipe: Recipe) -> float:
    warmup = max(1, int(recipe.steps * recipe.warmup))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    return recipe.final_lr + (1 - recipe.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def batches(data: torch.Tensor, recipe: Recipe, seed: int):
    """An endless stream of (x, y) windows, the same for every recipe with the same seed and shape."""
    gen = torch.Generator().manual_seed(seed)
    arange = torch.arange(recipe.seq + 1)
    while True:
        starts = torch.randint(0, len(data) - recipe.seq - 1, (recipe.batch,), generator=gen)
        windows = data[starts[:, None] + arange]
        yield windows[:, :-1], windows[:, 1:]


def build(recipe: Recipe, example: tuple[torch.Tensor, torch.Tensor]):
    """(model to train, optimizer) for the recipe."""
    torch.manual_seed(recipe.seed)
    config = GPTConfig(vocab_size=VOCAB, seq_len=recipe.seq, n_layer=recipe.layers, n_head=recipe.heads,
                       d_model=recipe.width)
    model = GPT(config)
    if recipe.parametrization == "sp":
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    elif recipe.parametrization == "mus":
        model = munit.unit_scale(model, example, config=munit.UnitScaleConfig(
            tau=recipe.tau, seed=recipe.seed, attention_scale=recipe.attention_scale,
            norm_placement=recipe.norm_placement, qk_norm=recipe.qk_norm))
        groups = munit.param_groups(model, recipe.lr, weight_decay=recipe.weight_decay, base_width=recipe.base_width)
        optimizer = (munit.optim.Lion if recipe.optimizer == "lion" else munit.optim.AdamW)(groups)
    else:
        raise ValueError(f"Recipe.parametrization must be 'sp' or 'mus', got {recipe.parametrization!r}")
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    runner = model
    if recipe.precision == "fp8":
        runner = torch.compile(model, backend=munit.backend(munit.Config()))
    elif recipe.precision not in ("bf16", "fp32"):
        raise ValueError(f"Recipe.precision must be 'bf16', 'fp8' or 'fp32', got {recipe.precision!r}")
    return model, runner, optimizer


def _autocast(recipe: Recipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision in ("bf16", "fp8"))


@torch.no_grad()
def evaluate(runner, val: torch.Tensor, recipe: Recipe) -> float:
    offsets = torch.linspace(0, len(val) - recipe.seq - 2, EVAL_BATCHES * recipe.batch).long()
    arange = torch.arange(recipe.seq + 1)
    losses = []
    for chunk in offsets.split(recipe.batch):
        windows = val[chunk[:, None] + arange]
        with _autocast(recipe):
            losses.append(float(runner(windows[:, :-1], windows[:, 1:])[1]))
    return sum(losses) / len(losses)


def train(recipe: Recipe, corpus: Corpus, progress: bool = True) -> dict:
    """Train per `recipe`; returns final validation loss, tokens, the validation curve and wall time."""
    stream = batches(corpus.train, recipe, recipe.data_seed)
    example = next(batches(corpus.train, recipe, recipe.data_seed))
    model, runner, optimizer = build(recipe, example)
    curve, start, loss = [], time.perf_counter(), float("nan")
    for step in range(recipe.steps):
        factor = lr_factor(step, recipe)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        x, y = next(stream)
        with _autocast(recipe):
            loss_t = runner(x, y)[1]
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
        loss = float(loss_t.detach())
        if not math.isfinite(loss):
            break
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            curve.append((step + 1, evaluate(runner, corpus.val, recipe)))
            if progress:
                elapsed = time.perf_counter() - start
                print(f"  {recipe.label()} lr {recipe.lr:.3g} w{recipe.width} seed {recipe.seed}: step {step + 1}/"
                      f"{recipe.steps} train {loss:.3f} val {curve[-1][1]:.4f} ({elapsed:.0f} s)", file=sys.stderr)
    final = curve[-1][1] if curve and len(curve) and curve[-1][0] == recipe.steps else float("inf")
    return {"recipe": asdict(recipe), "final_val_loss": final, "tokens": recipe.steps * recipe.batch * recipe.seq,
            "curve": curve, "seconds": time.perf_counter() - start}


def train_all(recipes: list[Recipe], corpus: Corpus, jobs: int = 1, progress: bool = True) -> list[dict]:
    """`train` each recipe, `jobs` at a time in separate processes (one thread each) when jobs > 1."""
    if jobs <= 1 or len(recipes) <= 1:
        return [train(r, corpus, progress) for r in recipes]
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        return list(pool.map(train, recipes, [corpus] * len(recipes), [progress] * len(recipes)))

