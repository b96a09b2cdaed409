"""Decoding many sequences at once, each at its own length: the decode state of the serving engine (and the shape a
compiled step needs).

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also the compressor's rate, dim (its entries' size) and width (dim, or 2 dim with overlap).

``DecodeState(model, rows, capacity)`` preallocates, per attention layer, the window ring of every row [R, W, c], the
compressors' incomplete blocks [R, rate, width] (slot = position % rate), CSA's overlap series of the last complete
block, and the compressed entries up to ``capacity`` tokens [R, capacity / rate, dim]; ``lengths`` [R] is each row's
token count. ``model(tokens[:, None], cache=state)`` takes one token per row at that row's own position and returns
[R, 1, vocab] logits, as ``ModelCache`` calls do; rows advance unevenly.

Every shape of a step depends only on (rows, capacity), never on the rows' lengths or on what other rows hold, and
each row's arithmetic reads only its own inputs: a row's logits are bit-identical whatever else is in the batch
(batch invariance). To that end a row's attention runs over all ``capacity / rate`` entry slots with the empty ones
masked, and each token's routed experts run on their own (``MoE(per_token=True)``), never grouped with other rows'.

A row is filled from a prefilled ``ModelCache`` of one row (``load_row``), and read back into one (``extract_row``,
which serializes: ``ModelCache.to_tensors``); that is how prompts are prefilled in chunks, shared by ``n`` samples,
and cached as prefixes.

The module ends with the one door for the eager forms of a decoding step of few tokens on the CPU (an mHC unit in
Python floats, the routed experts token by token): one switch, ``EAGER_STEP``, set by ``Block.forward`` where
``eager_step_of`` says so and asked by the modules through ``eager_step()``; a compiled step never takes them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import operator
import os
import threading
import time
from dataclasses import dataclass

import torch

from dsv4.cache import CompressorState, LayerCache, ModelCache
from dsv4.model import fused, kernels
from dsv4.model.indexer import chunk_scores, topk_lower_index
from dsv4.model.linear import activation_dtype, linear
from dsv4.model.precision import compute_dtype, upcast
from dsv4.model.reference import window_visible

log = logging.getLogger(__name__)


@dataclass
class CompressorRows:
    """One compressor's state for every row."""

    part_kv: torch.Tensor  # [R, rate, width] projected values of each row's incomplete block, slot = position % rate
    part_gate: torch.Tensor  # [R, rate, width] their gate logits (position bias not yet added)
    prev_kv: torch.Tensor | None  # [R, rate, dim] CSA: overlap series (b) of the last complete block
    prev_gate: torch.Tensor | None  # [R, rate, dim] its gate logits, position bias included; -inf before block 0
    entries: torch.Tensor  # [R, ceil(capacity / rate), dim] entry i covers tokens [i rate, (i + 1) rate)

    def reset(self, r: int) -> None:
        self.part_kv[r] = 0
        self.part_gate[r] = 0
        self.entries[r] = 0
        if self.prev_kv is not None:
            self.prev_kv[r] = 0
            self.prev_gate[r] = float("-inf")

    def load(self, r: int, state: CompressorState, length: int, rate: int) -> None:
        """Row ``r`` from a one-row ``CompressorState`` after ``length`` tokens."""
        self.reset(r)
        n, part = length // rate, length % rate
        if state.count != n:
            raise ValueError(f"a compressor state of {state.count} entries does not belong to {length} tokens")
        if part:
            self.part_kv[r, :part] = state.kv[0]
            self.part_gate[r, :part] = state.gate[0]
        if n:
            if n > self.entries.shape[1]:
                raise ValueError(f"{length} tokens exceed the decode state's capacity")
            self.entries[r, :n] = state.entries[0, :n]
            if self.prev_kv is not None:
                self.prev_kv[r] = state.prev_kv[0]
                self.prev_gate[r] = state.prev_gate[0]

    def extract(self, r: int, length: int, rate: int) -> CompressorState:
        """Row ``r`` after ``length`` tokens as a one-row ``CompressorState`` (copies)."""
        n, part = length // rate, length % rate
        st = CompressorState(kv=self.part_kv[r:r + 1, :part].clone(), gate=self.part_gate[r:r + 1, :part].clone())
        if n:
            st.append(self.entries[r:r + 1, :n].clone())
            if self.prev_kv is not None:
                st.prev_kv, st.prev_gate = self.prev_kv[r:r + 1].clone(), self.prev_gate[r:r + 1].clone()
        return st


@dataclass
class LayerRows:
    """One attention layer's state for every row."""

    window: int
    ring: torch.Tensor  # [R, W, c] K=V of the last W tokens, slot = position % W
    ring_pos: torch.Tensor  # [R, W] the position in each slot, -1 when empty
    compressor: CompressorRows | None = None
    indexer: CompressorRows | None = None
    keys: torch.Tensor | None = None  # [R, W + T, c]: the ring, then the entry slots (views of it), when compressed

    batch_invariant = True  # the block runs each token's experts on their own (``MoE(per_token=True)``)

    def parts(self) -> list[CompressorRows]:
        return [p for p in (self.compressor, self.indexer) if p is not None]


def _compressor_rows(compressor, rows: int, capacity: int, dtype: torch.dtype, device,
                     entries: torch.Tensor | None = None) -> CompressorRows:
    rate, dim = compressor.rate, compressor.dim
    width = 2 * dim if compressor.overlap else dim
    prev_kv = prev_gate = None
    if compressor.overlap:
        prev_kv = torch.zeros(rows, rate, dim, dtype=dtype, device=device)
        prev_gate = torch.full((rows, rate, dim), float("-inf"), dtype=dtype, device=device)
    return CompressorRows(torch.zeros(rows, rate, width, dtype=dtype, device=device),
                          torch.zeros(rows, rate, width, dtype=dtype, device=device), prev_kv, prev_gate,
                          torch.zeros(rows, slots(capacity, rate), dim, dtype=dtype, device=device)
                          if entries is None else entries)


def slots(capacity: int, rate: int) -> int:
    """Entry slots a row of ``capacity`` tokens needs."""
    return -(-capacity // rate)


def check_capacity(model, rows: int, capacity: int) -> None:
    """Refuse a decode state of ``rows`` x ``capacity`` tokens the model cannot hold, naming the figure."""
    if rows < 1 or capacity < 1:
        raise ValueError(f"a decode state needs rows >= 1 and capacity >= 1, got {rows} and {capacity}")
    if capacity > model.config.max_position_embeddings:
        raise ValueError(f"capacity {capacity} exceeds max_position_embeddings "
                         f"({model.config.max_position_embeddings})")


class DecodeState:
    """The decode state of ``rows`` sequences of up to ``capacity`` tokens each (see the module docstring)."""

    def __init__(self, model, rows: int, capacity: int, mtp: bool = False):
        self._rows(model, rows, capacity)
        self.dtype = dtype = activation_dtype(model.embed)
        comp = compute_dtype(dtype)
        dev = model.device
        self.layers: list[LayerRows] = []
        for block in model.layers:
            attn = block.attn
            w, pos = attn.window, torch.full((rows, attn.window), -1, dtype=torch.long, device=dev)
            if attn.compressor is None:
                layer = LayerRows(w, torch.zeros(rows, w, attn.head_dim, dtype=dtype, device=dev), pos)
            else:  # one buffer for the ring and the entry slots: a query over both reads it without a copy
                keys = torch.zeros(rows, w + slots(capacity, attn.rate), attn.head_dim, dtype=comp, device=dev)
                layer = LayerRows(w, keys[:, :w], pos, keys=keys)
                layer.compressor = _compressor_rows(attn.compressor, rows, capacity, comp, dev, keys[:, w:])
            if attn.indexer is not None:
                layer.indexer = _compressor_rows(attn.indexer.compressor, rows, capacity, comp, dev)
            self.layers.append(layer)
        # with ``mtp``: the MTP block's window ring (a sliding-window layer), for drafting in speculative decoding
        self.mtp: LayerRows | None = None
        if mtp:
            if not len(model.mtp):
                raise ValueError("a decode state with mtp=True needs the model's MTP block")
            attn = model.mtp[0].attn
            self.mtp = LayerRows(attn.window, torch.zeros(rows, attn.window, attn.head_dim, dtype=dtype, device=dev),
                                 torch.full((rows, attn.window), -1, dtype=torch.long, device=dev))

    def _rows(self, model, rows: int, capacity: int) -> None:
        """``rows`` empty rows of ``capacity`` (checked): their lengths, and which are active (rows that advance
        with a call; the others, free slots, compute on whatever they hold and stay at length 0)."""
        check_capacity(model, rows, capacity)
        self.rows, self.capacity = rows, capacity
        self.lengths = torch.zeros(rows, dtype=torch.long, device=model.device)
        self.active = torch.zeros(rows, dtype=torch.bool, device=model.device)

    def all_layers(self) -> list[LayerRows]:
        """The main layers' states, then the MTP block's if any."""
        return self.layers + ([self.mtp] if self.mtp is not None else [])

    @property
    def batch_size(self) -> int:
        return self.rows

    def nbytes(self) -> int:
        """Bytes of the preallocated state (rings, incomplete blocks, entry slots) of every row."""
        tensors = []
        for layer in self.all_layers():
            tensors += [layer.ring]
            for p in layer.parts():
                tensors += [p.part_kv, p.part_gate, p.entries] + ([p.prev_kv, p.prev_gate] if p.prev_kv is not None
                                                                   else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset_row(self, r: int) -> None:
        """Row ``r`` back to an empty sequence, not active."""
        self.lengths[r] = 0
        self.active[r] = False
        for layer in self.all_layers():
            layer.ring[r] = 0
            layer.ring_pos[r] = -1
            for p in layer.parts():
                p.reset(r)

    def load_row(self, r: int, cache: ModelCache, mtp: tuple[LayerCache, int] | None = None) -> None:
        """Row ``r`` continues the sequence of a one-row ``ModelCache`` (copied; the cache is left as it is); ``mtp``:
        (the MTP block's cache, its row) for the MTP ring (else it starts empty)."""
        if cache.batch_size != 1 or len(cache.layers) != len(self.layers):
            raise ValueError("load_row takes a one-row cache of this model's layers")
        if cache.seen > self.capacity:
            raise ValueError(f"a cache of {cache.seen} tokens exceeds the decode state's capacity {self.capacity}")
        self.reset_row(r)
        self.lengths[r] = cache.seen
        self.active[r] = True
        for layer, lc in zip(self.layers, cache.layers):
            if lc.kv is not None:
                layer.ring[r] = lc.kv[0]
                layer.ring_pos[r] = lc.pos
            for rows, st, rate in self._pairs(layer, lc):
                rows.load(r, st, cache.seen, rate)
        if mtp is not None and self.mtp is not None and mtp[0].kv is not None:
            self.mtp.ring[r], self.mtp.ring_pos[r] = mtp[0].kv[mtp[1]], mtp[0].pos

    def extract_row(self, r: int) -> ModelCache:
        """Row ``r`` as a one-row ``ModelCache`` (copies), which ``model(ids, cache=...)`` continues exactly."""
        length = int(self.lengths[r])
        layers = []
        for layer in self.layers:
            lc = LayerCache(window=layer.window)
            if length:
                lc.kv, lc.pos = layer.ring[r:r + 1].to(self.dtype, copy=True), layer.ring_pos[r].clone()
            for name, rows, rate in self._named(layer):
                setattr(lc, name, rows.extract(r, length, rate))
            layers.append(lc)
        return ModelCache(1, layers, length)

    def mark(self, into: tuple | None = None) -> tuple:
        """What calls from now on change that ``rollback`` undoes: each row's length, and copies of the rings, the
        compressors' incomplete blocks and CSA's overlap series. Entry slots need none: an entry of a rolled-back
        position is written again before any query can see it. ``into``: an earlier mark of this state, written
        over in one batched copy instead of some thirty new tensors (that earlier mark is gone) and returned."""
        def parts(layer: LayerRows) -> list[tuple]:
            return [(p.part_kv, p.part_gate, p.prev_kv, p.prev_gate) for p in layer.parts()]

        marked = self.lengths, [(layer.ring, layer.ring_pos, parts(layer)) for layer in self.all_layers()]
        if into is None:
            return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, marked)
        torch._foreach_copy_(_tensor_leaves(into), _tensor_leaves(marked))
        return into

    def rollback(self, mark: tuple, keep: list[int], rows: list[int]) -> None:
        """Rows ``rows`` back to their length at ``mark`` plus ``keep[i]`` of the tokens they took since: the later
        positions undone. Their ring slots come back; so do incomplete-block slots that they wrote past a block's
        end (which hold the kept block's earlier tokens), and the overlap series of a block one of them completed.
        The calls since ``mark`` must have taken at most ``rate`` tokens per row (so that no undone position shares
        a slot with a kept one of the same calls)."""
        lengths, saved = mark
        for r, k in zip(rows, keep):
            start, end = int(lengths[r]) + k, int(self.lengths[r])
            for layer, (ring, ring_pos, parts) in zip(self.all_layers(), saved):
                for p in range(start, end):
                    layer.ring[r, p % layer.window] = ring[r, p % layer.window]
                    layer.ring_pos[r, p % layer.window] = ring_pos[r, p % layer.window]
                for part, (part_kv, part_gate, prev_kv, prev_gate) in zip(layer.parts(), parts):
                    rate = part.part_kv.shape[1]
                    for p in range(start, end):
                        if p // rate > start // rate:  # a later block's slot: the kept block's token was there
                            part.part_kv[r, p % rate] = part_kv[r, p % rate]
                            part.part_gate[r, p % rate] = part_gate[r, p % rate]
                    if prev_kv is not None and any(p % rate == rate - 1 for p in range(start, end)):
                        part.prev_kv[r], part.prev_gate[r] = prev_kv[r], prev_gate[r]
            self.lengths[r] = start

    @staticmethod
    def _named(layer: LayerRows) -> list[tuple[str, CompressorRows, int]]:
        """(the ``LayerCache`` field, the rows' state, the rate) of the layer's compressors."""
        return [(name, rows, rows.part_kv.shape[1]) for name, rows in
                (("compressor", layer.compressor), ("indexer", layer.indexer)) if rows is not None]

    def _pairs(self, layer: LayerRows, lc: LayerCache) -> list[tuple[CompressorRows, CompressorState, int]]:
        return [(rows, getattr(lc, name), rate) for name, rows, rate in self._named(layer)]


def _tensor_leaves(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def compressor_rates(model) -> dict[str, int]:
    """Each compressor's rate by the name ``ModelCache.history`` gives it (``"3.compressor"``, ``"3.indexer"``)."""
    rates = {}
    for i, block in enumerate(model.layers):
        if block.attn.compressor is not None:
            rates[f"{i}.compressor"] = block.attn.rate
        if block.attn.indexer is not None:
            rates[f"{i}.indexer"] = block.attn.indexer.compressor.rate
    return rates


# ------------------------------------------------------------------------------------------------- the step
def capacity_bucket(tokens: int, limit: int, least: int = 256) -> int:
    """The capacity of a decode state for ``tokens`` per row: the next power of two (at least ``least``), at most
    ``limit`` (max_position_embeddings). A compiled step is compiled once per (rows, capacity); buckets let runs of
    nearby lengths share one compilation (inductor's cache keeps it between runs) at most twice the entry slots."""
    if tokens < 1:
        raise ValueError(f"a decode state holds at least one token, got {tokens}")
    if tokens > limit:
        raise ValueError(f"{tokens} tokens exceed max_position_embeddings ({limit})")
    return min(limit, max(least, 1 << (tokens - 1).bit_length()))


class DecodeStep:
    """One decoding step of ``state``: a token per row [R] -> logits [R, V] (float32), each row at its own position,
    the state advanced. Eager (the reference), or compiled once for the state's (rows, capacity) with
    ``torch.compile`` (inductor's C++ on the CPU; its cache keeps the result between runs): the one compiled
    decoding step that ``dsv4.generate`` and the serving engine both run; its graph is then called directly, without
    dynamo's per-call work, where ``direct_step`` shows that safe (``direct``). ``compile()`` warms the step up on the
    state, whose rows must then all be free (they are cleared after); where no compiler works it logs one warning and
    the step stays eager. ``compile_seconds``: how long compiling and warming up took (None: eager)."""

    def __init__(self, model, state: DecodeState, compile: bool = False, fullgraph: bool = False):
        self.model, self.state = model, state
        self.compile_seconds: float | None = None
        self.direct = False  # compiled and called without dynamo (``direct_step``)
        self._run = self.eager
        if compile:
            self.compile(fullgraph=fullgraph)

    @property
    def compiled(self) -> bool:
        return self.compile_seconds is not None

    def eager(self, tokens: torch.Tensor) -> torch.Tensor:
        """The step without compilation (also what the compiled step traces)."""
        return self.model(tokens.unsqueeze(1).to(self.model.device), cache=self.state)[:, 0]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape != (self.state.rows,):
            raise ValueError(f"a decoding step takes one token per row [{self.state.rows}], got shape "
                             f"{tuple(tokens.shape)}")
        if self.compiled:  # the compiled step checks nothing (a check reads values back): here, as eager does
            self.model._check_ids(tokens.unsqueeze(1))
            positions_of(self.state, 1, self.model.config.max_position_embeddings)
        return self._run(tokens.to(self.model.device).contiguous())

    def compile(self, fullgraph: bool = False) -> bool:
        """Compile and warm up the step (see the class); whether it is compiled. ``fullgraph``: a graph break is an
        error (which falls back to eager) instead of a split graph."""
        fn = compile_step(self.eager, self.model.device, fullgraph)
        warm = torch.zeros(self.state.rows, dtype=torch.long, device=self.model.device)
        direct = None

        def run() -> None:
            nonlocal direct
            clear_rows(self.state)
            with capturing([]) as graphs:
                logits = fn(warm)
            if warm.device.type == "cpu":  # on a GPU the CUDA graphs replay the step (``compile_step``)
                clear_rows(self.state)  # as before that call: ``direct_step``'s call must return the same logits
                direct = direct_step(self, graphs, warm, logits)

        seconds = warm_up(self.state, run, "decoding step")
        if seconds is None:
            return False
        guarded = unguarded(fn)
        self.compile_seconds, self._run = seconds, guarded if direct is None else direct_or(direct, warm, guarded)
        self.direct = direct is not None
        return True


def compile_step(fn, device: torch.device, fullgraph: bool = False):
    """``torch.compile`` of a step ``fn`` for one shape (``dynamic=False``). On the CPU with inductor's C++ wrapper
    (``cpp_wrapper``): the code that calls the step's some hundred kernels and allocates their buffers is compiled
    C++ instead of Python, the CPU's counterpart of a CUDA graph's replay. A decoding step of the small preset at 4K
    took 11.95 ms against 14.44 with the Python wrapper (``benchmarks/compile_wrapper.py``, equal logits); compiling
    it takes minutes more (``DSV4_CPP_WRAPPER=0`` keeps the Python wrapper). On a CUDA device the step is recorded
    as CUDA graphs and replayed (``mode="reduce-overhead"``, ``replayed``); its inputs must be on the device. The
    graphs it compiles inside ``capturing(graphs)`` are appended to ``graphs``, for ``direct_step``."""
    kind = torch.device(device).type
    compiled = torch.compile(fn, backend=_inductor(kind, kind == "cpu" and cpp_wrapper()), dynamic=False,
                             fullgraph=fullgraph)
    return replayed(compiled) if kind == "cuda" else compiled


def replayed(fn):
    """A step compiled with CUDA graphs (inductor's cudagraph trees), called as one iteration of the trees each time
    (``cudagraph_mark_step_begin``: the previous call's outputs are dead), its tensor outputs copied out of the
    graphs' memory pool, which the next replay overwrites: the logits a caller keeps stay valid."""
    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, fn(*args))

    return call


def static_state(state) -> None:
    """Mark every tensor of a decode state as a static input of the graphs compiled on it (``mark_static_address``):
    a CUDA graph reads and writes the state's buffers where they are, instead of copying them in and out of its
    memory pool at each replay (which inductor's cudagraph trees refuse for inputs written in place)."""
    for _, t in _state_tensors(state):
        torch._dynamo.mark_static_address(t, guard=False)


# inductor's options by device kind. On the CPU, a one-row product of at most 2048 x 2048 (mHC's mixing and collapse,
# the router's gate, the low-rank projections) is written as a product and a sum that inductor fuses with its
# neighbours (``decompose_mm_pass``), instead of a library call with some 10-20 us of set-up for a few microseconds
# of work: 14.4 against 15.1 ms a step of the small preset at 131K, in one process. On CUDA, ``mode=
# "reduce-overhead"``'s: the step recorded as CUDA graphs and replayed
_INDUCTOR_OPTIONS = {"cpu": {"post_grad_fusion_options": {"decompose_mm_pass": {}}},
                     "cuda": {"triton.cudagraphs": True}}
_CAPTURE = threading.local()  # graphs: where ``compile_step``'s backend appends what it compiles (see ``capturing``)


@functools.cache
def _inductor(kind: str, cpp: bool):
    """Inductor as ``torch.compile``'s backend for a device ``kind`` (on the CPU with the C++ wrapper where ``cpp``;
    on CUDA with CUDA graphs), one object per option, so that steps of one shape share their compiled graph, as with
    ``backend="inductor"``; it also hands each graph it compiles to ``capturing``."""
    from torch._inductor.compile_fx import compile_fx

    options = _INDUCTOR_OPTIONS.get(kind)
    if kind == "cpu" and cpp:
        options = {**options, "cpp_wrapper": True}

    def inductor(gm, inputs):
        compiled = compile_fx(gm, inputs, config_patches=options)
        graphs = getattr(_CAPTURE, "graphs", None)
        if graphs is not None:
            graphs.append((gm, list(inputs), compiled))
        return compiled

    return inductor


@contextlib.contextmanager
def capturing(graphs: list):
    """While inside: each graph that a step of ``compile_step`` compiles on this thread is appended to ``graphs`` as
    (graph module, its inputs, the compiled function). A step whose graph dynamo already had (another step of the
    same shapes) appends nothing."""
    _CAPTURE.graphs = graphs
    try:
        yield graphs
    finally:
        _CAPTURE.graphs = None


_SHARED: list[tuple] = []  # (compiled, each input's path on its step, their metadata) of graphs steps may share
_SHARED_KEEP = 16


def direct_step(step, graphs: list, args, expected):
    """``step``'s compiled graph as a direct call, without dynamo: or None where that cannot be shown safe.
    Dynamo's part of a call (finding the graph, gathering its some 300 inputs off the model and the state, which
    never change: parameters and preallocated buffers, written in place) took about 0.8 ms of a 12 ms step of the
    small preset. ``args``: the step's tensor argument (the tokens) or a tuple of them, ``expected``: what the
    warm-up's call returned, a tensor or a tuple. The graph is the one dynamo compiled during the warm-up
    (``graphs``, from ``capturing``: one graph, each argument one of its inputs), or where dynamo gave ``step`` a
    graph it had compiled for another step of the same shapes (nothing captured), that graph with the inputs found on
    ``step`` where they were found on the other (``_SHARED``: the model's parameters and buffers by name, the
    state's tensors by attribute). Either way a direct call on the free rows, cleared again by the caller as they were
    before the warm-up's call (``clear_rows``), must return new tensors equal to ``expected``, every other output
    being one of its inputs or a view of one (a buffer written in place, which dynamo would store back where it came
    from). Returns ``call(*args)``, which returns what the step returns, for arguments of the warm-up's shapes,
    strides, dtypes and devices (``direct_or`` sends others to the guarded call)."""
    args = args if isinstance(args, tuple) else (args,)
    if len(graphs) > 1:
        return None
    if graphs:
        _, inputs, compiled = graphs[0]
        if any(sum(t is a for t in inputs) != 1 for a in args):
            return None
        call = _verified(inputs, compiled, args, expected)
        paths = _input_paths(step, inputs, args) if call is not None else None
        if paths is not None:
            del _SHARED[:-_SHARED_KEEP + 1]
            _SHARED.append((compiled, paths, [_meta(t) for t in inputs]))
        return call
    for compiled, paths, meta in reversed(_SHARED):
        inputs = _resolve(step, paths, args)
        if inputs is not None and [_meta(t) for t in inputs] == meta:
            call = _verified(inputs, compiled, args, expected)
            if call is not None:
                return call
    return None


def _meta(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device, t.storage_offset()


def _view(t: torch.Tensor) -> tuple:
    """The memory a tensor views: its storage and ``_meta``."""
    return _storage(t), *_meta(t)


def _named_tensors(model):
    """The model's parameters and buffers with their names."""
    return itertools.chain(model.named_parameters(), model.named_buffers())


def _input_paths(step, inputs: list, args: tuple) -> list | None:
    """Where each input of a step's graph lives on ``step``: ("arg", i) for its i-th argument, ("model", name) for a
    parameter or buffer, ("state", attribute or index, ...) for a tensor of the decode state; None if one is
    elsewhere. A tensor is found by the memory it views (dynamo may have stored an alias of a buffer written in
    place back in the attribute)."""
    where: dict[tuple, tuple] = {}
    for name, t in _named_tensors(step.model):
        where.setdefault(_view(t), ("model", name))
    for path, t in _state_tensors(step.state):
        where.setdefault(_view(t), path)
    slot = {id(a): ("arg", i) for i, a in enumerate(args)}
    paths = [slot.get(id(t)) or where.get(_view(t)) for t in inputs]
    return None if any(p is None for p in paths) else paths


def _state_tensors(state, depth: int = 4):
    """(path, tensor) for every tensor of a decode state: its attributes, their list items and their attributes, to
    ``depth`` levels; a path is ("state", attribute or index, ...)."""
    def walk(obj, path: tuple, depth: int):
        if isinstance(obj, torch.Tensor):
            yield path, obj
        elif depth and isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from walk(v, path + (i,), depth - 1)
        elif depth and hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            for k, v in vars(obj).items():
                yield from walk(v, path + (k,), depth - 1)

    return walk(state, ("state",), depth)


def _resolve(step, paths: list, args: tuple) -> list | None:
    """``_input_paths``' inputs found on another ``step`` called with ``args`` (None where one is missing)."""
    inputs = []
    named = dict(_named_tensors(step.model))
    try:
        for path in paths:
            if path[0] == "arg":
                inputs.append(args[path[1]])
            elif path[0] == "model":
                inputs.append(named[path[1]])
            else:
                obj = step.state
                for k in path[1:]:
                    obj = obj[k] if isinstance(k, int) else getattr(obj, k)
                inputs.append(obj)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return inputs if all(isinstance(t, torch.Tensor) for t in inputs) else None


def _storage(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def _verified(inputs: list, compiled, args: tuple, expected):
    """``direct_step``'s check of one graph and its inputs, and the call it gives (or None)."""
    try:
        with torch.inference_mode():
            outputs = compiled(*inputs)
    except Exception as e:  # the guarded call stays
        log.info("a compiled step cannot be called directly (%s: %s)", type(e).__name__, e)
        return None
    if not isinstance(outputs, (list, tuple)):
        return None
    want = expected if isinstance(expected, tuple) else (expected,)
    known = {_storage(t) for t in inputs}
    fresh = [i for i, o in enumerate(outputs) if not isinstance(o, torch.Tensor) or _storage(o) not in known]
    if len(fresh) != len(want) or not all(isinstance(outputs[i], torch.Tensor) and isinstance(w, torch.Tensor)
                                          and torch.equal(outputs[i], w) for i, w in zip(fresh, want)):
        return None
    slots = [next(j for j, t in enumerate(inputs) if t is a) for a in args]

    def call(*given: torch.Tensor):
        inp = list(inputs)
        for j, t in zip(slots, given):
            inp[j] = t
        with torch.inference_mode():
            out = compiled(*inp)
        return tuple(out[i] for i in fresh) if isinstance(expected, tuple) else out[fresh[0]]

    return call


def direct_or(direct, warm, guarded):
    """``direct`` for arguments like the warm-up's ``warm`` (a tensor or a tuple of them: shapes, strides, dtypes,
    devices, which the graph was compiled for), ``guarded`` (which compiles another graph once if needed) for
    others."""
    warm = warm if isinstance(warm, tuple) else (warm,)
    like = [(w.shape, w.stride(), w.dtype, w.device) for w in warm]

    def call(*args: torch.Tensor):
        if len(args) == len(like) and all((a.shape, a.stride(), a.dtype, a.device) == m for a, m in zip(args, like)):
            return direct(*args)
        return guarded(*args)

    return call


def cpp_wrapper() -> bool:
    """Whether CPU steps compile with inductor's C++ wrapper: ``DSV4_CPP_WRAPPER`` 1 (the default) or 0."""
    value = os.environ.get("DSV4_CPP_WRAPPER", "1")
    if value not in ("0", "1"):
        raise ValueError(f"DSV4_CPP_WRAPPER must be 0 or 1, got {value!r}")
    return value == "1"


def unguarded(fn):
    """A compiled step ``fn`` called without dynamo's guard checks: a step is compiled for one model and one decode
    state, whose dtypes, devices and shapes do not change while it lives, so the one graph it has is always the one
    to run, and checking some thousand guards on their tensors before each call (about 1.4 ms of a 10 ms step of
    the small preset) decides nothing. ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` keeps only the
    guards that tell a function's graphs apart. A model or state changed in those respects needs a new step. The
    call runs in inference mode with inference-tensor inputs, as the warm-up traced it (a tensor made outside
    inference mode differs in a guarded respect, and would cost a second graph)."""
    def call(*args):
        with torch.inference_mode(), torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            args = [a.clone() if isinstance(a, torch.Tensor) and not a.is_inference() else a for a in args]
            try:
                return fn(*args)
            except RuntimeError as e:  # raised before the graph runs: nothing was written
                if "Recompilation triggered" not in str(e):
                    raise
            # an input unlike the warm-up's in another guarded respect: its own graph, compiled once
            log.info("a compiled step met an input unlike its warm-up's: compiling a second graph")
        with torch.inference_mode():
            return fn(*args)

    return call


def clear_rows(state) -> None:
    """Every row of a decode state back to empty (``reset_row``)."""
    for r in range(state.rows):
        state.reset_row(r)


def warm_up(state: DecodeState, run, what: str) -> float | None:
    """Compile a step on ``state`` by running it once (``run()``) on its rows, which must all be free and are cleared
    after; the seconds it took, or None (one warning) where compiling fails: no C++ compiler, an unsupported
    backend, a graph break under ``fullgraph``."""
    if state.active.any():
        raise ValueError(f"compile a {what} before its state's rows are filled: the warm-up computes on them and "
                         f"clears them")
    t0 = time.perf_counter()
    if any(t.device.type == "cuda" for _, t in _state_tensors(state)):
        static_state(state)
    # AOTAutograd's cache off while compiling: its key does not tell apart graphs whose inputs share storage in
    # different ways (pytorch/pytorch#184694's review), and a step of the small preset compiled for 4112 tokens
    # loaded another graph's calling convention from it and failed its first call ("wrong number of dimensions3
    # for op: input"), decoding eager after that; inductor's own cache still serves the kernels (a warm compile of
    # that step: 30-36 s against 14 s with the AOTAutograd cache)
    with torch.inference_mode(), torch._functorch.config.patch(enable_autograd_cache=False):
        try:
            run()
        except Exception as e:
            log.warning("the compiled %s is not available (%s: %s); decoding eager", what, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            return None
        finally:
            clear_rows(state)  # the warm-up computed on the free rows
    seconds = time.perf_counter() - t0
    log.info("%s compiled for %d rows of %d tokens in %.1f s", what, state.rows, state.capacity, seconds)
    return seconds


# ------------------------------------------------------------------------------------------------- the step's math
def advance(state: DecodeState, tokens: int) -> None:
    """After a call of ``tokens`` per row: the active rows are that much longer."""
    state.lengths += state.active.long() * tokens


def positions_of(state: DecodeState, tokens: int, limit: int) -> torch.Tensor:
    """Positions [R, S] of S new tokens per row; a clear error past the state's capacity or the model's limit."""
    if tokens < 1:
        raise ValueError(f"a DecodeState call takes at least one token per row, got {tokens}")
    start = torch.where(state.active, state.lengths, 0)  # free slots compute from position 0
    top = int(start.max()) + tokens - 1
    if top >= state.capacity:
        raise ValueError(f"a row of the decode state is full (position {top}, capacity {state.capacity})")
    if top >= limit:
        raise ValueError(f"a row reaches position {top}, beyond max_position_embeddings ({limit})")
    return start.unsqueeze(1) + torch.arange(tokens, device=start.device)


def compiled_positions(state: DecodeState, tokens: int) -> torch.Tensor:
    """``positions_of`` without its checks (which read values back): inside a compiled step."""
    return torch.where(state.active, state.lengths, 0).unsqueeze(1) + torch.arange(tokens, device=state.lengths.device)


def compress_rows(compressor, x: torch.Tensor, rotary, rows: CompressorRows, pos: torch.Tensor) -> torch.Tensor:
    """Write each row's new token [R, 1, d] (at positions ``pos`` [R]) into its incomplete block; rows whose block
    it completes emit their entry (the same pooling, norm and RoPE as ``Compressor.forward``). Returns every row's
    entry slots [R, T, dim] (only the first ``(pos + 1) // rate`` of a row are filled)."""
    rate = compressor.rate
    idx = torch.arange(x.shape[0], device=x.device)
    slot = pos % rate
    rows.part_kv[idx, slot] = upcast(compressor.wkv(x))[:, 0].to(rows.part_kv.dtype)
    rows.part_gate[idx, slot] = upcast(compressor.wgate(x))[:, 0].to(rows.part_gate.dtype)
    if torch.compiler.is_compiling():  # static shapes: every row's entry computed, kept where its block ended
        return _emit_static(compressor, rotary, rows, pos)
    done = (slot == rate - 1).nonzero()[:, 0]
    if done.numel():
        kv = rows.part_kv[done]  # [done, rate, width]
        gate = rows.part_gate[done] + upcast(compressor.ape)
        if compressor.overlap:  # slots [0, rate): series b of the previous block; [rate, 2 rate): series a of this
            d = compressor.dim
            prev_kv, prev_gate = rows.prev_kv[done], rows.prev_gate[done]
            rows.prev_kv[done], rows.prev_gate[done] = kv[..., :d], gate[..., :d]
            kv, gate = torch.cat([prev_kv, kv[..., d:]], dim=1), torch.cat([prev_gate, gate[..., d:]], dim=1)
        entry = compressor.norm((kv * torch.softmax(gate, dim=1)).sum(dim=1))  # [done, dim]
        block = pos[done] // rate
        rows.entries[done, block] = compressor.finish(entry, block * rate, rotary).to(rows.entries.dtype)
    return rows.entries


def _emit_static(compressor, rotary, rows: CompressorRows, pos: torch.Tensor) -> torch.Tensor:
    """``compress_rows``'s emission with static shapes (a compiled step): each row's block pooled, and the entry and
    overlap series written only where this token ended the block."""
    rate = compressor.rate
    done = (pos % rate == rate - 1).view(-1, 1, 1)
    kv, gate = rows.part_kv, rows.part_gate + upcast(compressor.ape)
    if compressor.overlap:
        d = compressor.dim
        prev_kv, prev_gate = rows.prev_kv.clone(), rows.prev_gate.clone()
        rows.prev_kv.copy_(torch.where(done, kv[..., :d], rows.prev_kv))
        rows.prev_gate.copy_(torch.where(done, gate[..., :d], rows.prev_gate))
        kv, gate = torch.cat([prev_kv, kv[..., d:]], dim=1), torch.cat([prev_gate, gate[..., d:]], dim=1)
    entry = compressor.norm((kv * torch.softmax(gate, dim=1)).sum(dim=1))  # [R, dim]
    block = pos // rate
    idx = torch.arange(pos.shape[0], device=pos.device)
    old = rows.entries[idx, block]
    rows.entries[idx, block] = torch.where(done.view(-1, 1), compressor.finish(entry, block * rate, rotary)
                                           .to(old.dtype), old)
    return rows.entries


def attend_rows(attn, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, q_latent: torch.Tensor,
                positions: torch.Tensor, layer: LayerRows) -> torch.Tensor:
    """``Attention`` for one token per row at its own position: x [R, 1, d], q [R, 1, H, c], kv [R, 1, c],
    positions [R, 1] -> [R, 1, H, c]. One softmax per row over its window (the ring after this token's write), its
    visible entries (HCA; CSA in the dense phase) or the indexer's top-k of them (CSA), and the sink. Several
    tokens per row (S > 1: a speculative draft's check) take ``attend_rows_many``."""
    if q.shape[1] > 1:
        return attend_rows_many(attn, x, q, kv, q_latent, positions, layer)
    r, _, h, c = q.shape
    pos = positions[:, 0]
    idx = torch.arange(r, device=q.device)
    slot = pos % attn.window
    layer.ring[idx, slot] = kv[:, 0].to(layer.ring.dtype)
    layer.ring_pos[idx, slot] = pos
    # the kernel reads the keys in place (``fused.attend_picks``: each once, ``rows`` [R, k] the picks among a row's
    # window, then its entries); the reference gathers and concatenates them
    fast = fused.inference_serves(layer.ring)
    w = layer.ring.shape[1]
    keys, mask = upcast(layer.ring), layer.ring_pos >= 0  # the ring holds exactly each row's window: [R, W]
    rows = torch.arange(w, device=q.device).expand(r, w) if fast else None
    entries = layer.ring[:, :0]  # none unless compressed
    if attn.compressor is not None:
        entries = upcast(compress_rows(attn.compressor, x, attn.rotary, layer.compressor, pos))  # [R, T, c]
        t = entries.shape[1]
        visible = torch.arange(t, device=q.device) < ((pos + 1) // attn.rate).unsqueeze(1)  # [R, T]
        if attn.indexer is not None:  # its keys advance even when unused (dense phase)
            index_keys = attn.indexer._fp4(compress_rows(attn.indexer.compressor, x, attn.rotary, layer.indexer, pos))
        # the indexer chooses only when a row can see more entries than it picks (capacity decides, not the rows)
        if attn.indexer is not None and attn.sparse and t > attn.indexer.topk:
            qi, wi = attn.indexer.queries(x, q_latent, positions, attn.rotary)
            scores = attn.indexer.round_scores(chunk_scores(qi, wi, upcast(index_keys).transpose(1, 2)))[:, 0]
            scores = scores.masked_fill(~visible, float("-inf"))
            pick = topk_lower_index(scores, min(attn.indexer.topk, t))  # [R, k]
            visible = scores.gather(-1, pick) > float("-inf")  # fewer than k visible: the rest are masked
            if fast:
                rows = torch.cat([rows, w + pick], dim=1)
            else:
                keys = torch.cat([keys, entries.gather(1, pick.unsqueeze(-1).expand(-1, -1, c))], dim=1)  # [R, k, c]
        elif fast:  # every entry slot
            rows = torch.arange(w + t, device=q.device).expand(r, w + t)
        else:  # the ring and the slots are one buffer
            keys = layer.keys
        mask = torch.cat([mask, visible], dim=1)
    qs = upcast(q).view(r, h, c) * attn.scale
    if fast:
        out = fused.attend_picks(qs, layer.ring, entries, rows, mask, attn.attn_sink.float())
        return out.view(r, 1, h, c).to(q.dtype)
    logits = torch.bmm(qs, keys.transpose(1, 2)).masked_fill(~mask.unsqueeze(1), float("-inf"))  # [R, H, K]
    sink = upcast(attn.attn_sink).view(1, h, 1).expand(r, h, 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return torch.bmm(probs, keys).view(r, 1, h, c).to(q.dtype)


def attend_rows_many(attn, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, q_latent: torch.Tensor,
                     positions: torch.Tensor, layer: LayerRows) -> torch.Tensor:
    """``attend_rows`` for S tokens per row at positions [R, S]: each query's window is the ring before this call
    and the new tokens up to its own; its entries are those emitted up to its own position (the tokens go through
    the compressors in order); CSA picks top-k per query. The ring takes the new tokens last."""
    r, s, h, c = q.shape
    idx = torch.arange(r, device=q.device)
    keys = torch.cat([upcast(layer.ring), upcast(kv)], dim=1)  # [R, W + S, c]
    kpos = torch.cat([layer.ring_pos, positions], dim=1).unsqueeze(1)  # [R, 1, W + S]
    t = positions.unsqueeze(-1)  # [R, S, 1]
    mask = window_visible(kpos, t, attn.window)  # [R, S, W + S]
    for j in range(s):
        layer.ring[idx, positions[:, j] % attn.window] = kv[:, j].to(layer.ring.dtype)
        layer.ring_pos[idx, positions[:, j] % attn.window] = positions[:, j]
    picked = None  # CSA's top-k: [R, S, k, c] and which picks each query may use
    if attn.compressor is not None:
        for j in range(s):
            entries = compress_rows(attn.compressor, x[:, j:j + 1], attn.rotary, layer.compressor, positions[:, j])
            if attn.indexer is not None:
                index_keys = compress_rows(attn.indexer.compressor, x[:, j:j + 1], attn.rotary, layer.indexer,
                                           positions[:, j])
        entries = upcast(entries)
        n = entries.shape[1]
        visible = torch.arange(n, device=q.device) < ((positions + 1) // attn.rate).unsqueeze(-1)  # [R, S, T]
        if attn.indexer is not None and attn.sparse and n > attn.indexer.topk:
            qi, wi = attn.indexer.queries(x, q_latent, positions, attn.rotary)
            scores = attn.indexer.round_scores(chunk_scores(qi, wi, upcast(attn.indexer._fp4(index_keys))
                                                            .transpose(1, 2)))  # [R, S, T]
            scores = scores.masked_fill(~visible, float("-inf"))
            pick = topk_lower_index(scores, attn.indexer.topk)  # [R, S, k]
            rows = entries.gather(1, pick.flatten(1).unsqueeze(-1).expand(-1, -1, c))  # [R, S k, c]
            picked = rows.view(r, s, -1, c), scores.gather(-1, pick) > float("-inf")
        else:
            keys, mask = torch.cat([keys, entries], dim=1), torch.cat([mask, visible], dim=-1)
    qs = upcast(q) * attn.scale
    logits = torch.matmul(qs.reshape(r, s * h, c), keys.transpose(1, 2)).view(r, s, h, -1)  # [R, S, H, K]
    logits = logits.masked_fill(~mask.unsqueeze(2), float("-inf"))
    if picked is not None:
        own = torch.matmul(qs.reshape(r * s, h, c), picked[0].reshape(r * s, -1, c).transpose(1, 2))
        own = own.view(r, s, h, -1).masked_fill(~picked[1].unsqueeze(2), float("-inf"))
        logits = torch.cat([logits, own], dim=-1)
    sink = upcast(attn.attn_sink).view(1, 1, h, 1).expand(r, s, h, 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    shared = keys.shape[1]
    out = torch.matmul(probs[..., :shared].reshape(r, s * h, shared), keys).view(r, s, h, c)
    if picked is not None:
        own = probs[..., shared:].reshape(r * s, h, -1)
        out = out + torch.bmm(own, picked[0].reshape(r * s, -1, c)).view(r, s, h, c)
    return out.to(q.dtype)


# --------------------------------------------------------------------- a few tokens against a ModelCache
def attend_cached(attn, x, q, kv, q_latent, positions, cache: LayerCache) -> torch.Tensor:
    """The fast path for a few new tokens per row with a cache (decoding; a speculative draft's check) in a few
    batched ops, where the general one spends some hundred small ops on blocks, masks and merges. One softmax
    per query joins its window (the ring before this call's writes, plus the new tokens up to its own; for one
    token, the ring after its write, its empty slots masked), its visible entries (HCA and CSA's dense phase: all;
    CSA: the indexer's top-k of them) and the sink. Tests hold it to the reference path, outputs and
    gradients."""
    b, s, h, c = q.shape
    t = positions.unsqueeze(-1)  # [S, 1]
    if s == 1 and not kv.requires_grad:  # once this token is written, the ring holds exactly its window (slot
        # order does not matter); with autograd the ring's detached copy would cut the new key's gradient
        cache.write_window(kv, positions)
        keys, kpos = cache.window_keys()
        keys, mask = upcast(keys), (kpos >= 0).unsqueeze(0)  # empty slots hold -1
    else:
        ring, ring_pos = cache.window_keys()  # [B, W, c] before this call's writes
        keys, kpos = upcast(kv), positions
        if ring is not None:
            keys, kpos = torch.cat([upcast(ring), keys], dim=1), torch.cat([ring_pos, positions])
        mask = (kpos <= t) & (kpos > t - attn.window) & (kpos >= 0)  # [S, window keys]; empty slots at -1
        cache.write_window(kv, positions)
    own = None  # CSA's top-k: each query's own entries [B, S, k, c] and which of them it may use
    if attn.compressor is not None:
        entries = upcast(attn.compressor.all_entries(x, attn.rotary, cache.compressor))  # [B, T, c]
        n = entries.shape[1]

        def visible() -> torch.Tensor:  # [S, T]: one query sees every entry emitted so far
            return torch.arange(n, device=q.device) < torch.div(t + 1, attn.rate, rounding_mode="floor")

        if attn.indexer is not None:  # its keys advance even when unused (dense phase, no entry yet)
            xd, qd = x.detach(), q_latent.detach()
            index_keys = attn.indexer.keys(xd, attn.rotary, cache.indexer)
            if attn.sparse and n > attn.indexer.topk:
                qi, wi = attn.indexer.queries(xd, qd, positions, attn.rotary)
                scores = attn.indexer.round_scores(chunk_scores(qi, wi, upcast(index_keys).transpose(1, 2)))
                if s > 1:  # the last queries see entries that the first do not
                    scores = scores.masked_fill(~visible(), float("-inf"))
                idx = topk_lower_index(scores, attn.indexer.topk)  # [B, S, k]
                picked = kernels.gather_rows(entries.reshape(b * n, c), kernels.flat_rows(idx, n)).view(b, s, -1, c)
                # one query sees every entry emitted so far, so each of its k < T picks is visible
                own = picked, None if s == 1 else scores.gather(-1, idx) > float("-inf")
        if own is None:
            keys = torch.cat([keys, entries], dim=1)
            mask = torch.cat([mask.expand(s, -1), visible().expand(s, -1)], dim=-1)
    qs = upcast(q) * attn.scale
    if own is None:  # one key set for every query: [B, S H, c] x [B, c, K]
        logits = torch.matmul(qs.reshape(b, s * h, c), keys.transpose(1, 2)).view(b, s, h, -1)
        mask = mask.unsqueeze(-2)  # [S, 1, K]
    else:  # each query its own keys: the window's, then its top-k entries
        keys = torch.cat([keys.unsqueeze(1).expand(b, s, -1, c), own[0]], dim=2)  # [B, S, K, c]
        picks = own[1] if own[1] is not None else mask.new_ones(1, 1, own[0].shape[2]).expand(b, s, -1)
        mask = torch.cat([mask.expand(b, s, -1), picks], dim=-1).unsqueeze(-2)  # [B, S, 1, K]
        logits = torch.bmm(qs.reshape(b * s, h, c), keys.reshape(b * s, -1, c).transpose(1, 2)).view(b, s, h, -1)
    logits = logits.masked_fill(~mask, float("-inf"))
    sink = upcast(attn.attn_sink).view(1, 1, h, 1).expand(b, s, h, 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    if own is None:
        out = torch.matmul(probs.reshape(b, s * h, -1), keys)
    else:
        out = torch.bmm(probs.reshape(b * s, h, -1), keys.reshape(b * s, -1, c))
    return out.view(b, s, h, c).to(q.dtype)


# ------------------------------------------------------------------------ the one door: eager steps of few tokens
# An eager decoding step of a few tokens on the CPU spends most of its time dispatching small tensor ops, not on
# arithmetic. Its faster forms live here, behind one switch: ``Block.forward`` decides once per block, with
# ``eager_step_of``, whether its call is such a step (a cache, at most ``FEW_TOKENS`` tokens, the CPU, no autograd,
# not compiling) and, if so, runs under ``EAGER_STEP``; the modules ask ``eager_step()`` and take the form below,
# else their own tensor path, which is the reference the tests hold each form to. A compiled step never takes them:
# they are data-dependent Python (``eager_step`` is False while compiling, before it reads the switch).
# Measurements: docs/performance-notes.md.
FEW_TOKENS = 8  # tokens (rows x queries) up to which a step takes the forms below


class _EagerStep(threading.local):
    """The switch, one per thread (a server's threads decode apart): on inside ``with EAGER_STEP:``."""

    on = False

    def __enter__(self) -> None:
        self.on = True

    def __exit__(self, *exc) -> None:
        self.on = False


EAGER_STEP = _EagerStep()


def eager_step_of(streams: torch.Tensor, cache) -> bool:
    """Whether a block's call on ``streams`` [B, S, n, d] with ``cache`` is an eager decoding step of few tokens on
    the CPU (``Block.forward`` asks once, then runs under ``EAGER_STEP``)."""
    return (cache is not None and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and streams.device.type == "cpu" and streams.shape[:-2].numel() <= FEW_TOKENS)


def eager_step() -> bool:
    """Whether the modules compute an eager decoding step of few tokens on the CPU: take this section's forms."""
    return not torch.compiler.is_compiling() and EAGER_STEP.on


def mix_rows(unit, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``HyperConnection.forward`` (mHC) of an eager step: per position, the 2n + n^2 mixing values and the norm of
    the streams come to Python floats (float64) in one list, where the tensor path spends some forty small ops on
    them; Sinkhorn by ``sinkhorn_one``. The three results are views of one tensor."""
    n, lead, d = unit.n, streams.shape[:-2], streams.shape[-1]
    x = upcast(streams.reshape(-1, n * d))  # [N, n d]
    vals = torch.cat([linear(x, upcast(unit.fn)), torch.linalg.vector_norm(x, dim=-1, keepdim=True)], -1).tolist()
    base, (s_pre, s_post, s_comb) = unit.base.tolist(), unit.scale.tolist()
    pre, post, comb = [], [], []
    for row in vals:
        inv_rms = 1.0 / math.sqrt(row[-1] ** 2 / (n * d) + unit.norm_eps)  # normed_linear's scale, factored out
        mix = [v * inv_rms for v in row[:-1]]
        pre += [_sigmoid(m * s_pre + b) + unit.hc_eps for m, b in zip(mix[:n], base[:n])]
        post += [2 * _sigmoid(m * s_post + b) for m, b in zip(mix[n:2 * n], base[n:2 * n])]
        logits = [m * s_comb + b for m, b in zip(mix[2 * n:], base[2 * n:])]
        comb += [v for r in sinkhorn_one([logits[i * n:(i + 1) * n] for i in range(n)], unit.iters, unit.hc_eps)
                 for v in r]
    rows = len(vals)
    mixing = torch.tensor(pre + post + comb, dtype=x.dtype)
    collapsed = torch.bmm(mixing[:rows * n].view(rows, 1, n), upcast(streams.reshape(rows, n, d)))
    return (collapsed.view(*lead, d), mixing[rows * n:2 * rows * n].view(*lead, n),
            mixing[2 * rows * n:].view(*lead, n, n))


def _sigmoid(v: float) -> float:
    """1 / (1 + e^-v) for a Python float, without overflow for large |v|."""
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def sinkhorn_one(logits: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    """``hyper.sinkhorn`` of one matrix as Python floats, kept as diag(r) K diag(c) with K = softmax + eps: a row
    normalization divides row i by r_i (K c)_i + eps, which is r_i <- r_i / (r_i (K c)_i + eps); columns alike."""
    k = []
    for row in logits:
        top = max(row)
        e = [math.exp(v - top) for v in row]
        total = sum(e)
        k.append([v / total + eps for v in e])
    c = [1.0 / (sum(col) + eps) for col in zip(*k)]  # the first column normalization (r = 1)
    return (balance_4 if len(k) == 4 else balance)(k, c, iters, eps)


def balance(k: list[list[float]], c: list[float], iters: int, eps: float) -> list[list[float]]:
    """``sinkhorn_one``'s remaining iters - 1 row and column normalizations of diag(r) K diag(c), then the matrix."""
    kt = [list(col) for col in zip(*k)]
    r = [1.0] * len(k)
    for _ in range(iters - 1):
        r = [ri / (ri * sum(map(operator.mul, row, c)) + eps) for ri, row in zip(r, k)]
        c = [cj / (cj * sum(map(operator.mul, col, r)) + eps) for cj, col in zip(c, kt)]
    return [[ri * kij * cj for kij, cj in zip(row, c)] for ri, row in zip(r, k)]


def balance_4(k: list[list[float]], c: list[float], iters: int, eps: float) -> list[list[float]]:
    """``balance`` for 4 x 4 (the residual's four streams, spec 3) written out: the same operations in the same
    order, so the same floats, faster than the loops over lists (a step runs one per mHC unit and token)."""
    (k00, k01, k02, k03), (k10, k11, k12, k13), (k20, k21, k22, k23), (k30, k31, k32, k33) = k
    c0, c1, c2, c3 = c
    r0 = r1 = r2 = r3 = 1.0
    for _ in range(iters - 1):
        r0 = r0 / (r0 * (k00 * c0 + k01 * c1 + k02 * c2 + k03 * c3) + eps)
        r1 = r1 / (r1 * (k10 * c0 + k11 * c1 + k12 * c2 + k13 * c3) + eps)
        r2 = r2 / (r2 * (k20 * c0 + k21 * c1 + k22 * c2 + k23 * c3) + eps)
        r3 = r3 / (r3 * (k30 * c0 + k31 * c1 + k32 * c2 + k33 * c3) + eps)
        c0 = c0 / (c0 * (k00 * r0 + k10 * r1 + k20 * r2 + k30 * r3) + eps)
        c1 = c1 / (c1 * (k01 * r0 + k11 * r1 + k21 * r2 + k31 * r3) + eps)
        c2 = c2 / (c2 * (k02 * r0 + k12 * r1 + k22 * r2 + k32 * r3) + eps)
        c3 = c3 / (c3 * (k03 * r0 + k13 * r1 + k23 * r2 + k33 * r3) + eps)
    return [[r0 * k00 * c0, r0 * k01 * c1, r0 * k02 * c2, r0 * k03 * c3],
            [r1 * k10 * c0, r1 * k11 * c1, r1 * k12 * c2, r1 * k13 * c3],
            [r2 * k20 * c0, r2 * k21 * c1, r2 * k22 * c2, r2 * k23 * c3],
            [r3 * k30 * c0, r3 * k31 * c1, r3 * k32 * c2, r3 * k33 * c3]]


def expert_rows(experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``Experts.forward`` of an eager step: token by token, its experts in turn (``Experts._expert``, the routing
    weight a Python float), summed in expert order, where grouping tokens by expert (a sort, a count, gathers and
    scatters: some fifteen dispatches) costs more than the products. x [N, d]; weights / indices [N, k] -> [N, d]. A
    token's output does not depend on the other tokens (as ``per_token``'s)."""
    of = experts.weights_getter()
    rows = []
    for xt, ws, es in zip(x.split(1), weights.tolist(), indices.tolist()):
        out = None
        for e, g in sorted(zip(es, ws)):
            y = experts._expert(xt, *of(e), g)
            out = y if out is None else out.add_(y)
        rows.append(out)
    if len(rows) == 1:
        return rows[0]
    return torch.cat(rows) if rows else torch.zeros_like(x)  # none: an expert-parallel rank that received none
