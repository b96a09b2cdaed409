"""Packed sequences: several documents in one row, kept apart (spec 6.3).

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.

A row of token ids may hold several documents, marked by ``doc_ids`` [B, S] (any labels; a document is a maximal
run of equal labels). Within a document positions restart at 0; attention never reaches another document, and each
document is compressed on its own (its blocks start at its first token; an incomplete tail is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    doc: torch.Tensor  # [B, S] document index within the row (0, 1, 2, ... in order)
    pos: torch.Tensor  # [B, S] position within the document
    runs: list[list[tuple[int, int]]]  # per row, the (start, end) of each document

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> "Packing":
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
        b, s = doc_ids.shape
        change = torch.ones_like(doc_ids, dtype=torch.bool)
        change[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        doc = change.long().cumsum(1) - 1
        idx = torch.arange(s, device=doc_ids.device).expand(b, s)
        start = torch.where(change, idx, torch.zeros_like(idx)).cummax(1).values
        runs = []
        for row in change.cpu():
            starts = row.nonzero().flatten().tolist()
            runs.append(list(zip(starts, starts[1:] + [s])))
        return cls(doc=doc, pos=idx - start, runs=runs)
