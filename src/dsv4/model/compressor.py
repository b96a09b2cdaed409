"""Gated pooling of K=V along the sequence (spec 2.4): one entry per ``rate`` tokens.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also the compressor's rate, dim (its entries' size) and width (dim, or 2 dim with overlap).

HCA (no overlap): entry i = sum over the ``rate`` tokens of block i of softmax_j(Z_j + B_j) * C_j, per channel.
CSA (overlap): ``wkv`` / ``wgate`` project to two series of width ``dim``; channels [dim:2dim] pool the tokens of
block i ("current" series a) and channels [0:dim] pool the tokens of block i-1 ("overlap" series b), all 2*rate slots
in one per-channel softmax. Entry 0 has no previous block: its b-slots get gate -inf.
Then a weighted RMSNorm, and RoPE on the trailing dims at the block start ``i * rate``.

The math runs in float32. A trailing incomplete block is not emitted; with a ``CompressorState`` it is kept (with,
for CSA, the overlap series of the last complete block) so that any split of a sequence into calls emits the same
entries as one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv4.cache import CompressorState
from dsv4.model.linear import Linear
from dsv4.model.norm import RMSNorm
from dsv4.model.numerics import round_kv
from dsv4.model.precision import compute_dtype, upcast
from dsv4.model.rope import RotaryEmbedding, apply_rope


class Compressor(nn.Module):
    def __init__(self, hidden_size: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.dim = dim
        self.rate = rate
        self.overlap = overlap
        width = 2 * dim if overlap else dim
        self.wkv = Linear(hidden_size, width, bias=False)
        self.wgate = Linear(hidden_size, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(rate, width))  # learnable position bias B, one row per slot
        self.norm = RMSNorm(dim, eps)
        # official numerics (dsv4.model.numerics, rule 1): entries rounded as the official cache holds them (the main
        # compressors; the indexer's keys take its FP4 rule instead)
        self.official_kv = False

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding,
                state: CompressorState | None = None) -> tuple[torch.Tensor, int]:
        """x [B, S, d] -> (entries completed by these tokens [B, T, dim], index of the first of them)."""
        b = x.shape[0]
        kv = upcast(self.wkv(x))
        gate = upcast(self.wgate(x))
        first = 0
        if state is not None:
            first = state.count
            if state.kv is not None:
                kv = torch.cat([state.kv, kv], dim=1)
                gate = torch.cat([state.gate, gate], dim=1)
        n = kv.shape[1] // self.rate
        usable = n * self.rate
        if state is not None:
            # copies, not views: a view would keep this whole chunk's projections alive in the cache
            state.kv, state.gate = kv[:, usable:].clone(), gate[:, usable:].clone()
        if n == 0:
            return kv.new_zeros(b, 0, self.dim), first
        kv = kv[:, :usable].unflatten(1, (n, self.rate))
        gate = gate[:, :usable].unflatten(1, (n, self.rate)) + upcast(self.ape)
        if self.overlap:
            d = self.dim
            prev_kv = kv.new_zeros(b, 1, self.rate, d)
            prev_gate = gate.new_full((b, 1, self.rate, d), float("-inf"))
            if state is not None:
                if state.prev_kv is not None:
                    prev_kv, prev_gate = state.prev_kv.unsqueeze(1), state.prev_gate.unsqueeze(1)
                state.prev_kv, state.prev_gate = kv[:, -1, :, :d].clone(), gate[:, -1, :, :d].clone()
            # slots [0, rate): series b of the previous block; slots [rate, 2 rate): series a of this block
            kv = torch.cat([torch.cat([prev_kv, kv[:, :-1, :, :d]], dim=1), kv[..., d:]], dim=2)
            gate = torch.cat([torch.cat([prev_gate, gate[:, :-1, :, :d]], dim=1), gate[..., d:]], dim=2)
        pooled = (kv * torch.softmax(gate, dim=2)).sum(dim=2)
        positions = (torch.arange(n, device=x.device) + first) * self.rate
        return self.finish(self.norm(pooled), positions, rotary), first

    def finish(self, normed: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        """Normed pooled entries [..., dim] at their block starts ``positions`` [...]: RoPE, then with
        ``official_kv`` the official KV rounding. Every path that emits entries ends here."""
        cos, sin = rotary.cos_sin(positions, "compress", normed.dtype)
        entries = apply_rope(normed, cos, sin)
        return round_kv(entries, rotary.rope_dim) if self.official_kv else entries

    def all_entries(self, x: torch.Tensor, rotary: RotaryEmbedding, state: CompressorState | None = None
                    ) -> torch.Tensor:
        """Every entry visible after these tokens [B, T, dim] (one document), the state advancing: ``entries``
        without where they sit, which a decoding step does not need."""
        new, _ = self(x, rotary, state)
        return new if state is None else state.append(new)

    def entries(self, x: torch.Tensor, rotary: RotaryEmbedding, state: CompressorState | None = None,
                packing=None, offset: int = 0) -> Entries:
        """Every entry visible after these tokens, with where it sits (see ``Entries``).

        With a ``state`` the entries of earlier calls come first and the state advances; with a ``packing`` each
        document of each row is compressed on its own and the rows are padded to the longest. ``offset`` is the
        absolute position of the first of these tokens (the cache's position) when not packed.
        """
        dev = x.device
        if packing is None:
            out = self.all_entries(x, rotary, state)
            local = torch.arange(out.shape[1], device=dev).unsqueeze(0)
            return Entries(out, local, None, (local + 1) * self.rate - 1)
        if state is not None:
            raise ValueError("packed documents are for full forwards, not for cached decoding")
        rows = [[(self(x[b:b + 1, s:e], rotary)[0][0], d, s) for d, (s, e) in enumerate(runs)]
                for b, runs in enumerate(packing.runs)]
        t = max(sum(p[0].shape[0] for p in parts) for parts in rows)
        out = x.new_zeros(len(rows), t, self.dim, dtype=compute_dtype(x.dtype))
        local = torch.full((len(rows), t), -1, dtype=torch.long, device=dev)
        doc = torch.full((len(rows), t), -1, dtype=torch.long, device=dev)
        end = torch.full((len(rows), t), torch.iinfo(torch.long).max, dtype=torch.long, device=dev)
        for b, parts in enumerate(rows):
            i = 0
            for ent, d, start in parts:
                n = ent.shape[0]
                out[b, i:i + n] = ent
                local[b, i:i + n] = torch.arange(n, device=dev)
                doc[b, i:i + n] = d
                end[b, i:i + n] = start + (torch.arange(n, device=dev) + 1) * self.rate - 1
                i += n
        return Entries(out, local, doc, end)


@dataclass
class Entries:
    """Compressed entries and where they sit.

    kv [B, T, dim]; local [B or 1, T] index within its document (-1: padding); doc [B, T] document index within the
    row (None: one document); end [B or 1, T] the coordinate of its last source token: the absolute position when
    not packed, the index in the row when packed (padding: a huge value). Entries are ordered by ``end``.
    """

    kv: torch.Tensor
    local: torch.Tensor
    doc: torch.Tensor | None
    end: torch.Tensor
