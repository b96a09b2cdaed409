"""The plain attention every fast path is tested against, written to be read: each query's keys (its window, then
the compressed entries it may use: HCA all visible ones, CSA the indexer's top-k of them) in one dense masked
softmax with the sink. ``window_visible`` is the window rule every path shares.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.
"""

from __future__ import annotations

import torch

from dsv4.cache import LayerCache
from dsv4.model.documents import Packing
from dsv4.model.indexer import topk_mask, visible_entries
from dsv4.model.precision import upcast


def window_visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int) -> torch.Tensor:
    """The window rule: the key at position p is visible to the query at t iff t - window < p <= t; empty slots of a
    ring hold p = -1 and are never visible. Broadcasts."""
    return (key_pos <= query_pos) & (key_pos > query_pos - window) & (key_pos >= 0)


def reference_attention(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """q [B, S, H, c]; keys [B, K, c] (the values too: one shared K=V head); mask [B or 1, S, K] bool; sinks [H].

    Returns [B, S, H, c] in q's dtype. Softmax in float32.
    """
    logits = torch.einsum("bshc,bkc->bhsk", upcast(q), upcast(keys)) * scale
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    sink = upcast(sinks).view(1, -1, 1, 1).expand(logits.shape[0], -1, logits.shape[2], 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bhsk,bkc->bshc", probs, upcast(keys)).to(q.dtype)


def window_keys(attn, kv: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None,
                packing: Packing | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Window keys [B, K, c] (the cache's ring, then these tokens) and their mask [B or 1, S, K]: key at p is
    visible to the query at t iff t - window < p <= t, in the same document."""
    if packing is not None:
        idx = torch.arange(kv.shape[1], device=kv.device)
        t, p = idx.unsqueeze(1), idx.unsqueeze(0)
        same_doc = packing.doc.unsqueeze(2) == packing.doc.unsqueeze(1)
        return kv, window_visible(p, t, attn.window).unsqueeze(0) & same_doc
    keys, key_pos = kv, positions
    if cache is not None:
        old_kv, old_pos = cache.window_keys()
        if old_kv is not None:
            keys = torch.cat([old_kv.to(kv.dtype), kv], dim=1)
            key_pos = torch.cat([old_pos, positions])
        cache.write_window(kv, positions)
    t, p = positions.unsqueeze(1), key_pos.unsqueeze(0)
    return keys, window_visible(p, t, attn.window).unsqueeze(0)


def reference(attn, x, q, kv, q_latent, positions, cache, packing) -> torch.Tensor:
    """Dense attention over every key with a [S, K] mask: the path written to be read."""
    keys, mask = window_keys(attn, kv, positions, cache, packing)

    if attn.compressor is not None:
        comp = attn.compressor.entries(x, attn.rotary, cache.compressor if cache is not None else None, packing)
        entries = comp.kv
        q_doc = packing.doc if packing is not None else None
        comp_mask = visible_entries(positions, comp.local, attn.rate, q_doc, comp.doc)
        if attn.indexer is not None:
            index_keys = attn.indexer.keys(x, attn.rotary, cache.indexer if cache is not None else None,
                                           packing)
            if attn.sparse:  # the dense phase attends to every visible entry
                scores = attn.indexer.scores(x, q_latent, positions, index_keys, attn.rotary)
                comp_mask = topk_mask(scores, comp_mask, attn.indexer.topk)
        keys = torch.cat([keys, entries.to(keys.dtype)], dim=1)
        rows = max(mask.shape[0], comp_mask.shape[0])
        mask = torch.cat([mask.expand(rows, -1, -1), comp_mask.expand(rows, -1, -1)], dim=-1)

    return reference_attention(q, keys, mask, attn.attn_sink, attn.scale)
