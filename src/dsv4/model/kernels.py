"""Attention math. The reference path: plain, dense, masked; written to be read, not to be fast.

One softmax over every key a query may use (window keys and compressed entries alike) plus a per-head sink logit
that adds to the denominator only (spec 2.2.6).
"""

from __future__ import annotations

import torch


def reference_attention(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """q [B, S, H, c]; keys [B, K, c] (K = V, one shared head); mask [B or 1, S, K] bool; sinks [H].

    Returns [B, S, H, c] in q's dtype. Softmax in float32.
    """
    logits = torch.einsum("bshc,bkc->bhsk", q.float(), keys.float()) * scale
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(logits.shape[0], -1, logits.shape[2], 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bhsk,bkc->bshc", probs, keys.float()).to(q.dtype)


_MASKED = -1e30  # a finite "minus infinity": a fully masked key set then weighs exactly 0, and backward stays finite


def sparse_attention_chunk(q: torch.Tensor, window_keys: torch.Tensor, window_mask: torch.Tensor,
                           comp_keys: torch.Tensor | None, comp_mask: torch.Tensor | None, sinks: torch.Tensor,
                           scale: float, comp_probs: list | None = None) -> torch.Tensor:
    """Attention of a chunk of queries over its own keys only; the fast path's core.

    q [B, Q, H, c]; window_keys [B, Kw, c] with window_mask [B or 1, Q, Kw];
    comp_keys either shared by the chunk [B, Kc, c] (HCA) or gathered per query [B, Q, Kc, c] (CSA top-k), with
    comp_mask [B or 1, Q, Kc]. One softmax over window keys, compressed keys and the sink, assembled from the
    log-sum-exp of each key set (no concatenation): p_j = exp(z_j - L), L = log(sum_w e^z + sum_c e^z + e^sink).
    Returns [B, Q, H, c]; logits and softmax in float32. With a ``comp_probs`` list, the probabilities of the
    compressed keys summed over heads [B, Q, Kc] are appended to it (the indexer's training target).
    """
    b, nq, h, c = q.shape
    qf = q.float()
    flat = qf.reshape(b, nq * h, c)
    wk = window_keys.float()
    lw = (torch.matmul(flat, wk.transpose(1, 2)).view(b, nq, h, -1) * scale)
    lw = lw.masked_fill(~window_mask.unsqueeze(2), _MASKED)
    total = torch.logaddexp(torch.logsumexp(lw, dim=-1), sinks.float().view(1, 1, h))
    lc = None
    if comp_keys is not None and comp_keys.shape[-2] > 0:
        ck = comp_keys.float()
        if ck.dim() == 3:
            lc = torch.matmul(flat, ck.transpose(1, 2)).view(b, nq, h, -1)
        else:
            lc = torch.matmul(qf, ck.transpose(-1, -2))  # [B, Q, H, Kc]
        lc = (lc * scale).masked_fill(~comp_mask.unsqueeze(2), _MASKED)
        total = torch.logaddexp(total, torch.logsumexp(lc, dim=-1))
    total = total.unsqueeze(-1)
    pw = torch.exp(lw - total)
    out = torch.matmul(pw.view(b, nq * h, -1), wk).view(b, nq, h, c)
    if lc is not None:
        pc = torch.exp(lc - total)
        if comp_probs is not None:
            comp_probs.append(pc.detach().sum(2))
        if ck.dim() == 3:
            out = out + torch.matmul(pc.view(b, nq * h, -1), ck).view(b, nq, h, c)
        else:
            out = out + torch.matmul(pc, ck)
    return out.to(q.dtype)
