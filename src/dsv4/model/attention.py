"""The attention block of the three layer types (spec 2): sliding window, CSA, HCA.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also g output groups (o_groups).

q: low-rank (wq_a -> weighted q_norm -> wq_b), then a weightless RMSNorm per head and RoPE on the trailing dims.
K=V: one shared head, wkv -> weighted kv_norm -> RoPE. Keys of a query: the window (the last ``sliding_window``
positions, itself included), plus for HCA every visible compressed entry, plus for CSA the indexer's top-k visible
entries. One softmax with a per-head sink; the output's rope dims are de-rotated at the query position; then the
grouped low-rank output projection (wo_a block-diagonal over ``o_groups`` groups of heads, then wo_b).

This module holds the block's projections and its dispatch; the attention itself has one path per use, all held to
the same results: ``reference.reference`` (dense masks, the path written to be read), ``prefill.fast`` (prefill and
training, the default), ``decode.attend_cached`` (a few tokens against a ``ModelCache``: decoding, a draft's check)
and ``decode.attend_rows`` (rows of a ``DecodeState``, each at its own position). A path from outside the model
(``impl`` a function with ``reference``'s arguments: the benchmarks' dense baseline, ``dsv4.bench_baselines``) runs
between the same projections.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.cache import CompressorState, LayerCache
from dsv4.config import CSA, HCA, SLIDING, ModelConfig
from dsv4.model.compressor import Compressor
from dsv4.model.decode import LayerRows, attend_cached, attend_rows
from dsv4.model.documents import Packing
from dsv4.model.indexer import Indexer, IndexerStats
from dsv4.model.linear import Linear
from dsv4.model.norm import RMSNorm, rms_normalize
from dsv4.model.numerics import round_kv
from dsv4.model.precision import compute_dtype
from dsv4.model.prefill import fast
from dsv4.model.reference import reference
from dsv4.model.rope import RotaryEmbedding, apply_rope


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
        # block-diagonal: row block j of wo_a maps the heads of group j (H c / g inputs) to o_lora_rank outputs
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
        # "fast" (default); "reference": the plain dense-mask path the fast one is tested against; or a function
        # with reference's arguments, a path from outside the model (``Transformer.set_attention``)
        self.impl = "fast"
        # queries per block of CSA's indexer and top-k in the fast path (the indexer's matmul: chunk x its heads rows)
        self.chunk = 256
        # queries per block of the window band: a block of nq queries reads nq + window - 1 keys, so small blocks
        # waste less (32, not 128: docs/performance-notes.md)
        self.window_block = 32
        self.span = 2048  # queries per span: the window band of a span's blocks is one batched matmul
        self.gather_rows = 16  # CSA: queries whose top-k entries are gathered at once (small: they stay in cache)
        self.decode_tokens = 16  # cached calls of at most this many tokens take ``attend_cached`` (decoding, checks)
        # CSA training switches (spec 6.6): sparse=False attends to every visible compressed entry (the dense
        # phase); with indexer_training on, a forward in training mode given a ``stats`` list appends the indexer's
        # KL loss and recall to it
        self.sparse = True
        self.indexer_training = False
        # official numerics (dsv4.model.numerics, rule 1): the window K=V rounded as the official cache holds it
        self.official_kv = False

    def new_cache(self) -> LayerCache:
        return LayerCache(window=self.window,
                          compressor=CompressorState() if self.compressor is not None else None,
                          indexer=CompressorState() if self.indexer is not None else None)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None,
                packing: Packing | None = None, stats: list[IndexerStats] | None = None) -> torch.Tensor:
        """x [B, S, d] (the normed block input); positions [S] absolute (ignored with a ``packing``, whose
        per-document positions are used); returns [B, S, d]. ``stats``: a CSA layer training its indexer appends
        this forward's ``IndexerStats`` (its KL loss and recall) to the list."""
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
        if self.official_kv:  # before any path stores or reads it
            kv = round_kv(kv, self.rotary.rope_dim)
        if self.impl == "reference":
            out = reference(self, x, q, kv, q_latent, positions, cache, packing)
        elif callable(self.impl):
            out = self.impl(self, x, q, kv, q_latent, positions, cache, packing)
        elif isinstance(cache, LayerRows):  # rows at their own positions
            out = attend_rows(self, x, q, kv, q_latent, positions, cache)
        elif s <= self.decode_tokens and cache is not None and not self._tracks_indexer():
            out = attend_cached(self, x, q, kv, q_latent, positions, cache)
        else:
            out = fast(self, x, q, kv, q_latent, positions, cache, packing, stats)
        out = apply_rope(out, cos_h, sin_h, inverse=True)
        return self.project_out(out)

    def _tracks_indexer(self) -> bool:
        """Whether a forward now reports the indexer's KL loss and recall (CSA, indexer training, training mode)."""
        return self.indexer is not None and self.indexer_training and self.training

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """[B, S, H, c] -> grouped low-rank projection -> [B, S, d]."""
        b, s = out.shape[:2]
        grouped = out.reshape(b, s, self.groups, -1)  # [B, S, g, H c / g] -> [B, S, g, o_lora_rank]
        low = self.wo_a.grouped(grouped).reshape(b, s, -1)
        return self.wo_b(low)
