"""Optimizers and parameter groups for μS (unit-scaled) models (DESIGN §4).

    groups = param_groups(model, lr=2**-6, weight_decay=1e-4, base_width=64)
    opt = AdamW(groups)            # or Lion(groups)

μS rules: every parameter has a role ("embedding", "hidden", "head", "norm", "bias"). Hidden linear
weights get an Adam-like LR of lr·√(d_base/d); everything else keeps lr. Weight decay is fully
decoupled, `w ← (1−λ)·w` once per step, independent of the LR and of any LR schedule, so λ is a
per-step rate (typically ~1e-4), not torch.optim.AdamW's lr-multiplied λ.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn

ROLES = ("embedding", "hidden", "head", "norm", "bias")
"""Parameter roles, in the order `param_groups` emits its groups."""

_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------
# Roles and parameter groups
# ---------------------------------------------------------------------------------------------------


def _is_norm_module(module: nn.Module) -> bool:
    # Norm classes outside torch.nn (e.g. transformers' LlamaRMSNorm, T5LayerNorm) end in "Norm".
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _vocab_embedding(model: nn.Module) -> nn.Embedding | None:
    """The token embedding: the nn.Embedding with the most rows (position tables are shorter)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(embeddings, key=lambda m: m.num_embeddings, default=None)


def infer_roles(model: nn.Module) -> dict[str, str]:
    """Role of each parameter (named as `model.named_parameters()` names it), from module types.

    nn.Embedding weights → "embedding" (a head tied to one is that same tensor, listed once);
    ≤1-D parameters of norm modules → "norm"; other ≤1-D → "bias"; the last-registered 2-D weight
    with vocab rows (vocab = the largest nn.Embedding's num_embeddings), unless the head is tied to
    the embedding → "head"; every other ≥2-D parameter → "hidden".
    Heuristic: models with other layouts (raw nn.Parameter embeddings, ...) should pass `roles`.
    """
    embedding_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }
    norm_ids = {
        id(p)
        for m in model.modules() if _is_norm_module(m)
        for p in m.parameters(recurse=False) if p.ndim <= 1
    }
    vocab_emb = _vocab_embedding(model)
    head_id = None
    if vocab_emb is not None:
        tied = any(
            p is vocab_emb.weight and not isinstance(m, nn.Embedding)
            for m in model.modules() for p in m.parameters(recurse=False)
        )
        candidates = [
            p for _, p in model.named_parameters()
            if p.ndim == 2 and p.shape[0] == vocab_emb.num_embeddings and id(p) not in embedding_ids
        ]
        if candidates and not tied:
            head_id = id(candidates[-1])

    roles = {}
    for name, p in model.named_parameters():
        if id(p) in embedding_ids:
            roles[name] = "embedding"
        elif id(p) == head_id:
            roles[name] = "head"
        elif p.ndim <= 1:
            roles[name] = "norm" if id(p) in norm_ids else "bias"
        else:
            roles[name] = "hidden"
    return roles


def _check_roles(model: nn.Module, roles: Mapping[str, str], source: str) -> dict[str, str]:
    """`roles` keyed by canonical names (tied aliases resolved); ValueError naming `source`."""
    canonical = {}  # every name of a parameter, aliases included -> the name named_parameters() uses
    first_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical[name] = first_name.setdefault(id(p), name)
    resolved: dict[str, str] = {}
    for name, role in roles.items():
        if name not in canonical:
            raise ValueError(f"{source}: {name!r} is not a parameter of the model")
        if role not in ROLES:
            raise ValueError(f"{source}[{name!r}]: unknown role {role!r}; roles are {ROLES}")
        key = canonical[name]
        if resolved.setdefault(key, role) != role:
            raise ValueError(
                f"{source}: tied parameter {key!r} given two roles, {resolved[key]!r} and {role!r}"
            )
    for name, p in model.named_parameters():
        if p.requires_grad and name not in resolved:
            raise ValueError(f"{source}: parameter {name!r} has no role; roles are {ROLES}")
    return resolved


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _resolve_width(model: nn.Module, width) -> int:
    if width is None:
        width = getattr(model, "munit_width", None)
    if width is None:
        emb = _vocab_embedding(model)
        if emb is None:
            raise ValueError(
                "width: the model has no munit_width and no nn.Embedding to take it from; pass width="
            )
        width = emb.embedding_dim
    return _positive_int("width", width)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    base_width: int | None = None,
    width: int | None = None,
    roles: Mapping[str, str] | None = None,
    decay_roles: Iterable[str] = ("hidden",),
) -> list[dict]:
    """Optimizer parameter groups for a μS model, one per role present, in `ROLES` order.

    lr: hidden → lr·√(base_width/width) (factor 1 when base_width is None); embedding, head, norm,
    bias → lr. weight_decay (per-step, fully decoupled; see `AdamW`) goes to `decay_roles` only.
    Roles: `roles`, else `model.munit_roles`, else `infer_roles(model)`; width: `width`, else
    `model.munit_width`, else the token embedding's dim. Frozen parameters are left out.
    Each group: {"params", "lr", "weight_decay", "role", "names"}.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
        0.0 <= weight_decay < 1.0
    ):
        raise ValueError(f"weight_decay must be in [0, 1) (per-step decay), got {weight_decay!r}")
    if isinstance(decay_roles, str):
        raise ValueError(f"decay_roles must be a collection of roles, not the string {decay_roles!r}")
    decay_roles = tuple(decay_roles)
    for role in decay_roles:
        if role not in ROLES:
            raise ValueError(f"decay_roles: unknown role {role!r}; roles are {ROLES}")
    scale = 1.0
    if base_width is not None:
        base_width = _positive_int("base_width", base_width)
        scale = math.sqrt(base_width / _resolve_width(model, width))
    elif width is not None:
        _positive_int("width", width)

    if roles is not None:
        resolved = _check_roles(model, roles, "roles")
    elif getattr(model, "munit_roles", None) is not None:
        resolved = _check_roles(model, model.munit_roles, "model.munit_roles")
    else:
        resolved = infer_roles(model)

    members: dict[str, list[tuple[str, nn.Parameter]]] = {role: [] for role in ROLES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            members[resolved[name]].append((name, p))
    return [
        {
            "params": [p for _, p in named],
            "lr": lr * scale if role == "hidden" else lr,
            "weight_decay": weight_decay if role in decay_roles else 0.0,
            "role": role,
            "names": [n for n, _ in named],
        }
        for role, named in members.items() if named
    ]


# ---------------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------------


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer state is float32 for bf16/fp16 parameters, the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def _check_range(owner: str, name: str, value, low: float, high: float, high_open: bool = True):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{owner}: {name} must be in {bound}, got {value!r}")


def _check_betas(owner: str, betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_range(owner, f"betas[{i}]", beta, 0.0, 1.0)


class _DecoupledOptimizer(torch.optim.Optimizer):
    """Shared plumbing: per-group validation, float32 state for low-precision parameters."""

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(merged)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to the parameter's dtype; keep float32 state for bf16/fp16 params.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state or _state_dtype(p) == p.dtype:
                continue
            for key, value in saved_state[pid].items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=_state_dtype(p), copy=True)

    @staticmethod
    def _grad(p: torch.Tensor, owner: str) -> torch.Tensor:
        if p.grad.is_sparse:
            raise RuntimeError(f"{owner} does not support sparse gradients")
        return p.grad.to(_state_dtype(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # Work on a float32 copy of a bf16/fp16 parameter; round once when writing back.
                w = p if _state_dtype(p) == p.dtype else p.to(_state_dtype(p))
                if group["weight_decay"] != 0:
                    w.mul_(1.0 - group["weight_decay"])
                self._update(w, self._grad(p, type(self).__name__), self.state[p], group)
                if w is not p:
                    p.copy_(w)
        return loss

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError


class AdamW(_DecoupledOptimizer):
    """Adam with fully decoupled weight decay: w ← (1−λ)·w, then w ← w − lr·m̂/(√v̂ + eps).

    m̂, v̂ are the bias-corrected first and second moments (as torch.optim.Adam). λ is per step and
    does not scale with lr or an LR schedule (torch.optim.AdamW decays by lr·λ instead).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        _check_range("AdamW", "lr", group["lr"], 0.0, math.inf)
        _check_betas("AdamW", group["betas"])
        _check_range("AdamW", "eps", group["eps"], 0.0, math.inf)
        _check_range("AdamW", "weight_decay", group["weight_decay"], 0.0, 1.0)

    def _update(self, w, g, state, group):
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2**t)).add_(group["eps"])
        w.addcdiv_(m, denom, value=-group["lr"] / (1.0 - beta1**t))


class Lion(_DecoupledOptimizer):
    """Lion (Chen et al. 2023) with fully decoupled weight decay: w ← (1−λ)·w, then
    w ← w − lr·sign(β1·m + (1−β1)·g), and m ← β2·m + (1−β2)·g. λ is per step, independent of lr.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        _check_range("Lion", "lr", group["lr"], 0.0, math.inf)
        _check_betas("Lion", group["betas"])
        _check_range("Lion", "weight_decay", group["weight_decay"], 0.0, 1.0)

    def _update(self, w, g, state, group):
        beta1, beta2 = group["betas"]
        if not state:
            state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        m = state["exp_avg"]
        w.add_(torch.lerp(m, g, 1.0 - beta1).sign_(), alpha=-group["lr"])
        m.lerp_(g, 1.0 - beta2)


__all__ = ["ROLES", "AdamW", "Lion", "infer_roles", "param_groups"]
