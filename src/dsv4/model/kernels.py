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
