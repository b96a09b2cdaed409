"""Packing: batches of fixed-length training rows filled with whole documents, boundaries kept.

``PackedLoader(shards, split, batch_size=B, seq_len=T)`` yields ``Batch``es forever (epoch after epoch). Each row
holds T + 1 tokens, so the T inputs ``tokens[:, :-1]`` all have a next-token target ``tokens[:, 1:]``.

The convention, per row (all tensors int64, [B, T + 1]):

- ``doc_ids``: the id of the document each token comes from (its index in the shard set's document table:
  ``shards.document(doc_id)`` holds it). A maximal run of equal ``doc_ids`` is a *segment*: a whole document or
  one piece of a long one. Adjacent segments always differ, and a document occurs at most once per row, so equality
  of ``doc_ids`` is exactly "same segment". Attention and KV compression must not cross segments
  (``dsv4.model.documents.Packing.from_doc_ids`` reads this tensor). There is no padding: every row is full.
- ``positions``: 0 at the first token of each segment, then 1, 2, ... (the same as ``Packing.from_doc_ids``
  derives). A whole document starts with its BOS at position 0. A document longer than the room left in a row is
  cut at the row's end and continues in a later row; that continuation also starts at position 0, because the
  model, which never attends across segments, sees it as a document of its own.
- ``Batch.targets`` is ``tokens[:, 1:]`` with ``IGNORE_INDEX`` (-100) wherever the target token is in another
  segment than its input, so no loss crosses a boundary: a document's EOS is predicted, the next BOS is not. A cut
  document's next piece repeats the cut's last token (it ends one row as a target and begins the next piece as an
  input), so every token but a BOS is a target exactly once per epoch.

Packing (best fit, to cut few documents, spec 6.3): epoch ``e`` visits the split's documents in the order of
``numpy.random.default_rng([seed, e]).permutation`` (corpus order with ``shuffle=False``) through a buffer of
``buffer_size`` pieces. Each row takes the longest buffered piece that fits the room left (the oldest among equals);
when none fits it takes the longest piece's head to fill the row and puts the rest back. Tokens left at the end of an
epoch, fewer than one row, are dropped. The plan depends only on document lengths, so it is computed per epoch
without reading tokens, and any row of any epoch is reached directly.

Validation (``validation_batches``): every row of the ``val`` split's first epoch once, in corpus order
(``shuffle=False``), in batches (the last one shorter), at most a given number of them: what ``dsv4 train`` validates
on during a run and what ``dsv4 eval`` evaluates.

Resuming: the state is the (epoch, row) cursor plus the step count. ``state_dict()`` / ``load_state_dict()``
continue exactly where a run stopped: a resumed run sees the batches an uninterrupted run would. One step takes
``world_size * batch_size`` consecutive rows and rank ``r`` keeps rows ``[r * B, (r + 1) * B)`` of them; since the
cursor counts rows, a resumed run may change ``batch_size`` or ``world_size`` (e.g. a batch-size ramp).
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from dsv4.data.shards import ShardSet, load_shards
from dsv4.data.tokenizer import IGNORE_INDEX


@dataclass
class Batch:
    """``tokens``, ``doc_ids`` and ``positions``, each int64 [B, T + 1] (see the module docstring)."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor

    @property
    def inputs(self) -> torch.Tensor:
        """[B, T] model inputs."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        """[B, T] next tokens, ``IGNORE_INDEX`` where a target lies in another segment than its input."""
        same = self.doc_ids[:, 1:] == self.doc_ids[:, :-1]
        return torch.where(same, self.tokens[:, 1:], IGNORE_INDEX)

    @property
    def input_doc_ids(self) -> torch.Tensor:
        """[B, T] ``doc_ids`` of the inputs."""
        return self.doc_ids[:, :-1]

    @property
    def input_positions(self) -> torch.Tensor:
        """[B, T] ``positions`` of the inputs."""
        return self.positions[:, :-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.tokens, self.doc_ids, self.positions)))


@dataclass(frozen=True)
class _Plan:
    """One epoch's rows: row i is segments row_ptr[i]:row_ptr[i+1] of (doc, start, length)."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_ptr: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.row_ptr) - 1


def plan_rows(order: np.ndarray, lengths: np.ndarray, row_len: int, buffer_size: int) -> _Plan:
    """Best-fit packing of documents ``order`` (ids into ``lengths``) into rows of ``row_len`` tokens."""
    buf: list[tuple[int, int, int, int]] = []  # sorted (length, arrival, doc, start)
    docs = order.tolist()
    nxt = arrival = 0
    seg_doc, seg_start, seg_len, row_ptr = [], [], [], [0]
    while True:
        room, row = row_len, []
        while room > 0:
            while len(buf) < buffer_size and nxt < len(docs):
                bisect.insort(buf, (int(lengths[docs[nxt]]), arrival, docs[nxt], 0))
                nxt += 1
                arrival += 1
            if not buf:
                break
            i = bisect.bisect_right(buf, (room, math.inf)) - 1
            if i >= 0:  # longest piece that fits, the oldest among equals
                length, _, doc, start = buf.pop(bisect.bisect_left(buf, (buf[i][0],)))
                row.append((doc, start, length))
                room -= length
            else:  # nothing fits: cut the longest; its rest starts with the cut's last token
                length, _, doc, start = buf.pop(bisect.bisect_left(buf, (buf[-1][0],)))
                row.append((doc, start, room))
                bisect.insort(buf, (length - room + 1, arrival, doc, start + room - 1))
                arrival += 1
                room = 0
        if room > 0:  # the epoch ran out of tokens: drop the partial row
            break
        for doc, start, length in row:
            seg_doc.append(doc)
            seg_start.append(start)
            seg_len.append(length)
        row_ptr.append(len(seg_doc))
    as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return _Plan(as64(seg_doc), as64(seg_start), as64(seg_len), as64(row_ptr))


class PackedLoader:
    """Infinite, deterministic, resumable batches of packed rows from one split of a ``ShardSet`` (or its path).

    ``device`` moves each batch there. ``buffer_size`` is how many pieces best-fit packing chooses among.
    """

    _STATE_CHECKS = ("split", "seq_len", "seed", "shuffle", "buffer_size", "shards_key")

    def __init__(self, shards: ShardSet | str | os.PathLike, split: str = "train", *, batch_size: int,
                 seq_len: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 buffer_size: int = 64, device: torch.device | str | None = None):
        self.shards = shards if isinstance(shards, ShardSet) else load_shards(shards)
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                                 ("world_size", world_size, 1), ("buffer_size", buffer_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.shuffle, self.rank, self.world_size, self.buffer_size = shuffle, rank, world_size, buffer_size
        self.device = device
        self._docs = self.shards.split_docs(split)
        n_tokens = int(self.shards.doc_length[self._docs].sum())
        if n_tokens < seq_len + 1:
            raise ValueError(f"split {split!r} of {self.shards.path} has {n_tokens} tokens, fewer than one sequence "
                             f"of seq_len + 1 = {seq_len + 1}; use a larger corpus or a shorter seq_len")
        self.epoch = self.row = self.step = 0
        self._plans: dict[int, _Plan] = {}

    def rows_in_epoch(self, epoch: int) -> int:
        """How many rows epoch ``epoch`` packs into."""
        return self._plan(epoch).n_rows

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> Batch:
        take = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        rows = []
        epoch, row = self.epoch, self.row
        for i in range(self.world_size * self.batch_size):
            while row >= self.rows_in_epoch(epoch):
                epoch, row = epoch + 1, 0
            if i in take:
                rows.append((epoch, row))
            row += 1
        self.epoch, self.row, self.step = epoch, row, self.step + 1
        return self._batch(rows)

    def state_dict(self) -> dict:
        """The cursor (``epoch``, ``row``), ``step``, and the settings a resumed loader must share."""
        return {"epoch": self.epoch, "row": self.row, "step": self.step, "split": self.split,
                "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "buffer_size": self.buffer_size, "shards_key": self.shards.key}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; raises ``ValueError`` if it came from a loader with other data or packing."""
        mine = self.state_dict()
        for key in self._STATE_CHECKS:
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this loader {key}={mine[key]!r}")
        self.epoch, self.row, self.step = int(state["epoch"]), int(state["row"]), int(state["step"])

    def _plan(self, epoch: int) -> _Plan:
        plan = self._plans.get(epoch)
        if plan is None:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self._docs) if self.shuffle
                     else self._docs)
            plan = plan_rows(order, self.shards.doc_length, self.seq_len + 1, self.buffer_size)
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan
        return plan

    def _batch(self, rows: list[tuple[int, int]]) -> Batch:
        n = self.seq_len + 1
        tokens = np.empty((len(rows), n), dtype=np.int64)
        doc_ids = np.empty((len(rows), n), dtype=np.int64)
        positions = np.empty((len(rows), n), dtype=np.int64)
        for b, (epoch, row) in enumerate(rows):
            plan = self._plan(epoch)
            lo, hi = plan.row_ptr[row], plan.row_ptr[row + 1]
            at = 0
            for doc, start, length in zip(plan.doc[lo:hi].tolist(), plan.start[lo:hi].tolist(),
                                          plan.length[lo:hi].tolist()):
                tokens[b, at:at + length] = self.shards.tokens(doc, start, length)
                doc_ids[b, at:at + length] = doc
                positions[b, at:at + length] = np.arange(length)
                at += length
        batch = Batch(torch.from_numpy(tokens), torch.from_numpy(doc_ids), torch.from_numpy(positions))
        return batch if self.device is None else batch.to(self.device)


def validation_batches(shards: ShardSet | str | os.PathLike, *, seq_len: int, batch_size: int,
                       max_batches: int | None = None, seed: int = 0) -> list[Batch]:
    """The validation rows, defined once for training and evaluation: every row of the ``val`` split's first epoch
    once, in order, as ``Batch``es of ``batch_size`` rows (the last one shorter), at most ``max_batches`` of them.
    (The split's documents are ``dsv4.data.shards.split_documents``'.)"""
    shards = shards if isinstance(shards, ShardSet) else load_shards(shards)
    if "val" not in shards.splits or len(shards.split_docs("val")) == 0:
        raise ValueError(f"the shards at {shards.path} have no validation split")
    loader = PackedLoader(shards, "val", batch_size=batch_size, seq_len=seq_len, seed=seed, shuffle=False)
    rows = loader.rows_in_epoch(0)
    n = math.ceil(rows / batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    out = []
    for i in range(n):
        b = next(loader)
        keep = min(batch_size, rows - i * batch_size)
        out.append(b if keep == batch_size else Batch(b.tokens[:keep], b.doc_ids[:keep], b.positions[:keep]))
    return out
