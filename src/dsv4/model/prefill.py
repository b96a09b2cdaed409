"""The fast attention path of prefill and training: each query against only the keys it can use, nothing of shape
sequence x sequence built. The window band in blocks of ``window_block`` queries (all blocks of a span in one batched
matmul); HCA's visible entries per span; CSA per block of ``chunk`` queries: the indexer scored, each query's top-k
entries gathered (one gather serves every head). The key sets are joined in one softmax by ``kernels.merge``; in
training with indexer training on, the indexer's KL loss and recall are gathered on the way. Tests hold it to
``dsv4.model.reference``, outputs and gradients.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dsv4.model import fused, kernels
from dsv4.model.indexer import (IndexerStats, chunk_scores, indexer_kl, indexer_recall, select_topk, topk_lower_index,
                                visible_entries)
from dsv4.model.precision import upcast
from dsv4.model.reference import window_visible


# CSA blocks of a prefill (one document, no autograd) whose queries see at least this many entries pick their top-k
# through ``select_topk`` (scores tile by tile, no [Q, H, T] dots; a top-k over groups' maxima, then over the best
# groups' entries) instead of ``chunk_scores`` and a top-k over every score
SELECT_MIN_ENTRIES = 8192
# a CSA block whose top-k is every visible entry (contexts up to rate x top-k: 2K tokens on V4's shapes) attends the
# entries in place, in index order, as the dense phase does: no top-k, no gather (a training step of the small
# preset at 2K, batch 2: 17.8-18.6 s against 20.2); off, such a block takes the gathered form (its reference)
ALL_PICKED_IN_PLACE = True


def _gathered_attend(q, entries, rows, mask, keep) -> kernels.Partial:
    """CSA's core for a few queries q [B, Q, H, c]: gather each query's chosen entries (rows [B, Q, k] of the
    flattened entries [B T, c]) and attend to them."""
    return kernels.attend(q, kernels.gather_rows(entries, rows), mask, keep)


def fast(attn, x, q, kv, q_latent, positions, cache, packing, collect: list | None = None) -> torch.Tensor:
    """Each query against only the keys it can use, nothing of shape sequence x sequence built: the window band
    in blocks of ``window_block`` queries (all blocks of a span in one batched matmul), HCA's visible entries per span,
    CSA per block: the indexer scored, each query's top-k entries gathered (one gather serves every head). The
    key sets are joined in one softmax by ``kernels.merge``."""
    s = q.shape[1]
    dev = q.device
    qs = upcast(q) * attn.scale
    # window keys in coordinate order: the cache's ring (oldest first, empty slots at -1), then these tokens
    wk, wpos = kv, positions
    if packing is not None:
        wpos = torch.arange(s, device=dev)  # row coordinates; documents are kept apart by doc ids
        coord = wpos
    else:
        coord = positions
        if cache is not None:
            old_kv, old_pos = cache.window_keys()
            if old_kv is not None:
                order = torch.argsort(old_pos)
                wk = torch.cat([old_kv[:, order].to(kv.dtype), kv], dim=1)
                wpos = torch.cat([old_pos[order], positions])
            cache.write_window(kv, positions)
    offset = wk.shape[1] - s
    wk = upcast(wk)
    comp = keys_t = qi = wi = None
    if attn.compressor is not None:
        comp = attn.compressor.entries(x, attn.rotary, cache.compressor if cache is not None else None, packing)
    if attn.indexer is not None:
        # detached inputs: the indexer learns only from its KL loss, and that loss reaches nothing else
        xd, qd = x.detach(), q_latent.detach()
        index_keys = attn.indexer.keys(xd, attn.rotary, cache.indexer if cache is not None else None, packing)
        qi, wi = attn.indexer.queries(xd, qd, positions, attn.rotary)
        keys_t = upcast(index_keys).transpose(1, 2)  # [B, c, T]: each block's scores read a prefix
        if s > attn.chunk:  # several blocks: one contiguous copy makes every prefix a plain strided operand
            keys_t = keys_t.contiguous()
    # in training mode only: validation and generation never pay for the indexer's loss
    stats = IndexerStats() if attn._tracks_indexer() and collect is not None else None
    if stats is not None:
        collect.append(stats)
    q_doc = packing.doc if packing is not None else None
    span = max(attn.chunk, attn.span // attn.chunk * attn.chunk)
    outs = []
    for g0 in range(0, s, span):
        g1 = min(s, g0 + span)
        window = _window_part(attn, qs, wk, wpos, coord, offset, g0, g1, q_doc)
        if comp is None:
            outs.append(kernels.merge([window], attn.attn_sink)[0])
        elif attn.indexer is None or (not attn.sparse and stats is None):  # HCA, or CSA's dense-phase eval
            entries = _entries_part(attn, qs, comp, coord, positions, q_doc, g0, g1)
            outs.append(kernels.merge([window, entries], attn.attn_sink)[0])
        else:
            for r0, r1, part, scores, cmask in _csa_parts(attn, qs, comp, keys_t, qi, wi, coord, positions,
                                                               q_doc, g0, g1, stats is not None):
                out, factors = kernels.merge([window.rows(r0 - g0, r1 - g0), part], attn.attn_sink)
                outs.append(out)
                if stats is not None and part.e is not None:
                    _indexer_stats(attn, stats, part.e * factors[1].unsqueeze(-1), scores, cmask)
    return torch.cat(outs, dim=1).to(q.dtype)


def _window_part(attn, qs, wk, wpos, coord, offset, g0, g1, q_doc) -> kernels.Partial:
    """The window band of queries [g0, g1): block i of ``window_block`` queries sees the
    ``window_block + window - 1`` keys ending at its last query; every block's logits in one batched matmul."""
    b, _, h, c = qs.shape
    n = g1 - g0
    if q_doc is None and fused.serves(qs, wk):  # each query's window rows read in place, one pass
        return _window_fused(attn, qs, wk, wpos, coord, offset, g0, g1)
    nq, w = min(attn.window_block, n), attn.window  # a short call (decoding: one query) is one block of its own
    nb = -(-n // nq)
    width = nq + w - 1
    lo, need = offset + g0 - (w - 1), nb * nq + w - 1  # key rows [lo, lo + need) of wk, zero-padded outside
    a, z = max(lo, 0), min(lo + need, wk.shape[1])
    keys = F.pad(wk[:, a:z], (0, 0, a - lo, lo + need - z)).unfold(1, width, nq)  # [B, nb, c, width]
    kpos = F.pad(wpos[a:z], (a - lo, lo + need - z), value=-1).unfold(0, width, nq)  # [nb, width]
    t = F.pad(coord[g0:g1], (0, nb * nq - n), value=-1).view(nb, nq, 1)
    kp = kpos.unsqueeze(1)
    mask = window_visible(kp, t, w)  # [nb, Q, width]; padding: positions -1
    if q_doc is not None:  # packed: no cache, so key rows are query rows
        kdoc = F.pad(q_doc[:, a:z], (a - lo, lo + need - z), value=-1).unfold(1, width, nq)
        qdoc = F.pad(q_doc[:, g0:g1], (0, nb * nq - n), value=-2).view(b, nb, nq, 1)
        mask = mask & (kdoc.unsqueeze(2) == qdoc)
    qb = F.pad(qs[:, g0:g1], (0, 0, 0, 0, 0, nb * nq - n)).view(b, nb, nq, h, c)
    p = kernels.attend(qb, keys.transpose(-1, -2), mask)
    return kernels.Partial(p.out.flatten(1, 2)[:, :n], p.m.flatten(1, 2)[:, :n], p.s.flatten(1, 2)[:, :n])


def _window_fused(attn, qs, wk, wpos, coord, offset, g0, g1) -> kernels.Partial:
    """``_window_part`` by ``fused.sparse_attend``: query i's picks are the ``window`` key rows ending at its own
    (row offset + i of wk), masked by the window rule on their positions; without autograd, one document."""
    b, k_rows, c = wk.shape
    w = attn.window
    ends = torch.arange(offset + g0, offset + g1, device=qs.device).unsqueeze(-1)  # [Q, 1]
    rows = ends - (w - 1) + torch.arange(w, device=qs.device)  # [Q, W], below 0 before the first key
    safe = rows.clamp_min(0)
    mask = (rows >= 0) & window_visible(wpos[safe], coord[g0:g1].unsqueeze(-1), w)
    rows = kernels.flat_rows(safe.expand(b, -1, -1), k_rows)
    return kernels.Partial(*fused.sparse_attend(qs[:, g0:g1], wk.reshape(b * k_rows, c), rows,
                                                mask.expand(b, -1, -1)))


def _visible(attn, comp, coord, positions, q_doc, r0, r1) -> tuple[int, torch.Tensor | None]:
    """How many leading entries any query of [r0, r1) can see, and the visibility mask [B or 1, Q, that]."""
    tlim = int((comp.end <= coord[..., r0:r1].max()).sum(-1).max())
    if tlim == 0:
        return 0, None
    return tlim, visible_entries(positions[..., r0:r1], comp.local[:, :tlim], attn.rate,
                                 q_doc[:, r0:r1] if q_doc is not None else None,
                                 comp.doc[:, :tlim] if comp.doc is not None else None)


def _entries_part(attn, qs, comp, coord, positions, q_doc, r0, r1) -> kernels.Partial:
    """Every visible compressed entry (HCA; CSA in the dense phase), for queries [r0, r1)."""
    tlim, visible = _visible(attn, comp, coord, positions, q_doc, r0, r1)
    if tlim == 0:
        return kernels.Partial.empty(qs[:, r0:r1])
    return kernels.attend(qs[:, r0:r1], upcast(comp.kv[:, :tlim]), visible)


def _csa_parts(attn, qs, comp, keys_t, qi, wi, coord, positions, q_doc, g0, g1, keep):
    """CSA for queries [g0, g1), by blocks of ``chunk``: index scores, top-k, and a gather of the chosen entries
    (one for every head) for ``gather_rows`` queries at a time; in the dense phase (``sparse`` off) every
    visible entry. Yields (r0, r1, Partial of rows [r0, r1), their index scores and entry mask): per block, or
    with ``keep`` (the indexer's target) per gather."""
    b = qs.shape[0]
    entries = upcast(comp.kv)
    t = entries.shape[1]
    flat = entries.reshape(b * t, entries.shape[-1])
    for r0 in range(g0, g1, attn.chunk):
        r1 = min(g1, r0 + attn.chunk)
        qb = qs[:, r0:r1]
        if attn.sparse and comp.doc is None:
            tlim, visible = min(t, int(positions[r1 - 1] + 1) // attn.rate), None
        else:
            tlim, visible = _visible(attn, comp, coord, positions, q_doc, r0, r1)
        if tlim == 0:
            yield r0, r1, kernels.Partial.empty(qb), None, None
            continue
        k = min(attn.indexer.topk, tlim)
        if visible is None:  # sparse, one document: only the block's last entries are visible to some queries only
            first = min(tlim, int(positions[r0] + 1) // attn.rate)
            tail = visible_entries(positions[r0:r1], comp.local[:, first:tlim], attn.rate)
        if visible is None and tlim >= SELECT_MIN_ENTRIES and not keep and not torch.is_grad_enabled():
            # a long prefill: the same picks, its top-k over 1/16 of the scores and the best groups' entries
            scores, idx = select_topk(qi[:, r0:r1], wi[:, r0:r1], keys_t[:, :, :tlim], k,
                                      attn.indexer.round_scores if attn.indexer.bf16_scores else None, first, tail)
        else:
            scores = attn.indexer.round_scores(chunk_scores(qi[:, r0:r1], wi[:, r0:r1], keys_t[:, :, :tlim]))
            if not attn.sparse:
                yield r0, r1, kernels.attend(qb, entries[:, :tlim], visible, keep), scores, visible
                continue
            if visible is None:
                scores[..., first:tlim].masked_fill_(~tail, float("-inf"))
            else:
                scores = scores.masked_fill(~visible, float("-inf"))
            if k == tlim and ALL_PICKED_IN_PLACE:  # the top-k is every visible entry
                cmask = scores > float("-inf")
                yield r0, r1, kernels.attend(qb, entries[:, :tlim], cmask, keep), scores, cmask
                continue
            idx = topk_lower_index(scores, k)  # [B, Q, k]
            scores = scores.gather(-1, idx)
        cmask = scores > float("-inf")  # the picks that are visible (fewer than k visible: the rest are not)
        rows = kernels.flat_rows(idx, t)
        amask = None if bool(cmask.all()) else cmask  # past the first k entries every pick is visible
        if not keep and fused.serves(qb):  # one call for the block, each pick read once (_gathered_attend: its
            # reference; the indexer's target, kept, needs each pick's weight)
            yield r0, r1, kernels.Partial(*fused.sparse_attend(qb, flat, rows, amask)), scores, cmask
            continue
        # with autograd, the gathered keys (k c floats per query) are recomputed in backward, not stored
        recompute = torch.is_grad_enabled() and (qb.requires_grad or flat.requires_grad)
        parts = []
        for a in range(0, r1 - r0, attn.gather_rows):  # gathered keys [B, gather_rows, k, c] stay in cache
            z = min(r1 - r0, a + attn.gather_rows)
            args = (qb[:, a:z], flat, rows[:, a:z], None if amask is None else amask[:, a:z], keep)
            part = checkpoint(_gathered_attend, *args, use_reentrant=False) if recompute \
                else _gathered_attend(*args)
            if keep:  # the indexer's target needs each part's probabilities
                yield r0 + a, r0 + z, part, scores[:, a:z], cmask[:, a:z]
            else:
                parts.append(part)
        if parts:  # one merge per block: a merge is some twenty small ops
            yield r0, r1, kernels.Partial.cat(parts), scores, cmask


def _indexer_stats(attn, stats: IndexerStats, probs, scores, cmask) -> None:
    """Add the indexer's KL loss (and in the dense phase its recall) over some queries; ``probs`` [B, Q, H, K]
    are the main attention's probabilities of their candidate entries."""
    probs = probs.sum(2)  # heads summed [B, Q, K]
    kl, cnt = indexer_kl(probs, scores, cmask)
    stats.kl_sum, stats.kl_count = stats.kl_sum + kl, stats.kl_count + cnt
    if not attn.sparse:
        hits, cnt = indexer_recall(probs, scores, cmask, attn.indexer.topk)
        stats.hits, stats.recall_count = stats.hits + hits, stats.recall_count + cnt
