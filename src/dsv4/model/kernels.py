"""Attention math of the fast paths: one softmax over every key a query may use (window keys and compressed entries
alike) plus a per-head sink logit that adds to the denominator only (spec 2.2.6). A query's keys come in sets (its
window band, its compressed entries); ``attend`` computes each set's unnormalized ``Partial`` and ``merge`` joins them:
the same softmax as ``dsv4.model.reference.reference_attention``, assembled as flash attention does, without
concatenating keys.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.model.precision import upcast


_MASKED = -1e30  # a finite "minus infinity" for masked logits: a fully masked key set then weighs exactly 0
# exp(x) for x below about -87 is a float32 denormal, which the vectorized exp of x86 CPUs computes on a slow path
# (docs/performance-notes.md); the fast path clamps its exp arguments here (weights below e^-80 = 1.8e-35 relative
# are dropped)
_EXP_FLOOR = -80.0


@dataclass
class Partial:
    """Attention of Q queries over one key set, before normalization (flash attention's running state).

    out [..., Q, H, c] = sum_j e_j v_j; s [..., Q, H] = sum_j e_j; with e_j = exp(z_j - m) for the scaled logits
    z_j of the unmasked keys (0 for masked ones) and m [..., Q, H] their maximum (``_MASKED`` for an empty set),
    detached: the result of ``merge`` does not depend on it. ``e`` [..., Q, H, K] is kept on request (the indexer's
    training target needs the main attention's probabilities).
    """

    out: torch.Tensor
    m: torch.Tensor
    s: torch.Tensor
    e: torch.Tensor | None = None

    @staticmethod
    def empty(q: torch.Tensor) -> "Partial":
        """A key set with no key for any of these queries [..., Q, H, c]."""
        m = q.new_full(q.shape[:-1], _MASKED)
        return Partial(torch.zeros_like(q), m, torch.zeros_like(m))

    @staticmethod
    def cat(parts: list["Partial"]) -> "Partial":
        """Partials of consecutive query rows (dim 1) as one, without their ``e``."""
        return Partial(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("out", "m", "s")))

    def rows(self, a: int, z: int) -> Partial:
        """The queries [a, z) of the query axis (dim 1: [B, Q, ...])."""
        return Partial(self.out[:, a:z], self.m[:, a:z], self.s[:, a:z], None if self.e is None else self.e[:, a:z])


def attend(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, keep: bool = False) -> Partial:
    """One key set's ``Partial`` for queries q [..., Q, H, c] (float32, already scaled by 1/sqrt(c)).

    keys (the values too: one K=V head shared by every query head): [..., K, c] shared by the Q queries, or
    [..., Q, K, c] per query (CSA's gathered top-k). mask: bool, broadcastable to [..., Q, K], or None when every
    query sees every key (two masking passes saved). K must be > 0. Differentiable in q and keys; backward
    recomputes the weights (flash attention's trade), so no [..., Q, H, K] tensor is stored.
    """
    # the math in q's dtype (float32, DESIGN: numerics) also under bf16 autocast, whose casts would otherwise
    # reach the forward's products but not the backward's (which runs outside autocast)
    with torch.autocast(q.device.type, enabled=False):
        out, m, s, e = _Attend.apply(q, keys.to(q.dtype), mask, keys.dim() == q.dim() - 1)
    return Partial(out, m, s, e if keep else None)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., rows, inner] @ b [..., inner, cols] with equal leading dims, as one 3-d ``bmm`` (for the many small
    products of per-query keys, where it is faster on CPU than ``matmul``'s 4-d path)."""
    lead = a.shape[:-2]
    return torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])).view(*lead, a.shape[-2], -1)


def _logits(q: torch.Tensor, keys: torch.Tensor, shared: bool) -> torch.Tensor:
    if shared:
        *lead, nq, h, c = q.shape
        return torch.matmul(q.reshape(*lead, nq * h, c), keys.transpose(-1, -2)).view(*lead, nq, h, -1)
    return _bmm(q, keys.transpose(-1, -2))


def _weighted(w: torch.Tensor, keys: torch.Tensor, shared: bool) -> torch.Tensor:
    """sum_j w[..., j] keys[j]: w [..., Q, H, K] -> [..., Q, H, c]."""
    if shared:
        *lead, nq, h, k = w.shape
        return torch.matmul(w.reshape(*lead, nq * h, k), keys).view(*lead, nq, h, -1)
    return _bmm(w, keys)


def _keys_grad(w: torch.Tensor, x: torch.Tensor, shared: bool) -> torch.Tensor:
    """sum over queries (and heads) of w[..., j] x: w [..., Q, H, K], x [..., Q, H, c] -> the keys' shape."""
    if shared:
        *lead, nq, h, k = w.shape
        return torch.matmul(w.reshape(*lead, nq * h, k).transpose(-1, -2), x.reshape(*lead, nq * h, -1))
    return _bmm(w.transpose(-1, -2), x)


def _weights(q, keys, mask, m, shared):
    """e = exp(z - m) of the unmasked keys (0 for masked ones), its argument floored at ``_EXP_FLOOR``."""
    z = _logits(q, keys, shared)
    drop = None if mask is None else ~mask.unsqueeze(-2)
    if drop is not None:
        z.masked_fill_(drop, _MASKED)
    if m is None:
        m = z.amax(-1)
    e = z.sub_(m.unsqueeze(-1)).clamp_min_(_EXP_FLOOR).exp_()
    return (e if drop is None else e.masked_fill_(drop, 0.0)), m


class _Attend(torch.autograd.Function):
    """attend's math with a recomputing backward: saves q, keys, mask and the shift m; returns (out, m, s, e),
    m and e without gradient (e only for the indexer's target)."""

    @staticmethod
    def forward(ctx, q, keys, mask, shared):
        e, m = _weights(q, keys, mask, None, shared)
        out = _weighted(e, keys, shared)
        ctx.save_for_backward(q, keys, mask, m)
        ctx.shared = shared
        ctx.mark_non_differentiable(m, e)
        return out, m, e.sum(-1), e

    @staticmethod
    def backward(ctx, d_out, d_m, d_s, d_e):
        q, keys, mask, m = ctx.saved_tensors
        shared = ctx.shared
        e, _ = _weights(q, keys, mask, m, shared)
        # out = sum_j e_j v_j, s = sum_j e_j, e_j = exp(z_j - m) with z_j = q . k_j (m a constant)
        d_w = _logits(d_out, keys, shared)  # d out / d e_j = v_j
        if d_s is not None:
            d_w = d_w + d_s.unsqueeze(-1)
        d_z = d_w.mul_(e)  # masked keys have e = 0
        d_q = _weighted(d_z, keys, shared) if ctx.needs_input_grad[0] else None
        d_keys = None
        if ctx.needs_input_grad[1]:
            d_keys = _keys_grad(d_z, q, shared) + _keys_grad(e, d_out, shared)  # as keys, then as values
        return d_q, d_keys, None, None


def merge(parts: list[Partial], sinks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One softmax over every key set of ``parts`` plus the per-head sink logit: the normalized output
    [..., Q, H, c] and, per part, the factor [..., Q, H] that turns its ``e`` into probabilities."""
    sink = upcast(sinks)
    shift = sink.detach().expand_as(parts[0].m)
    for p in parts:
        shift = torch.maximum(shift, p.m)
    den = torch.exp(sink - shift)
    num = 0.0
    factors = []
    for p in parts:
        w = torch.exp((p.m - shift).clamp_min(_EXP_FLOOR))
        num = num + p.out * w.unsqueeze(-1)
        den = den + p.s * w
        factors.append(w)
    return num / den.unsqueeze(-1), [w / den for w in factors]


def flat_rows(idx: torch.Tensor, t: int) -> torch.Tensor:
    """Entry indices idx [B, ...] into each row's T entries -> rows of the flattened entries [B T, c]."""
    b = idx.shape[0]
    return idx + (torch.arange(b, device=idx.device) * t).view(b, *[1] * (idx.dim() - 1))


def gather_rows(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows [...] of flat [B T, c] as [..., c]: one gather of the shared K=V serves every head."""
    return flat.index_select(0, rows.flatten()).view(*rows.shape, flat.shape[-1])
