"""The lightning indexer of CSA layers (spec 2.7): its own compressed keys, ReLU scores weighted per head, causal top-k.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here H and c are the indexer's own heads and head dim (index_n_heads, index_head_dim).

I_{t,s} = sum_h w_{t,h} ReLU(q_{t,h} . K_s) with w = weights_proj(x) / sqrt(n_heads) and the dot product scaled by
1 / sqrt(head_dim). Entry s is a candidate for query t iff s < (t + 1) // rate (spec 2.5); top-k ties break toward the
lower index, and picks that are not candidates (fewer than k visible) are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.cache import CompressorState
from dsv4.config import CSA, ModelConfig
from dsv4.model import fused
from dsv4.model.compressor import Compressor
from dsv4.model.linear import Linear, threads
from dsv4.model.numerics import round_scores
from dsv4.model.precision import compute_dtype, upcast
from dsv4.model.rope import RotaryEmbedding, apply_rope


def visible_entries(q_pos: torch.Tensor, entry_local: torch.Tensor, rate: int,
                    q_doc: torch.Tensor | None = None, entry_doc: torch.Tensor | None = None) -> torch.Tensor:
    """[..., S, T] bool: entry w of a document is visible to the query at position t of the same document iff
    w < (t + 1) // rate, i.e. the entry's last source token is at or before t (spec 2.5).

    q_pos [..., S] positions within the document; entry_local [..., T] entry index within its document (-1: padding).
    """
    limit = torch.div(q_pos + 1, rate, rounding_mode="floor").unsqueeze(-1)
    e = entry_local.unsqueeze(-2)
    visible = (e >= 0) & (e < limit)
    if q_doc is not None:
        visible = visible & (entry_doc.unsqueeze(-2) == q_doc.unsqueeze(-1))
    return visible


def topk_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """[B, S, T] bool: the top-``k`` visible entries of each query (ties toward the lower index); reference path."""
    masked = scores.masked_fill(~visible, float("-inf"))
    k = min(k, scores.shape[-1])
    # a stable descending sort keeps equal scores in index order, so ties go to the lower index
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]
    chosen = torch.zeros_like(visible.expand_as(scores))
    chosen.scatter_(-1, order, True)
    return chosen & visible


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.topk = config.index_topk
        self.rate = config.compress_rate(CSA)
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(config.hidden_size, self.head_dim, self.rate, overlap=True,
                                     eps=config.rms_norm_eps)
        # FP4 simulation of the query / key path (spec 2.7, 6.4): Hadamard rotation, then MXFP4 fake quantization
        # with a straight-through gradient. Off by default (transformers omits it); dsv4.train.qat switches it.
        self.fp4_qk = False
        # official numerics (dsv4.model.numerics, rule 3): index scores rounded to BF16 before top-k
        self.bf16_scores = False

    def _fp4(self, t: torch.Tensor) -> torch.Tensor:
        if not self.fp4_qk:
            return t
        from dsv4.quant import fake_quant_fp4, hadamard

        return fake_quant_fp4(hadamard(upcast(t)))

    def round_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Index scores as top-k compares them: with ``bf16_scores`` rounded to BF16 (spec 2.7), so that scores
        within a BF16 step tie and the lower index wins. Every path that scores calls it before top-k."""
        return round_scores(scores) if self.bf16_scores else scores

    def keys(self, x: torch.Tensor, rotary: RotaryEmbedding, state: CompressorState | None,
             packing=None) -> torch.Tensor:
        """All indexer keys visible after these tokens [B, T, c] (advancing ``state`` if given)."""
        if packing is None:
            return self._fp4(self.compressor.all_entries(x, rotary, state))
        return self._fp4(self.compressor.entries(x, rotary, state, packing).kv)

    def queries(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor,
                rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer queries [B, S, H, c] (RoPE at the query position) and head weights [B, S, H], the latter
        carrying the 1/sqrt(H) and 1/sqrt(c) scales; float32."""
        b, s, _ = x.shape
        q = self.wq_b(q_latent).view(b, s, self.n_heads, self.head_dim)
        cos, sin = rotary.cos_sin(positions, "compress", compute_dtype(x.dtype))
        q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))  # positions [S] or [B, S]
        w = upcast(self.weights_proj(x)) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return self._fp4(upcast(q)), w

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
               rotary: RotaryEmbedding) -> torch.Tensor:
        """Index scores [B, S, T] of the queries against ``keys`` (float32, before masking); reference path."""
        q, w = self.queries(x, q_latent, positions, rotary)
        dots = torch.einsum("bshc,btc->bsht", q, upcast(keys))  # keys as ``keys()`` gives them
        scores = torch.einsum("bsht,bsh->bst", F.relu(dots), w) + 0.0  # + 0.0: -0.0 becomes +0.0 (tie rule)
        return self.round_scores(scores)


_SCORE_TILE = 512  # entries per matmul of a long chunk_scores call: a tile's [Q H, tile] dots stay in cache
# entries from which a decoding step's few queries are scored on every thread: one span of entries per thread in one
# bmm (a matmul of 8 rows runs on one core; docs/performance-notes.md)
_PARTS_MIN = 2048


def _kernel_scores(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor) -> bool:
    """Whether ``fused.index_scores`` takes these scores: ``fused.serves`` them and the keys are contiguous along
    the entries (a prefix of the cache's transposed keys)."""
    return fused.serves(q, w, keys_t) and keys_t.stride(-1) == 1


def _rows_kernel(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor) -> bool:
    """Whether ``fused.index_scores_rows`` takes these scores: a decoding step's few queries a row (up to 64
    query-heads), keys as a cache stores them (each entry's values contiguous), without autograd in float32 on the
    CPU, eager or in a compiled step (``fused.inference_serves``)."""
    return q.shape[1] * q.shape[2] <= 64 and keys_t.stride(-2) == 1 and fused.inference_serves(q, w, keys_t)


def chunk_scores(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
    """Index scores of a chunk of queries: q [B, Q, H, c], w [B, Q, H], keys transposed keys_t [B, c, T]
    -> [B, Q, T] float32.

    One matmul for all heads ([B, Q H, c] x [B, c, T]; keys given transposed so that a prefix of the entries is a
    plain strided operand), ReLU, then the weighted head sum as a batched matmul; for a block of 64 or more queries
    beyond 4 tiles of entries, tile by tile (the dots are read back from cache instead of memory; a few queries, as
    in decoding, are faster in one product). Without autograd, a few queries (up to 64 query-heads, batch 1)
    against ``_PARTS_MIN`` entries or more split the entries into one span per thread. Measurements:
    docs/performance-notes.md. Where ``fused.serves`` (inference on the CPU in float32), the tiled case (a prefill
    block) takes ``fused.index_scores``: the same scores in one pass, its dots kept in registers (on a quiet machine
    about as fast as the tiles' operators, which already run near the matmul peak; it writes no dots, and it did
    not lose its speed to other work on the CPU as they did); below the tiled case the kernel measured slower. A
    decoding step's few queries against keys as a cache stores them take ``fused.index_scores_rows`` there and in a
    compiled step: one query of 8 heads against 32K entries of 64, 0.47-0.60 ms against 0.95-1.35 for the
    operators in the same runs (their [c, T] view of the keys is what the matmul libraries handle worst).
    """
    if _rows_kernel(q, w, keys_t):  # a decoding step: the keys read in place, once for all heads
        return fused.index_scores_rows(q, w, keys_t.transpose(-1, -2))
    b, nq, h, c = q.shape
    qf, wf = q.reshape(b, nq * h, c), w.unsqueeze(-2)

    def scores(kt: torch.Tensor) -> torch.Tensor:
        if b == 1:
            dots = torch.mm(qf[0], upcast(kt[0])).view(1, nq, h, -1)
        else:
            dots = torch.matmul(qf, upcast(kt)).view(b, nq, h, -1)
        # in place: a fresh matmul result, which the matmul's backward does not need (relu's uses its own output)
        return torch.matmul(wf, dots.relu_()).squeeze(-2)

    t = keys_t.shape[-1]
    parts = threads()
    if b == 1 and nq * h <= 64 and t >= _PARTS_MIN and parts > 1 and not torch.is_grad_enabled() \
            and q.device.type == "cpu":  # a decoding step's few queries: the entries split across threads
        m = t // parts
        kt = upcast(keys_t[0, :, :m * parts].unflatten(1, (parts, m)).transpose(0, 1))  # [parts, c, m]
        dots = torch.bmm(qf[0].expand(parts, -1, -1), kt).view(parts, nq, h, m).relu_()
        out = torch.matmul(wf[0], dots).squeeze(-2).transpose(0, 1).reshape(1, nq, m * parts)  # [1, Q, m parts]
        if m * parts < t:
            out = torch.cat([out, scores(keys_t[..., m * parts:])], -1)
        return out + 0.0
    if t <= 4 * _SCORE_TILE or nq < 64:
        return scores(keys_t) + 0.0  # + 0.0: -0.0 becomes +0.0 (the tie rule compares bits)
    if _kernel_scores(q, w, keys_t):  # no [Q H, T] dots written
        return fused.index_scores(q, w, keys_t)
    return torch.cat([scores(keys_t[..., a:a + _SCORE_TILE]) for a in range(0, t, _SCORE_TILE)], -1) + 0.0


FUSED_TOPK_MIN = 1 << 14  # scores from which topk_lower_index takes fused.topk_lower where it serves


def topk_lower_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest scores, ties broken toward the lower index, exactly (fast path).

    One float ``topk``; rows where it had to choose among scores equal to its k-th (a finite tie at the boundary,
    rare) are chosen again by ``_topk_exact``. Without autograd on the CPU (``fused.serves``), ``fused.topk_lower``:
    one selection a row with the tie rule in it, the picks in index order; inside a compiled graph its operator
    too (a 32K-entry row: 82 us against 683 for ``_topk_exact``), ``_topk_exact`` where the kernel is not built.
    Ties among -inf (fewer than k visible) are not fixed: those picks are masked out by the caller whichever they
    are.
    """
    if torch.compiler.is_compiling():  # a compiled step has no data-dependent branch: every row exactly
        if fused.operators_serve(scores):
            return fused.topk_lower(scores, k)
        return _topk_exact(scores, k)
    if fused.serves(scores) and scores.numel() >= FUSED_TOPK_MIN:  # one selection a row, the tie rule in it
        return fused.topk_lower(scores, k)
    vals, idx = torch.topk(scores, k, dim=-1, sorted=False)
    kth = vals.amin(-1, keepdim=True)
    # the k picks are >= kth and the rest <= kth: more than k scores >= kth means one left out equals kth
    ties = (scores >= kth).sum(-1, dtype=torch.int32) > k
    if ties.any():  # rare: only then are ties among -inf (fewer than k visible) told from finite ones
        ties &= torch.isfinite(kth.squeeze(-1))
        if ties.any():
            idx[ties] = _topk_exact(scores[ties], k)
    return idx


_SELECT_TILE = 2048  # entries scored per matmul by select_topk: a tile's [H Q, tile] dots stay in cache
_SELECT_GROUP = 16  # select_topk ranks groups of this many entries by their maximum first


def select_topk(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, k: int, round_fn=None, tail_from: int = 0,
                tail_visible: torch.Tensor | None = None, tile: int = _SELECT_TILE
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` entries of a block of queries: the picks of ``topk_lower_index`` on ``chunk_scores`` (rounded
    by ``round_fn``, entries past ``tail_from`` masked to -inf where ``tail_visible`` [B or 1, Q, T - tail_from] is
    False), found without the [B, Q, H, T] dots and without a top-k over every score. q [B, Q, H, c], w [B, Q, H],
    keys_t [B, c, T]; returns (scores [B, Q, k], indices [B, Q, k]); inference only (no autograd).

    Scores are made by ``fused.index_scores`` where it serves, else tile by tile (one matmul of every head's queries
    against ``tile`` entries, ReLU and the weighted head sum in place), into a [B, Q, T'] buffer (T rounded up to
    ``_SELECT_GROUP`` G, padded with -inf). Entries are then grouped G to a group (group i: entries i, i + T'/G,
    ..., so that each group's maximum is an elementwise maximum of G contiguous rows) and the groups ranked by their
    maximum: when no group left out of the k best ties the k-th best maximum, every entry of a left-out group is
    below k entries (the k groups' maxima), so the top-k lies in the k best groups; the final top-k runs over their
    k G entries, laid out in index order, so ties go to the lower index. Rows whose k-th group maximum is tied
    (finite), rare, take ``topk_lower_index`` over all their scores. The top-k work is then 1/G of the scores plus k
    G per row, where a top-k over every score costs some 12 ns a score on one core. The scores are the reference's
    sum over heads of w ReLU(q . k) in another order, so they can differ from ``chunk_scores``' in the last bit;
    tests hold the two to the same picks on exactly representable inputs. Picks of -inf (fewer than k visible) are
    arbitrary, as ``topk_lower_index``'s are.
    """
    if torch.is_grad_enabled() and (q.requires_grad or w.requires_grad or keys_t.requires_grad):
        raise ValueError("select_topk is an inference path: call it without autograd")
    t = keys_t.shape[-1]
    if not 0 < k <= t:
        raise ValueError(f"select_topk: k must be in [1, {t}] (the entries), got {k}")
    g = _SELECT_GROUP
    b, nq, h, c = q.shape
    width = -(-t // g) * g
    s = q.new_empty(b, nq, width, dtype=compute_dtype(q.dtype))
    if _kernel_scores(q, w, keys_t):  # no dots written, no -0.0 made
        fused.index_scores(q, w, keys_t, out=s[..., :t])
    else:
        qh = upcast(q).transpose(1, 2).reshape(b, h * nq, c)  # head-major: each head's dots are contiguous
        wh = upcast(w).transpose(1, 2).unsqueeze(-1)  # [B, H, Q, 1]
        for a in range(0, t, tile):
            z = min(t, a + tile)
            dots = torch.matmul(qh, upcast(keys_t[..., a:z])).view(b, h, nq, z - a).relu_()
            out = torch.mul(dots[:, 0], wh[:, 0], out=s[..., a:z])
            for i in range(1, h):
                out.addcmul_(dots[:, i], wh[:, i])
        s[..., :t].add_(0.0)  # -0.0 becomes +0.0 (the tie rule compares bits)
    if round_fn is not None:
        s[..., :t] = round_fn(s[..., :t])
    if tail_visible is not None and t > tail_from:
        s[..., tail_from:t].masked_fill_(~tail_visible, float("-inf"))
    s[..., t:] = float("-inf")
    groups = width // g
    if groups <= k:  # as few groups as picks: every score is a candidate
        idx = topk_lower_index(s[..., :t], k)
        return s.gather(-1, idx), idx
    grouped = s.view(b, nq, g, groups)
    gmax = grouped.amax(2)  # [B, Q, groups]
    top, best = torch.topk(gmax, k, dim=-1, sorted=False)
    kth = top.amin(-1, keepdim=True)
    best = best.sort(-1).values
    cand = grouped.gather(3, best.unsqueeze(2).expand(b, nq, g, k)).view(b, nq, g * k)  # in index order
    j = topk_lower_index(cand, k)
    idx = (best.unsqueeze(2) + groups * torch.arange(g, device=s.device).view(g, 1)).view(b, nq, g * k).gather(-1, j)
    vals = cand.gather(-1, j)
    tied = ((gmax >= kth).sum(-1, dtype=torch.int32) > k) & torch.isfinite(kth.squeeze(-1))
    if tied.any():  # a group at the k-th maximum was left out: those rows over every score
        rows = s[..., :t][tied]
        ri = topk_lower_index(rows, k)
        idx[tied], vals[tied] = ri, rows.gather(-1, ri)
    return vals, idx.clamp_max_(t - 1)  # a -inf pick of the padding: an index in range


def _topk_exact(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_lower_index`` for every row: each float32 score maps to an order-preserving int32, and the int64 key
    (score bits, then the reversed index) orders by score and, among equal scores, by lower index. Other dtypes
    (a float64 model) take a stable descending sort."""
    if scores.dtype != torch.float32:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    bits = scores.contiguous().view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip magnitude bits
    n = scores.shape[-1]
    key = ordered * (1 << 32) + (n - 1 - torch.arange(n, device=scores.device))
    return torch.topk(key, k, dim=-1, sorted=False).indices


class IndexerStats:
    """What one forward of a CSA layer tells about its indexer (training only): the KL loss and the recall."""

    def __init__(self):
        self.kl_sum: torch.Tensor | float = 0.0  # sum over queries of KL(p_main || softmax(I)); carries gradient
        self.kl_count = 0
        self.hits = 0.0  # indexer's top-k picks that are among the main attention's top-k
        self.recall_count = 0  # queries with more candidates than k (recall is trivially 1 otherwise)

    @property
    def kl(self) -> torch.Tensor | float:
        return self.kl_sum / max(self.kl_count, 1)

    @property
    def recall(self) -> float:
        return self.hits / self.recall_count if self.recall_count else float("nan")


def indexer_kl(main_probs: torch.Tensor, index_scores: torch.Tensor, candidates: torch.Tensor
               ) -> tuple[torch.Tensor, int]:
    """Sum over queries of KL(p || softmax(I)) over each query's candidates (spec 6.6, V3.2's recipe).

    main_probs [B, Q, K]: the main attention's probabilities of the candidate entries, summed over heads (any
    scale: they are L1-normalized here, and detached: a target); index_scores [B, Q, K]; candidates [B, Q, K] bool.
    Queries without a candidate are skipped. Returns (sum, number of queries). ``candidates`` may have batch 1 (one
    document: the same entries visible in every row).
    """
    candidates = candidates.expand_as(main_probs)
    p = upcast(main_probs.detach()) * candidates
    mass = p.sum(-1, keepdim=True)
    rows = candidates.any(-1)
    p = p / mass.clamp_min(1e-30)
    log_q = torch.log_softmax(upcast(index_scores).masked_fill(~candidates, -1e30), dim=-1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    return kl[rows].sum(), int(rows.sum())


@torch.no_grad()
def indexer_recall(main_probs: torch.Tensor, index_scores: torch.Tensor, candidates: torch.Tensor, k: int
                   ) -> tuple[float, int]:
    """Hits of the indexer's top-k among the main attention's top-k, over queries with more than k candidates
    (``candidates`` as in ``indexer_kl``)."""
    candidates = candidates.expand_as(main_probs)
    rows = candidates.sum(-1) > k
    if not rows.any():
        return 0.0, 0
    p = main_probs.masked_fill(~candidates, -1.0)[rows]
    i = index_scores.masked_fill(~candidates, float("-inf"))[rows]
    top_main = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(k, dim=-1).indices, True)
    hits = top_main.gather(-1, i.topk(k, dim=-1).indices).sum()
    return float(hits) / k, int(rows.sum())
