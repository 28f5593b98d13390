"""`UnitScaleConfig`: the knobs of `munit.unit_scale`, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass

NORM_PLACEMENTS = ("res_post", "pre")
ATTENTION_SCALES = ("model", "1/d")


def default_tau(n_layers: int) -> float:
    """τ = min(0.5, 1.6 / L): 0.4 at 4 layers (the value the μS paper used there), falling as 1/depth so
    each of the 2L residual adds mixes in a share of branch variance that keeps the embedding's share of
    the final stream roughly constant, (1 − τ)^(2L) → e^(−3.2), instead of vanishing with depth."""
    return min(0.5, 1.6 / max(n_layers, 1))


@dataclass(frozen=True)
class UnitScaleConfig:
    """tau: residual mixing x ← √(1−τ)·x + √τ·f(x), in (0, 1); None: `default_tau(layers)`.
    norm_placement: "res_post" (branch's leading norm removed, a norm at the branch's end) or "pre"
      (keep the model's pre-norms; no norm added).
    unit_backward: give FP8 gradient operands unit scale too (identity-forward `munit::grad_scale`: the
      logits' gradient × 1/σ_CE, each hidden GEMM's output gradient × c and its input gradient × 1/c);
      parameter gradients are then the true ones times a constant per tensor, which Adam-like
      optimizers and decoupled weight decay do not see.
    attention_scale: "model" keeps the model's softmax(q·kᵀ/√d); "1/d" uses q·kᵀ/d (μP's attention
      scaling: logits stay O(1) as q and k align during training) in every scaled_dot_product_attention.
    qk_norm: normalize q and k over the head dim (LayerNorm without affine) before every
      scaled_dot_product_attention, so logits stay bounded as training aligns them (as OLMo-2, Gemma 3).
      On by default: without it μS trains stably only in a narrow LR band and ends behind SP; with it,
      at d 128 μS matched SP and tolerated 2× larger LRs (benchmarks/README.md; not yet at d 256).
    seed: of the N(0, 1) re-initialization."""

    tau: float | None = None
    norm_placement: str = "res_post"
    unit_backward: bool = True
    attention_scale: str = "model"
    qk_norm: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float))
                                     or not (0 < self.tau < 1) or not math.isfinite(self.tau)):
            raise ValueError(f"UnitScaleConfig.tau must be in (0, 1) (or None for the depth default), got {self.tau!r}")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"UnitScaleConfig.norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        if self.attention_scale not in ATTENTION_SCALES:
            raise ValueError(f"UnitScaleConfig.attention_scale must be one of {ATTENTION_SCALES}, got {self.attention_scale!r}")
        for name in ("unit_backward", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UnitScaleConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"UnitScaleConfig.seed must be an int, got {self.seed!r}")
