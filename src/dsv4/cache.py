"""Decode state: per attention layer a window ring buffer, the compressed entries, and the compressors' partial blocks.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also the compressor's rate, dim (its entries' size) and width (dim, or 2 dim with overlap).

``model.new_cache(batch_size)`` builds one; ``model(ids, cache=cache)`` reads and advances it. The state is exactly
what the next call needs and nothing more:
  - the window ring holds the last ``sliding_window`` K=V vectors with their absolute positions;
  - each compressor (CSA / HCA main, CSA indexer) keeps the projected tokens of its incomplete block, for CSA the
    overlap series of the last complete block (the b-series slots of the next entry), and the entries emitted so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _repeat(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Each row (dim 0) ``n`` times in a row, as a new tensor."""
    return None if t is None else t.repeat_interleave(n, dim=0)


def append_rows(buffer: torch.Tensor | None, filled: int, new: torch.Tensor, room: int = 0) -> torch.Tensor:
    """Write ``new`` [B, S, c] after the first ``filled`` rows (dim 1) of ``buffer`` and return the buffer: the same
    one while it has space, else a new one of at least twice the size (plus ``room`` spare rows) holding the old
    rows. Appending one row at a time then copies the past a logarithmic number of times, not once per row."""
    n = filled + new.shape[1]
    if buffer is None or buffer.shape[1] < n or buffer.dtype != new.dtype:
        grown = new.new_empty(new.shape[0], max(n + room, 2 * filled), new.shape[-1])
        if filled:
            grown[:, :filled] = buffer[:, :filled]
        buffer = grown
    buffer[:, filled:n] = new
    return buffer


@dataclass
class CompressorState:
    """State of one compressor across calls."""

    kv: torch.Tensor | None = None  # [B, <rate, width] projected values of the incomplete block
    gate: torch.Tensor | None = None  # [B, <rate, width] projected gate logits of the incomplete block
    prev_kv: torch.Tensor | None = None  # [B, rate, dim] overlap series of the last complete block (CSA)
    prev_gate: torch.Tensor | None = None  # [B, rate, dim] its gate logits, position bias included
    entries: torch.Tensor | None = None  # [B, T, dim] compressed entries emitted so far
    count: int = 0  # entries emitted so far; entry i covers source tokens [i*rate, (i+1)*rate)

    _room: torch.Tensor | None = None  # buffer whose leading rows are ``entries`` (capacity doubles when full)

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Add newly emitted entries [B, T, dim]; returns all entries so far. Without autograd they go to a buffer
        that doubles when full, so decoding does not copy every entry each time one is emitted."""
        if new.shape[1] == 0 and self.entries is not None:  # a decoding step inside a block: nothing to add
            return self.entries
        if new.requires_grad or (self.entries is not None and self.entries.requires_grad):
            self.entries = new if self.entries is None else torch.cat([self.entries, new], dim=1)
            self._room = None
        else:
            have = 0 if self.entries is None else self.entries.shape[1]
            self._room = append_rows(self._room, have, new)
            self.entries = self._room[:, :have + new.shape[1]]
        self.count += new.shape[1]
        return self.entries

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self.kv, self.gate, self.prev_kv, self.prev_gate, self.entries))

    def snapshot(self) -> tuple:
        """What ``restore`` needs to undo later calls: the partial-block tensors (calls replace them, never write
        into them) and the number of entries (later entries only go after them)."""
        return (self.kv, self.gate, self.prev_kv, self.prev_gate,
                0 if self.entries is None else self.entries.shape[1], self.count)

    def restore(self, snap: tuple) -> None:
        """Back to the state of ``snapshot``: later entries dropped (their buffer rows are reused)."""
        self.kv, self.gate, self.prev_kv, self.prev_gate, have, self.count = snap
        if have == 0:
            self.entries = self._room = None
        elif self._room is not None:
            self.entries = self._room[:, :have]
        else:
            self.entries = self.entries[:, :have]

    def repeat_rows(self, n: int) -> CompressorState:
        """This state with each batch row ``n`` times (see ``ModelCache.repeat_rows``)."""
        room = _repeat(self._room, n)
        entries = room[:, :self.entries.shape[1]] if room is not None else _repeat(self.entries, n)
        return replace(self, kv=_repeat(self.kv, n), gate=_repeat(self.gate, n), prev_kv=_repeat(self.prev_kv, n),
                       prev_gate=_repeat(self.prev_gate, n), entries=entries, _room=room)


@dataclass
class LayerCache:
    """Decode state of one attention layer."""

    window: int
    kv: torch.Tensor | None = None  # [B, W, c] ring buffer, slot = position % W
    pos: torch.Tensor | None = None  # [W] absolute position held in each slot, -1 when empty
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def window_keys(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.kv, self.pos

    def write_window(self, kv: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the newest ``window`` of the given K=V vectors [B, S, c] at their positions [S]."""
        kv, positions = kv[:, -self.window:], positions[-self.window:]
        if self.kv is None:
            self.kv = kv.new_zeros(kv.shape[0], self.window, kv.shape[-1])
            self.pos = torch.full((self.window,), -1, dtype=torch.long, device=kv.device)
        slots = positions % self.window
        self.kv[:, slots] = kv.detach().to(self.kv.dtype)
        self.pos[slots] = positions

    def nbytes(self) -> int:
        # the K=V ring plus the compressed entries and partial blocks; positions are bookkeeping, not KV
        n = _nbytes(self.kv)
        for s in (self.compressor, self.indexer):
            if s is not None:
                n += s.nbytes()
        return n

    def snapshot(self) -> tuple:
        """What ``restore`` needs to undo later calls: a copy of the ring (written in place) and the compressor
        states' snapshots."""
        return (None if self.kv is None else self.kv.clone(), None if self.pos is None else self.pos.clone(),
                None if self.compressor is None else self.compressor.snapshot(),
                None if self.indexer is None else self.indexer.snapshot())

    def restore(self, snap: tuple) -> None:
        kv, pos, comp, idx = snap
        if kv is None:
            self.kv = self.pos = None
        else:
            self.kv.copy_(kv)
            self.pos.copy_(pos)
        if comp is not None:
            self.compressor.restore(comp)
        if idx is not None:
            self.indexer.restore(idx)

    def repeat_rows(self, n: int) -> LayerCache:
        """This layer's state with each batch row ``n`` times (see ``ModelCache.repeat_rows``)."""
        return replace(self, kv=_repeat(self.kv, n), pos=None if self.pos is None else self.pos.clone(),
                       compressor=None if self.compressor is None else self.compressor.repeat_rows(n),
                       indexer=None if self.indexer is None else self.indexer.repeat_rows(n))


@dataclass
class ModelCache:
    """Decode state of a whole model: one ``LayerCache`` per attention layer (MTP block last, if any)."""

    batch_size: int
    layers: list[LayerCache] = field(default_factory=list)
    seen: int = 0  # tokens consumed so far; the next token's position

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def snapshot(self) -> tuple:
        """A light record of this cache (a copy of each window ring, counts and references for the rest) that
        ``restore`` returns it to, undoing every call made since: what speculative decoding needs to drop the
        tokens of a rejected draft. Cheap at any context: compressed entries are not copied."""
        return self.seen, [layer.snapshot() for layer in self.layers]

    def restore(self, snap: tuple) -> None:
        seen, layers = snap
        if len(layers) != len(self.layers) or seen > self.seen:
            raise ValueError("restore takes a snapshot of this cache, from before its later calls")
        self.seen = seen
        for layer, s in zip(self.layers, layers):
            layer.restore(s)

    # ------------------------------------------------------------------ prefix snapshots (one row, at block boundaries)
    def _compressors(self):
        """(name such as ``"3.indexer"``, its LayerCache, the field, the CompressorState) of every compressor."""
        for i, layer in enumerate(self.layers):
            for which in ("compressor", "indexer"):
                state = getattr(layer, which)
                if state is not None:
                    yield f"{i}.{which}", layer, which, state

    def history(self, start: int, end: int, rates: dict[str, int]) -> dict[str, torch.Tensor]:
        """The compressed entries that tokens [start, end) emitted, by compressor name (``"3.indexer"``), of a
        one-row cache; ``rates`` gives each compressor's rate and both ends are multiples of it. This is what a
        sequence shares with every longer one that starts with the same tokens."""
        if self.batch_size != 1:
            raise ValueError("history is taken from a one-row cache")
        out = {}
        for name, _, _, state in self._compressors():
            rate = rates[name]
            if start % rate or end % rate or end > self.seen:
                raise ValueError(f"history [{start}, {end}) is not on {name}'s blocks of {rate} within {self.seen}")
            out[name] = state.entries[0, start // rate:end // rate].clone()
        return out

    def boundary_state(self) -> dict[str, torch.Tensor]:
        """What a one-row cache holds beyond its entries at a block boundary (every compressor's incomplete block
        empty): each layer's window ring and its positions, CSA's overlap series of the last complete block."""
        if self.batch_size != 1:
            raise ValueError("boundary_state is taken from a one-row cache")
        out = {}
        for i, layer in enumerate(self.layers):
            if layer.kv is not None:
                out[f"{i}.ring"], out[f"{i}.pos"] = layer.kv[0].clone(), layer.pos.clone()
        for name, _, _, state in self._compressors():
            if state.kv is not None and state.kv.shape[1]:
                raise ValueError(f"{name} holds an incomplete block: not at a block boundary")
            if state.prev_kv is not None:
                out[f"{name}.prev_kv"], out[f"{name}.prev_gate"] = state.prev_kv[0].clone(), state.prev_gate[0].clone()
        return out

    def fill(self, histories: list[dict[str, torch.Tensor]], state: dict[str, torch.Tensor], length: int
             ) -> ModelCache:
        """This empty one-row cache (``model.new_cache(1)``) set to ``length`` tokens from the ``history`` of its
        blocks in order and the ``boundary_state`` at its end; returns it. The reverse of those two."""
        if self.batch_size != 1 or self.seen:
            raise ValueError("fill takes an empty one-row cache")
        for i, layer in enumerate(self.layers):
            if f"{i}.ring" in state:
                layer.kv, layer.pos = state[f"{i}.ring"].unsqueeze(0).clone(), state[f"{i}.pos"].clone()
        for name, _, _, comp in self._compressors():
            parts = [h[name] for h in histories]
            if parts and sum(p.shape[0] for p in parts):
                comp.append(torch.cat(parts).unsqueeze(0))
            if f"{name}.prev_kv" in state:
                comp.prev_kv = state[f"{name}.prev_kv"].unsqueeze(0).clone()
                comp.prev_gate = state[f"{name}.prev_gate"].unsqueeze(0).clone()
        self.seen = length
        return self

    def repeat_rows(self, n: int) -> ModelCache:
        """A new cache of ``batch_size * n`` rows, each row of this one ``n`` times in a row (copies; this cache is
        left as it is): one prefilled prompt, then ``n`` continuations decoded together as one batch."""
        if n < 1:
            raise ValueError(f"repeat_rows needs n >= 1, got {n}")
        return ModelCache(self.batch_size * n, [layer.repeat_rows(n) for layer in self.layers], self.seen)
