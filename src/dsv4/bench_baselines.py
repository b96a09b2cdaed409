"""The benchmarks' baseline: dense attention in V4's model shape, and its growing cache. Not V4; what V4's attention
is measured against (``dsv4 bench prefill | decode``).

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.

``dense_attention`` is an attention path (``Transformer.set_attention(dense_attention)``): the model's own
projections (low-rank q, the one shared K=V head, the grouped output), then causal MQA over every past token with
PyTorch's SDPA: no window, no compression, no sinks. Its cache (``dense_cache``) keeps every K=V vector of every
layer in a buffer that grows by doubling; ``DenseDecodeState`` is its static-shape form (every layer's buffer
preallocated for a capacity, positions as tensors), which a compiled decoding step takes (``DecodeStep``), so that
dense decoding is compiled the same way as V4's when the two are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4.cache import ModelCache, append_rows
from dsv4.model.decode import DecodeState


@dataclass
class DenseLayerCache:
    """Every K=V vector [B, filled, c] of one layer so far, the leading rows of a buffer that grows by doubling."""

    kv: torch.Tensor | None = None  # [B, >= filled, c]
    filled: int = 0

    def append(self, kv: torch.Tensor, room: int = 0) -> torch.Tensor:
        """Append K=V vectors [B, S, c] and return every one so far (``room``: spare rows when the buffer grows)."""
        self.kv = append_rows(self.kv, self.filled, kv.detach(), room)
        self.filled += kv.shape[1]
        return self.kv[:, :self.filled]

    def nbytes(self) -> int:
        """The filled rows (what a dense cache must hold), not the buffer's spare ones."""
        return 0 if self.kv is None else self.filled * self.kv.shape[0] * self.kv.shape[-1] * self.kv.element_size()


@dataclass
class DenseRows:
    """One layer's K=V vectors of every row at every position [R, capacity, c] (a static-shape dense cache)."""

    kv: torch.Tensor

    batch_invariant = True  # as V4's decode state: each token's experts on their own (static shapes when compiled)


class DenseDecodeState(DecodeState):
    """The dense baseline's decode state: ``DecodeState``'s rows, lengths and positions (each row at its own), every
    layer holding all K=V vectors up to ``capacity`` (``DenseRows``) instead of a window ring and compressed entries.
    ``model(ids, cache=state)`` with ``dense_attention`` advances it; every shape depends only on (rows, capacity)."""

    def __init__(self, model, rows: int, capacity: int):
        self._rows(model, rows, capacity)
        self.dtype = model.embed.weight.dtype
        self.layers = [DenseRows(torch.zeros(rows, capacity, model.config.head_dim, dtype=self.dtype,
                                             device=model.device)) for _ in model.layers]
        self.mtp = None

    def fill(self, context: int, generator: torch.Generator) -> DenseDecodeState:
        """Every row holding ``context`` random K=V vectors per layer (copies of one row, as ``filled_dense_cache``:
        a step's cost does not depend on their values), active."""
        if not 0 <= context < self.capacity:
            raise ValueError(f"a context of {context} tokens leaves no room in a capacity of {self.capacity}")
        for layer in self.layers:
            layer.kv[:, :context] = torch.randn(1, context, layer.kv.shape[-1], generator=generator).to(layer.kv)
        self.lengths.fill_(context)
        self.active.fill_(True)
        return self

    def reset_row(self, r: int) -> None:
        self.lengths[r] = 0
        self.active[r] = False
        for layer in self.layers:
            layer.kv[r] = 0

    def nbytes(self) -> int:
        return sum(layer.kv.numel() * layer.kv.element_size() for layer in self.layers)


def dense_cache(model, batch_size: int) -> ModelCache:
    """An empty dense cache for ``model``'s attention layers: what ``model(ids, cache=...)`` advances when the
    model runs ``dense_attention``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return ModelCache(batch_size, [DenseLayerCache() for _ in model.layers])


def dense_attention(attn, x, q, kv, q_latent, positions, cache: DenseLayerCache | None, packing) -> torch.Tensor:
    """An attention path (the arguments of ``reference.reference``): queries q [B, S, H, c] over every past K=V
    vector (kv [B, S, c], after those of ``cache``), causal, one softmax without a sink -> [B, S, H, c]."""
    if packing is not None:
        raise ValueError("the dense baseline does not take packed documents")
    if isinstance(cache, DenseRows):
        return _dense_rows(attn, q, kv, positions, cache)
    if cache is not None and not isinstance(cache, DenseLayerCache):
        raise ValueError("the dense baseline decodes with its own cache: dsv4.bench_baselines.dense_cache(model, B) "
                         "or DenseDecodeState(model, rows, capacity)")
    keys = kv if cache is None else cache.append(kv)
    b, s, h, c = q.shape
    if s == 1:  # decoding: every key visible, so the heads fold into queries of the one K=V head (read once)
        k = keys.unsqueeze(1)
        return F.scaled_dot_product_attention(q.view(b, 1, h, c), k, k, scale=attn.scale).view(b, 1, h, c)
    k = keys.unsqueeze(1).expand(b, h, keys.shape[1], c)
    qh = q.transpose(1, 2)
    if s == keys.shape[1]:
        out = F.scaled_dot_product_attention(qh, k, k, is_causal=True, scale=attn.scale)
    else:  # queries are the last s of the keys
        t = torch.arange(keys.shape[1] - s, keys.shape[1], device=q.device)
        mask = torch.arange(keys.shape[1], device=q.device).unsqueeze(0) <= t.unsqueeze(1)
        out = F.scaled_dot_product_attention(qh, k, k, attn_mask=mask, scale=attn.scale)
    return out.transpose(1, 2)


def _dense_rows(attn, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, cache: DenseRows) -> torch.Tensor:
    """One token per row at its own position (q [R, 1, H, c], kv [R, 1, c], positions [R, 1]) over a
    ``DenseRows`` buffer: the new vector written at its position, then every filled position up to it (a mask over
    the whole capacity: static shapes)."""
    r, s, h, c = q.shape
    if s != 1:
        raise ValueError(f"the dense decode state takes one token per row, got {s}")
    pos = positions[:, 0]
    cache.kv[torch.arange(r, device=q.device), pos] = kv[:, 0].to(cache.kv.dtype)
    mask = torch.arange(cache.kv.shape[1], device=q.device) <= pos.unsqueeze(1)  # [R, capacity]
    k = cache.kv.unsqueeze(1).to(q.dtype)
    return F.scaled_dot_product_attention(q.view(r, 1, h, c), k, k, attn_mask=mask.view(r, 1, 1, -1),
                                          scale=attn.scale).view(r, 1, h, c)
