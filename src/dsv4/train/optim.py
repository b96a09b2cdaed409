"""The optimizers of DeepSeek-V4 pre-training (spec 6.1): Muon for the matrices, AdamW for the rest.

Which parameter goes where is decided by an explicit table of rules, ``RULES``, matched against parameter names.
Every parameter must match exactly one rule; a parameter that matches none (a new module, a bias someone added)
raises instead of silently landing in a default group. A Muon rule also says how to see its parameter as a batch of
logically independent matrices, ``[batch, n, m]``: a plain weight is one matrix, the stacked routed experts
``[E, I, d]`` are E matrices, and the block-diagonal ``wo_a`` ``[g * o_lora_rank, H c / g]`` is g matrices (row block j
belongs to head group j). Muon orthogonalizes each of those matrices on its own, all of them in one batched matmul.

Muon step, per independent matrix W in R^{n x m} (spec 6.1)::

    M <- mu M + G                           (momentum buffer, mu = 0.95)
    U  = mu M + G                           (Nesterov direction)
    O  = orthogonalize(U) * sqrt(max(n, m)) * 0.18
    W <- W (1 - lr wd) - lr O               (decoupled weight decay, wd = 0.1)

``orthogonalize`` is the hybrid Newton-Schulz iteration: X0 = U / ||U||_F, then 8 steps of the quintic
(3.4445, -4.7750, 2.0315), which pushes singular values into roughly [0.7, 1.2] fast, then 2 steps of
(2, -1.5, 0.5), whose fixed point 1 has zero derivative and so pulls them tight around 1. The sqrt(max(n, m))
factor gives the orthogonal update an RMS of 1 per entry, and 0.18 matches AdamW's typical update RMS so both
optimizers share one learning rate.

Decisions where the spec leaves room (spec 6.1 "unconfirmed"):

- attention sinks [H] and compressor ``ape`` [rate, width] -> AdamW (vector- / bias-like); ``wo_a`` -> Muon per group.
- AdamW weight decay. The report gives wd 0.1 for AdamW without naming exceptions. We decay the embedding and the
  lm head (matrices) and, by default, do **not** decay the vector-like parameters (RMSNorm gains, mHC ``base`` /
  ``scale``, sinks, ``ape``): decaying a gain initialized at 1 or a static bias toward 0 is the usual thing to avoid
  (GPT-2 / Megatron convention). ``build_optimizer(..., decay_vectors=True)`` applies 0.1 to all of them, the literal
  reading of the report.
- The router weight of hash-routed layers still gets gradients (gate values come from its unbiased scores), so it is
  a Muon matrix like every other router.
- Parameters without a gradient are skipped by both optimizers (their state is untouched), so one optimizer built
  over the whole model works across stages that freeze parts of it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------- Newton-Schulz

QUINTIC = (3.4445, -4.7750, 2.0315)  # fast, not convergent: singular values settle in about [0.7, 1.2]
POLISH = (2.0, -1.5, 0.5)  # f(x) = 2x - 1.5x^3 + 0.5x^5: f(1) = 1, f'(1) = 0
HYBRID_STEPS: tuple[tuple[float, float, float], ...] = (QUINTIC,) * 8 + (POLISH,) * 2


def orthogonalize(M: torch.Tensor, steps: Sequence[tuple[float, float, float]] = HYBRID_STEPS, *,
                  dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of M = U S V^T by Newton-Schulz iterations.

    M: ``[..., n, m]``, any number of leading batch dims; every trailing matrix is treated on its own (batched
    matmuls). ``steps``: one (a, b, c) per iteration ``X <- a X + b (X X^T) X + c (X X^T)^2 X``; the default is the
    V4 hybrid schedule (8 quintic + 2 polishing steps). Tall matrices are transposed so that X X^T is the small
    (min(n, m))^2 Gram matrix. ``dtype`` is the matmul dtype (float32 by default; bfloat16 is the fast option the
    report calls stable). Returns a tensor of M's shape and dtype.
    """
    if M.dim() < 2:
        raise ValueError(f"orthogonalize needs a matrix or a batch of matrices, got shape {tuple(M.shape)}")
    tall = M.shape[-2] > M.shape[-1]
    X = M.mT if tall else M
    X = X.to(dtype)
    norm = torch.linalg.matrix_norm(X.float(), ord="fro", keepdim=True)
    X = (X.float() / (norm + eps)).to(dtype)
    for a, b, c in steps:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(M.dtype)


# ------------------------------------------------------------------------------------------------ grouping rules

MUON, ADAMW = "muon", "adamw"
# how a Muon parameter splits into independent matrices
SINGLE = "single"  # a 2-D weight: one matrix
STACKED = "stacked"  # [E, n, m]: E matrices (routed experts)
ROW_GROUPS = "row_groups"  # [g * n, m]: row block j is matrix j (block-diagonal wo_a, g = o_groups)


@dataclass(frozen=True)
class Rule:
    """One line of the assignment table: parameters whose name matches ``pattern`` (regex, ``re.search``)."""

    pattern: str
    optimizer: str  # MUON or ADAMW
    ndim: int  # the parameter's expected number of dims; a mismatch raises
    split: str | None = None  # Muon: SINGLE / STACKED / ROW_GROUPS
    decay: bool = True  # AdamW: weight decay by default (vector-like params: only with decay_vectors=True)
    what: str = ""


# Names are matched with a leading "(^|\.)" so a wrapper prefix ("module.", "_orig_mod.") does not matter.
_P = r"(^|\.)"
RULES: tuple[Rule, ...] = (
    # --- AdamW (spec 6.1: embedding, prediction head, mHC base / scale, all RMSNorm weights; our choice: sinks, ape)
    Rule(_P + r"embed\.weight$", ADAMW, 2, what="token embedding"),
    Rule(_P + r"head\.weight$", ADAMW, 2, what="lm head"),
    Rule(_P + r"(attn_norm|ffn_norm|q_norm|kv_norm|norm|enorm|hnorm)\.weight$", ADAMW, 1, decay=False,
         what="RMSNorm weight"),
    Rule(_P + r"hc_(attn|ffn|head)\.(base|scale)$", ADAMW, 1, decay=False, what="mHC static bias / gating factor"),
    Rule(_P + r"attn\.attn_sink$", ADAMW, 1, decay=False, what="attention sink logits"),
    Rule(_P + r"compressor\.ape$", ADAMW, 2, decay=False, what="compressor positional bias"),
    # --- Muon: every other matrix
    Rule(_P + r"attn\.(wq_a|wq_b|wkv|wo_b)\.weight$", MUON, 2, SINGLE, what="attention projection"),
    Rule(_P + r"attn\.wo_a\.weight$", MUON, 2, ROW_GROUPS, what="grouped output projection (per group)"),
    Rule(_P + r"compressor\.(wkv|wgate)\.weight$", MUON, 2, SINGLE, what="compressor projection"),
    Rule(_P + r"indexer\.(wq_b|weights_proj)\.weight$", MUON, 2, SINGLE, what="indexer projection"),
    Rule(_P + r"ffn\.gate\.weight$", MUON, 2, SINGLE, what="router"),
    Rule(_P + r"ffn\.experts\.(w1|w2|w3)$", MUON, 3, STACKED, what="routed experts (each on its own)"),
    Rule(_P + r"ffn\.shared_experts\.(w1|w2|w3)\.weight$", MUON, 2, SINGLE, what="shared expert"),
    Rule(_P + r"hc_(attn|ffn|head)\.fn$", MUON, 2, SINGLE, what="mHC projection"),
    Rule(_P + r"mtp\.\d+\.(e_proj|h_proj)\.weight$", MUON, 2, SINGLE, what="MTP projection"),
)
_COMPILED = tuple((re.compile(r.pattern), r) for r in RULES)


def rule_for(name: str) -> Rule:
    """The one rule that covers parameter ``name``; raises ``KeyError`` if none or more than one match."""
    hits = [r for rx, r in _COMPILED if rx.search(name)]
    if not hits:
        raise KeyError(f"parameter {name!r} matches no optimizer rule in dsv4.train.optim.RULES; "
                       "add a rule saying whether it is a Muon matrix or an AdamW parameter")
    if len(hits) > 1:
        raise KeyError(f"parameter {name!r} matches several optimizer rules: {[r.pattern for r in hits]}")
    return hits[0]


def matrix_view(name: str, shape: Sequence[int], o_groups: int = 1) -> tuple[int, int, int]:
    """How Muon sees parameter ``name`` of ``shape``: ``(batch, n, m)``, ``batch`` independent n x m matrices that
    are a plain reshape of the parameter (experts [E, I, d] -> (E, I, d); wo_a [g r, k] -> (g, r, k); 2-D -> (1, n, m)).
    Raises for AdamW parameters and for shapes the rule does not expect."""
    rule = rule_for(name)
    shape = tuple(int(s) for s in shape)
    if rule.optimizer != MUON:
        raise ValueError(f"parameter {name!r} is an AdamW parameter ({rule.what}), it has no Muon matrix view")
    if len(shape) != rule.ndim:
        raise ValueError(f"parameter {name!r} ({rule.what}) should have {rule.ndim} dims, got shape {shape}")
    if rule.split == SINGLE:
        return (1, shape[0], shape[1])
    if rule.split == STACKED:
        return (shape[0], shape[1], shape[2])
    if rule.split == ROW_GROUPS:
        if o_groups < 1 or shape[0] % o_groups:
            raise ValueError(f"parameter {name!r}: {shape[0]} rows do not split into o_groups={o_groups} blocks")
        return (o_groups, shape[0] // o_groups, shape[1])
    raise AssertionError(rule.split)


def _o_groups(model: nn.Module, o_groups: int | None) -> int:
    if o_groups is not None:
        return o_groups
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "o_groups"):
        raise ValueError("param_groups: the model has no config.o_groups; pass o_groups= explicitly")
    return int(config.o_groups)


def param_groups(model: nn.Module, o_groups: int | None = None
                 ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split ``model.named_parameters()`` into ``{"muon": [...], "adamw": [...]}`` of ``(name, param)`` by ``RULES``.

    Every parameter must match exactly one rule and have the shape the rule expects (``KeyError`` / ``ValueError``
    otherwise). ``o_groups`` (for wo_a's view) defaults to ``model.config.o_groups``.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {MUON: [], ADAMW: []}
    g = _o_groups(model, o_groups)
    for name, p in model.named_parameters():
        rule = rule_for(name)
        if p.dim() != rule.ndim:
            raise ValueError(f"parameter {name!r} ({rule.what}) should have {rule.ndim} dims, got {tuple(p.shape)}")
        if rule.optimizer == MUON:
            matrix_view(name, p.shape, g)  # validates the split
        groups[rule.optimizer].append((name, p))
    return groups


# ------------------------------------------------------------------------------------------------------- Muon

def closure_loss(closure) -> torch.Tensor | None:
    """The ``closure`` argument of ``Optimizer.step``: re-evaluate the loss with gradients on, if one is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum, hybrid Newton-Schulz orthogonalization, RMS matching and decoupled weight decay.

    Each parameter group may carry ``views``: a list, aligned with ``params``, of ``(batch, n, m)`` — how to reshape
    that parameter into independent matrices (see ``matrix_view``). Without it a 2-D parameter is one matrix and a
    3-D one is a stack along dim 0. The views are part of ``state_dict()`` (as group options).
    """

    def __init__(self, params: Iterable[Any], lr: float = 2.7e-4, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, rms_scale: float = 0.18,
                 ns_steps: Sequence[tuple[float, float, float]] = HYBRID_STEPS,
                 ns_dtype: torch.dtype = torch.float32):
        if lr < 0:
            raise ValueError(f"Muon: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Muon: weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        rms_scale=rms_scale, ns_steps=tuple(tuple(float(v) for v in s) for s in ns_steps),
                        ns_dtype=ns_dtype, views=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["views"] = self._resolve_views(group)

    @staticmethod
    def _resolve_views(group: dict) -> list[tuple[int, int, int]]:
        params, views = group["params"], group.get("views")
        if views is None:
            views = []
            for p in params:
                if p.dim() == 2:
                    views.append((1, p.shape[0], p.shape[1]))
                elif p.dim() == 3:
                    views.append(tuple(p.shape))
                else:
                    raise ValueError(f"Muon: a parameter of shape {tuple(p.shape)} is not a matrix or a stack of "
                                     "matrices; give its view explicitly or use AdamW for it")
        views = [tuple(int(v) for v in view) for view in views]
        if len(views) != len(params):
            raise ValueError(f"Muon: {len(views)} views for {len(params)} parameters")
        for p, (b, n, m) in zip(params, views):
            if b * n * m != p.numel():
                raise ValueError(f"Muon: view {(b, n, m)} does not fit a parameter of shape {tuple(p.shape)}")
        return views

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p, view in zip(group["params"], group["views"]):
                if p.grad is None:
                    continue
                u = self._direction(group, p, p.grad.float(), p)
                self._apply(p, self._orthogonal(group, u, view), lr, wd)
        return loss

    def _direction(self, group: dict, p: torch.Tensor, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """M <- mu M + G; the update direction mu M + G (Nesterov) or M. ``like``: the tensor the momentum buffer
        has the shape of (the parameter, or its local shard)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        if hasattr(buf, "to_local") and not hasattr(like, "to_local"):  # DTensor buffer, local shard arithmetic
            buf = buf.to_local()
        buf.mul_(group["momentum"]).add_(g)
        return g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf

    @staticmethod
    def _orthogonal(group: dict, u: torch.Tensor, view: tuple[int, int, int]) -> torch.Tensor:
        """The hybrid Newton-Schulz orthogonalization of each of the view's matrices, rescaled to RMS 0.18."""
        b, n, m = view
        o = orthogonalize(u.reshape(b, n, m), group["ns_steps"], dtype=group["ns_dtype"])
        return o.mul_(group["rms_scale"] * math.sqrt(max(n, m))).reshape(u.shape)

    @staticmethod
    def _apply(p: torch.Tensor, o: torch.Tensor, lr: float, wd: float) -> None:
        """W <- W (1 - lr wd) - lr O (decoupled weight decay)."""
        p.mul_(1.0 - lr * wd)
        p.add_(o.to(p.dtype), alpha=-lr)


# --------------------------------------------------------------------------------------------- the pair of them

class HybridOptimizer:
    """Muon + AdamW behind one step() / zero_grad() / state_dict() / load_state_dict(), one shared learning rate.

    ``set_lr(lr)`` sets it on every group of both (call it before ``step()`` with the schedule's value). The state
    dict is ``{"muon": ..., "adamw": ...}``, each the inner optimizer's own; loading it back and continuing gives
    bit-identical parameters to an uninterrupted run.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon = muon
        self.adamw = adamw

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return (self.muon, self.adamw)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    def step(self, closure=None):
        loss = closure_loss(closure)
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"muon", "adamw"} - set(state)
        if missing:
            raise KeyError(f"optimizer state dict lacks {sorted(missing)}")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model: nn.Module, lr: float = 2.7e-4, weight_decay: float = 0.1, *,
                    momentum: float = 0.95, rms_scale: float = 0.18, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-20, decay_vectors: bool = False, ns_dtype: torch.dtype = torch.float32,
                    o_groups: int | None = None) -> HybridOptimizer:
    """The V4 optimizer pair over ``model`` (spec 6.1), grouped by ``param_groups``.

    Muon: momentum 0.95 (Nesterov), hybrid Newton-Schulz, update RMS 0.18, decoupled weight decay ``weight_decay``.
    AdamW: betas (0.9, 0.95), eps 1e-20, weight decay ``weight_decay`` on embedding and head, and on the vector-like
    parameters (norms, mHC base / scale, sinks, ape) only when ``decay_vectors`` (see the module docstring).
    Both share ``lr``. Parameter order inside each optimizer follows ``model.named_parameters()``, so a state dict
    saved from one model loads into a freshly built optimizer on an identical model.
    """
    groups = param_groups(model, o_groups)
    g = _o_groups(model, o_groups)
    muon_params = groups[MUON]
    muon = Muon([{"params": [p for _, p in muon_params],
                  "views": [matrix_view(n, p.shape, g) for n, p in muon_params]}],
                lr=lr, momentum=momentum, weight_decay=weight_decay, rms_scale=rms_scale, ns_dtype=ns_dtype)
    decay = [p for n, p in groups[ADAMW] if decay_vectors or rule_for(n).decay]
    no_decay = [p for n, p in groups[ADAMW] if not (decay_vectors or rule_for(n).decay)]
    adam_groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        adam_groups.append({"params": no_decay, "weight_decay": 0.0})
    adamw = torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return HybridOptimizer(muon, adamw)
