"""The attention block of the three layer types (spec 2): sliding window, CSA, HCA.

q: low-rank (wq_a -> weighted q_norm -> wq_b), then a weightless RMSNorm per head and RoPE on the trailing dims.
K = V: one shared head, wkv -> weighted kv_norm -> RoPE. Keys of a query: the window (the last ``sliding_window``
positions, itself included), plus for HCA every visible compressed entry, plus for CSA the indexer's top-k visible
entries. One softmax with a per-head sink; the output's rope dims are de-rotated at the query position; then the
grouped low-rank output projection (wo_a block-diagonal over ``o_groups`` groups of heads, then wo_b).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv4.cache import CompressorState, LayerCache
from dsv4.config import CSA, HCA, SLIDING, ModelConfig
from dsv4.model import kernels
from dsv4.model.compressor import Compressor
from dsv4.model.decode import LayerRows, attend_rows
from dsv4.model.indexer import (Indexer, IndexerStats, chunk_scores, indexer_kl, indexer_recall,
                                topk_lower_index, topk_mask, visible_entries)
from dsv4.model.linear import Linear
from dsv4.model.norm import RMSNorm, rms_normalize
from dsv4.model.packing import Packing
from dsv4.model.precision import compute_dtype, upcast
from dsv4.model.rope import RotaryEmbedding, apply_rope


def _flat_rows(idx: torch.Tensor, t: int) -> torch.Tensor:
    """Entry indices idx [B, ...] into each row's T entries -> rows of the flattened entries [B T, c]."""
    b = idx.shape[0]
    return idx + (torch.arange(b, device=idx.device) * t).view(b, *[1] * (idx.dim() - 1))


def _gather_rows(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows [...] of flat [N, c] as [..., c]: one gather of the shared K=V serves every head."""
    return flat.index_select(0, rows.flatten()).view(*rows.shape, flat.shape[-1])


def _gathered_attend(q, entries, rows, mask, keep) -> kernels.Partial:
    """CSA's core for a few queries q [B, Q, H, c]: gather each query's chosen entries (rows [B, Q, k] of the
    flattened entries [B T, c]) and attend to them."""
    return kernels.attend(q, _gather_rows(entries, rows), mask, keep)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        if layer_type not in (SLIDING, CSA, HCA):
            raise ValueError(f"unknown layer type {layer_type!r}")
        self.layer_type = layer_type
        self.rope_kind = config.rope_kind(layer_type)
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window
        self.groups = config.o_groups
        self.rate = config.compress_rate(layer_type)
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        d, h, c = config.hidden_size, self.n_heads, self.head_dim
        self.wq_a = Linear(d, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = Linear(config.q_lora_rank, h * c, bias=False)
        self.wkv = Linear(d, c, bias=False)
        self.kv_norm = RMSNorm(c, config.rms_norm_eps)
        # block-diagonal: row block j of wo_a maps the heads of group j (h c / g inputs) to o_lora_rank outputs
        self.wo_a = Linear(h * c // self.groups, self.groups * config.o_lora_rank, bias=False)
        self.wo_b = Linear(self.groups * config.o_lora_rank, d, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(h))
        self.compressor = None
        self.indexer = None
        if layer_type != SLIDING:
            self.compressor = Compressor(d, c, self.rate, overlap=layer_type == CSA, eps=config.rms_norm_eps)
        if layer_type == CSA:
            self.indexer = Indexer(config)
        self.rotary = RotaryEmbedding(config)
        # "fast" (default); "reference": the plain dense-mask path the fast one is tested against; "dense": the
        # benchmarks' baseline, plain causal MQA over every past token (no window, no compression, no sinks)
        self.impl = "fast"
        self.chunk = 256  # queries per block of CSA's indexer and top-k in the fast path (its matmul: M = 8 chunk)
        # queries per block of the window band: a block of nq queries reads nq + window - 1 keys, so small blocks
        # waste less (32: about 1.7x faster than 128 on CPU)
        self.window_block = 32
        self.span = 2048  # queries per span: the window band of a span's blocks is one batched matmul
        self.gather_rows = 16  # CSA: queries whose top-k entries are gathered at once (small: they stay in cache)
        self.decode_tokens = 16  # cached calls of at most this many tokens take ``decode`` (decoding, draft checks)
        # CSA training switches (spec 6.6): sparse=False attends to every visible compressed entry (the dense
        # phase); with indexer_training on, a forward in training mode leaves the indexer's KL loss and recall in
        # indexer_stats
        self.sparse = True
        self.indexer_training = False
        self.indexer_stats: IndexerStats | None = None

    def new_cache(self) -> LayerCache:
        return LayerCache(window=self.window,
                          compressor=CompressorState() if self.compressor is not None else None,
                          indexer=CompressorState() if self.indexer is not None else None)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None,
                packing: Packing | None = None) -> torch.Tensor:
        """x [B, S, d] (the normed block input); positions [S] absolute (ignored with a ``packing``, whose
        per-document positions are used); returns [B, S, d]."""
        b, s, _ = x.shape
        if packing is not None:
            if cache is not None:
                raise ValueError("packed documents are for full forwards, not for cached decoding")
            positions = packing.pos
        cos, sin = self.rotary.cos_sin(positions, self.rope_kind, compute_dtype(x.dtype))
        cos_h, sin_h = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(b, s, self.n_heads, self.head_dim)
        q = apply_rope(rms_normalize(q, self.eps).to(q.dtype), cos_h, sin_h)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if self.impl == "reference":
            out = self.reference(x, q, kv, q_latent, positions, cache, packing)
        elif self.impl == "dense":
            out = self.dense_baseline(q, kv, cache, packing)
        elif isinstance(cache, LayerRows):  # rows at their own positions (dsv4.model.decode)
            out = attend_rows(self, x, q, kv, q_latent, positions, cache)
        elif s <= self.decode_tokens and cache is not None and not self._tracks_indexer():
            out = self.decode(x, q, kv, q_latent, positions, cache)
        else:
            out = self.fast(x, q, kv, q_latent, positions, cache, packing)
        out = apply_rope(out, cos_h, sin_h, inverse=True)
        return self.project_out(out)

    def reference(self, x, q, kv, q_latent, positions, cache, packing) -> torch.Tensor:
        """Dense attention over every key with a [S, keys] mask: the path written to be read."""
        keys, mask = self.window_keys(kv, positions, cache, packing)

        if self.compressor is not None:
            comp = self.compressor.entries(x, self.rotary, cache.compressor if cache is not None else None, packing)
            entries = comp.kv
            q_doc = packing.doc if packing is not None else None
            comp_mask = visible_entries(positions, comp.local, self.rate, q_doc, comp.doc)
            if self.indexer is not None:
                index_keys = self.indexer.keys(x, self.rotary, cache.indexer if cache is not None else None,
                                               packing)
                if self.sparse:  # the dense phase attends to every visible entry
                    scores = self.indexer.scores(x, q_latent, positions, index_keys, self.rotary)
                    comp_mask = topk_mask(scores, comp_mask, self.indexer.topk)
            keys = torch.cat([keys, entries.to(keys.dtype)], dim=1)
            rows = max(mask.shape[0], comp_mask.shape[0])
            mask = torch.cat([mask.expand(rows, -1, -1), comp_mask.expand(rows, -1, -1)], dim=-1)

        return kernels.reference_attention(q, keys, mask, self.attn_sink, self.scale)

    def fast(self, x, q, kv, q_latent, positions, cache, packing) -> torch.Tensor:
        """Each query against only the keys it can use, nothing of shape sequence x sequence built: the window band
        in blocks of ``chunk`` queries (all blocks of a span in one batched matmul), HCA's visible entries per span,
        CSA per block: the indexer scored, each query's top-k entries gathered (one gather serves every head). The
        key sets are joined in one softmax by ``kernels.merge``."""
        s = q.shape[1]
        dev = q.device
        qs = upcast(q) * self.scale
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
        if self.compressor is not None:
            comp = self.compressor.entries(x, self.rotary, cache.compressor if cache is not None else None, packing)
        if self.indexer is not None:
            # detached inputs: the indexer learns only from its KL loss, and that loss reaches nothing else
            xd, qd = x.detach(), q_latent.detach()
            index_keys = self.indexer.keys(xd, self.rotary, cache.indexer if cache is not None else None, packing)
            qi, wi = self.indexer.queries(xd, qd, positions, self.rotary)
            keys_t = upcast(index_keys).transpose(1, 2)  # [B, c, T]: each block's scores read a prefix
            if s > self.chunk:  # several blocks: one contiguous copy makes every prefix a plain strided operand
                keys_t = keys_t.contiguous()
        # in training mode only: validation and generation never pay for the indexer's loss
        stats = IndexerStats() if self._tracks_indexer() else None
        self.indexer_stats = stats
        q_doc = packing.doc if packing is not None else None
        span = max(self.chunk, self.span // self.chunk * self.chunk)
        outs = []
        for g0 in range(0, s, span):
            g1 = min(s, g0 + span)
            window = self._window_part(qs, wk, wpos, coord, offset, g0, g1, q_doc)
            if comp is None:
                outs.append(kernels.merge([window], self.attn_sink)[0])
            elif self.indexer is None or (not self.sparse and stats is None):  # HCA, or CSA's dense-phase eval
                entries = self._entries_part(qs, comp, coord, positions, q_doc, g0, g1)
                outs.append(kernels.merge([window, entries], self.attn_sink)[0])
            else:
                for r0, r1, part, scores, cmask in self._csa_parts(qs, comp, keys_t, qi, wi, coord, positions,
                                                                   q_doc, g0, g1, stats is not None):
                    out, factors = kernels.merge([window.rows(r0 - g0, r1 - g0), part], self.attn_sink)
                    outs.append(out)
                    if stats is not None and part.e is not None:
                        self._indexer_stats(stats, part.e * factors[1].unsqueeze(-1), scores, cmask)
        return torch.cat(outs, dim=1).to(q.dtype)

    def _tracks_indexer(self) -> bool:
        """Whether a forward now reports the indexer's KL loss and recall (CSA, indexer training, training mode)."""
        return self.indexer is not None and self.indexer_training and self.training

    def decode(self, x, q, kv, q_latent, positions, cache: LayerCache) -> torch.Tensor:
        """The fast path for a few new tokens per row with a cache (decoding; a speculative draft's check) in a few
        batched ops, where the general one spends some hundred small ops on blocks, masks and merges. One softmax
        per query joins its window (the ring before this call's writes, plus the new tokens up to its own; for one
        token, the ring after its write, unmasked once full), its visible entries (HCA and CSA's dense phase: all;
        CSA: the indexer's top-k of them) and the sink. Tests hold it to the reference path, outputs and
        gradients."""
        b, s, h, c = q.shape
        t = positions.unsqueeze(-1)  # [s, 1]
        if s == 1 and not kv.requires_grad:  # once this token is written, the ring holds exactly its window (slot
            # order does not matter); with autograd the ring's detached copy would cut the new key's gradient
            cache.write_window(kv, positions)
            keys, kpos = cache.window_keys()
            keys = upcast(keys)
            # empty slots hold -1; on a GPU the position is not read back (a wait on the device per layer)
            full = positions.device.type == "cpu" and int(positions[0]) >= self.window - 1
            mask = None if full else (kpos >= 0).unsqueeze(0)
        else:
            ring, ring_pos = cache.window_keys()  # [B, W, c] before this call's writes
            keys, kpos = upcast(kv), positions
            if ring is not None:
                keys, kpos = torch.cat([upcast(ring), keys], dim=1), torch.cat([ring_pos, positions])
            mask = (kpos <= t) & (kpos > t - self.window) & (kpos >= 0)  # [s, window keys]; empty slots at -1
            cache.write_window(kv, positions)
        own = None  # CSA's top-k: each query's own entries [B, s, k, c] and which of them it may use
        if self.compressor is not None:
            entries = upcast(self.compressor.all_entries(x, self.rotary, cache.compressor))  # [B, T, c]
            n = entries.shape[1]

            def visible() -> torch.Tensor:  # [s, n]: one query sees every entry emitted so far
                return torch.arange(n, device=q.device) < torch.div(t + 1, self.rate, rounding_mode="floor")

            if self.indexer is not None:  # its keys advance even when unused (dense phase, no entry yet)
                xd, qd = x.detach(), q_latent.detach()
                index_keys = self.indexer.keys(xd, self.rotary, cache.indexer)
                if self.sparse and n > self.indexer.topk:
                    qi, wi = self.indexer.queries(xd, qd, positions, self.rotary)
                    scores = chunk_scores(qi, wi, upcast(index_keys).transpose(1, 2))  # [B, s, T]
                    if s > 1:  # the last queries see entries that the first do not
                        scores = scores.masked_fill(~visible(), float("-inf"))
                    idx = topk_lower_index(scores, self.indexer.topk)  # [B, s, k]
                    picked = _gather_rows(entries.reshape(b * n, c), _flat_rows(idx, n)).view(b, s, -1, c)
                    # one query sees every entry emitted so far, so each of its k > n picks is visible
                    own = picked, None if s == 1 else scores.gather(-1, idx) > float("-inf")
            if own is None:
                keys = torch.cat([keys, entries], dim=1)
                if mask is not None:
                    mask = torch.cat([mask.expand(s, -1), visible().expand(s, -1)], dim=-1)
        qs = upcast(q) * self.scale
        if own is None:  # one key set for every query: [B, s H, c] x [B, c, L]
            logits = torch.matmul(qs.reshape(b, s * h, c), keys.transpose(1, 2)).view(b, s, h, -1)
            mask = None if mask is None else mask.unsqueeze(-2)  # [s, 1, L]
        else:  # each query its own keys: the window's, then its top-k entries
            keys = torch.cat([keys.unsqueeze(1).expand(b, s, -1, c), own[0]], dim=2)  # [B, s, L, c]
            if mask is not None or own[1] is not None:
                picks = own[1] if own[1] is not None else mask.new_ones(1, 1, own[0].shape[2]).expand(b, s, -1)
                mask = torch.cat([mask.expand(b, s, -1), picks], dim=-1).unsqueeze(-2)  # [B, s, 1, L]
            logits = torch.bmm(qs.reshape(b * s, h, c), keys.reshape(b * s, -1, c).transpose(1, 2)).view(b, s, h, -1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        sink = upcast(self.attn_sink).view(1, 1, h, 1).expand(b, s, h, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        if own is None:
            out = torch.matmul(probs.reshape(b, s * h, -1), keys)
        else:
            out = torch.bmm(probs.reshape(b * s, h, -1), keys.reshape(b * s, -1, c))
        return out.view(b, s, h, c).to(q.dtype)

    def _window_part(self, qs, wk, wpos, coord, offset, g0, g1, q_doc) -> kernels.Partial:
        """The window band of queries [g0, g1): block i of ``window_block`` queries sees the
        ``window_block + window - 1`` keys ending at its last query; every block's logits in one batched matmul."""
        b, _, h, c = qs.shape
        n = g1 - g0
        nq, w = min(self.window_block, n), self.window  # a short call (decoding: one query) is one block of its own
        nb = -(-n // nq)
        width = nq + w - 1
        lo, need = offset + g0 - (w - 1), nb * nq + w - 1  # key rows [lo, lo + need) of wk, zero-padded outside
        a, z = max(lo, 0), min(lo + need, wk.shape[1])
        keys = F.pad(wk[:, a:z], (0, 0, a - lo, lo + need - z)).unfold(1, width, nq)  # [B, nb, c, width]
        kpos = F.pad(wpos[a:z], (a - lo, lo + need - z), value=-1).unfold(0, width, nq)  # [nb, width]
        t = F.pad(coord[g0:g1], (0, nb * nq - n), value=-1).view(nb, nq, 1)
        kp = kpos.unsqueeze(1)
        mask = (kp <= t) & (kp > t - w) & (kp >= 0)  # [nb, Q, width]; padding: positions -1
        if q_doc is not None:  # packed: no cache, so key rows are query rows
            kdoc = F.pad(q_doc[:, a:z], (a - lo, lo + need - z), value=-1).unfold(1, width, nq)
            qdoc = F.pad(q_doc[:, g0:g1], (0, nb * nq - n), value=-2).view(b, nb, nq, 1)
            mask = mask & (kdoc.unsqueeze(2) == qdoc)
        qb = F.pad(qs[:, g0:g1], (0, 0, 0, 0, 0, nb * nq - n)).view(b, nb, nq, h, c)
        p = kernels.attend(qb, keys.transpose(-1, -2), mask)
        return kernels.Partial(p.out.flatten(1, 2)[:, :n], p.m.flatten(1, 2)[:, :n], p.s.flatten(1, 2)[:, :n])

    def _visible(self, comp, coord, positions, q_doc, r0, r1) -> tuple[int, torch.Tensor | None]:
        """How many leading entries any query of [r0, r1) can see, and the visibility mask [B or 1, Q, that]."""
        tlim = int((comp.end <= coord[..., r0:r1].max()).sum(-1).max())
        if tlim == 0:
            return 0, None
        return tlim, visible_entries(positions[..., r0:r1], comp.local[:, :tlim], self.rate,
                                     q_doc[:, r0:r1] if q_doc is not None else None,
                                     comp.doc[:, :tlim] if comp.doc is not None else None)

    def _entries_part(self, qs, comp, coord, positions, q_doc, r0, r1) -> kernels.Partial:
        """Every visible compressed entry (HCA; CSA in the dense phase), for queries [r0, r1)."""
        tlim, visible = self._visible(comp, coord, positions, q_doc, r0, r1)
        if tlim == 0:
            return kernels.Partial.empty(qs[:, r0:r1])
        return kernels.attend(qs[:, r0:r1], upcast(comp.kv[:, :tlim]), visible)

    def _csa_parts(self, qs, comp, keys_t, qi, wi, coord, positions, q_doc, g0, g1, keep):
        """CSA for queries [g0, g1), by blocks of ``chunk``: index scores, top-k, and a gather of the chosen entries
        (one for every head) for ``gather_rows`` queries at a time; in the dense phase (``sparse`` off) every
        visible entry. Yields (r0, r1, Partial of rows [r0, r1), their index scores and entry mask): per block, or
        with ``keep`` (the indexer's target) per gather."""
        b = qs.shape[0]
        entries = upcast(comp.kv)
        t = entries.shape[1]
        flat = entries.reshape(b * t, entries.shape[-1])
        for r0 in range(g0, g1, self.chunk):
            r1 = min(g1, r0 + self.chunk)
            qb = qs[:, r0:r1]
            if self.sparse and comp.doc is None:
                tlim, visible = min(t, int(positions[r1 - 1] + 1) // self.rate), None
            else:
                tlim, visible = self._visible(comp, coord, positions, q_doc, r0, r1)
            if tlim == 0:
                yield r0, r1, kernels.Partial.empty(qb), None, None
                continue
            scores = chunk_scores(qi[:, r0:r1], wi[:, r0:r1], keys_t[:, :, :tlim])
            if not self.sparse:
                yield r0, r1, kernels.attend(qb, entries[:, :tlim], visible, keep), scores, visible
                continue
            if visible is None:  # one document: only the block's last entries are visible to some queries only
                first = min(tlim, int(positions[r0] + 1) // self.rate)
                tail = visible_entries(positions[r0:r1], comp.local[:, first:tlim], self.rate)
                scores[..., first:tlim].masked_fill_(~tail, float("-inf"))
            else:
                scores = scores.masked_fill(~visible, float("-inf"))
            idx = topk_lower_index(scores, min(self.indexer.topk, tlim))  # [B, Q, k]
            scores = scores.gather(-1, idx)
            cmask = scores > float("-inf")  # the picks that are visible (fewer than k visible: the rest are not)
            rows = _flat_rows(idx, t)
            amask = None if bool(cmask.all()) else cmask  # past the first k entries every pick is visible
            # with autograd, the gathered keys (k c floats per query) are recomputed in backward, not stored
            recompute = torch.is_grad_enabled() and (qb.requires_grad or flat.requires_grad)
            parts = []
            for a in range(0, r1 - r0, self.gather_rows):  # gathered keys [B, rows, k, c] stay in cache
                z = min(r1 - r0, a + self.gather_rows)
                args = (qb[:, a:z], flat, rows[:, a:z], None if amask is None else amask[:, a:z], keep)
                part = checkpoint(_gathered_attend, *args, use_reentrant=False) if recompute \
                    else _gathered_attend(*args)
                if keep:  # the indexer's target needs each part's probabilities
                    yield r0 + a, r0 + z, part, scores[:, a:z], cmask[:, a:z]
                else:
                    parts.append(part)
            if parts:  # one merge per block: a merge is some twenty small ops
                yield r0, r1, kernels.Partial.cat(parts), scores, cmask

    def _indexer_stats(self, stats: IndexerStats, probs, scores, cmask) -> None:
        """Add the indexer's KL loss (and in the dense phase its recall) over some queries; ``probs`` [B, Q, H, K]
        are the main attention's probabilities of their candidate entries."""
        probs = probs.sum(2)  # heads summed [B, Q, K]
        kl, cnt = indexer_kl(probs, scores, cmask)
        stats.kl_sum, stats.kl_count = stats.kl_sum + kl, stats.kl_count + cnt
        if not self.sparse:
            hits, cnt = indexer_recall(probs, scores, cmask, self.indexer.topk)
            stats.hits, stats.recall_count = stats.hits + hits, stats.recall_count + cnt

    def dense_baseline(self, q, kv, cache, packing) -> torch.Tensor:
        """Causal MQA over every past token with PyTorch's SDPA; the cache keeps every K=V vector. Not V4: the
        baseline that V4's attention is measured against."""
        if packing is not None:
            raise ValueError("the dense baseline does not take packed documents")
        keys = kv
        if cache is not None:
            keys = cache.append_dense(kv)
        b, s, h, c = q.shape
        if s == 1:  # decoding: every key visible, so the heads fold into queries of the one K=V head (read once)
            k = keys.unsqueeze(1)
            return F.scaled_dot_product_attention(q.view(b, 1, h, c), k, k, scale=self.scale).view(b, 1, h, c)
        k = keys.unsqueeze(1).expand(b, h, keys.shape[1], c)
        qh = q.transpose(1, 2)
        if s == keys.shape[1]:
            out = F.scaled_dot_product_attention(qh, k, k, is_causal=True, scale=self.scale)
        else:  # queries are the last s of the keys
            t = torch.arange(keys.shape[1] - s, keys.shape[1], device=q.device)
            mask = torch.arange(keys.shape[1], device=q.device).unsqueeze(0) <= t.unsqueeze(1)
            out = F.scaled_dot_product_attention(qh, k, k, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2)

    def window_keys(self, kv: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None,
                    packing: Packing | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Window keys [B, K, c] (the cache's ring, then these tokens) and their mask [B or 1, S, K]: key at p is
        visible to the query at t iff t - window < p <= t, in the same document."""
        if packing is not None:
            idx = torch.arange(kv.shape[1], device=kv.device)
            t, p = idx.unsqueeze(1), idx.unsqueeze(0)
            same_doc = packing.doc.unsqueeze(2) == packing.doc.unsqueeze(1)
            return kv, ((p <= t) & (p > t - self.window)).unsqueeze(0) & same_doc
        keys, key_pos = kv, positions
        if cache is not None:
            old_kv, old_pos = cache.window_keys()
            if old_kv is not None:
                keys = torch.cat([old_kv.to(kv.dtype), kv], dim=1)
                key_pos = torch.cat([old_pos, positions])
            cache.write_window(kv, positions)
        t, p = positions.unsqueeze(1), key_pos.unsqueeze(0)
        return keys, ((p <= t) & (p > t - self.window) & (p >= 0)).unsqueeze(0)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """[B, S, H, c] -> grouped low-rank projection -> [B, S, d]."""
        b, s = out.shape[:2]
        grouped = out.reshape(b, s, self.groups, -1)
        w = self.wo_a.weight.view(self.groups, -1, grouped.shape[-1])  # [g, o_lora_rank, h c / g]
        low = torch.einsum("bsgi,goi->bsgo", grouped, w).reshape(b, s, -1)
        return self.wo_b(low)
