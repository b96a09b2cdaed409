"""Serving with the routed experts spread over processes: ``torchrun --nproc_per_node N -m dsv4 serve ...``.

Each MoE layer of an expert-parallel model (``dsv4.parallel.inference``) exchanges rows with every rank, so all ranks
must run the same model calls, in the same order, on the same inputs. Rank 0 runs the HTTP server and the whole
engine (``LeaderEngine``: scheduling, sampling, stop strings, the prefix cache, the tokenizer); the other ranks run
a ``Follower``, which holds no engine, only the model, one ``DecodeState`` of rank 0's shape and the one-row caches
of the prompts being prefilled, and replays rank 0's model operations as rank 0 announces them:

- ``new``: a prompt was admitted; its one-row cache is empty, or (a prefix-cache hit on rank 0) the restored cache,
  sent along. The prefix cache lives on rank 0 only, so its disk tier and its evictions need not agree anywhere.
- ``prefill``: one chunk of that prompt through its cache; after its last chunk, the cache goes into the rows of the
  request's samples (``load_row``) and is dropped.
- ``drop``: a cancelled prompt's cache is dropped before its prefill ended.
- ``step``: one decoding step of every row, with rank 0's tokens and rank 0's active rows (rows that rank 0 ended
  since the last step are reset first, so that even the free rows hold the same state on every rank).
- ``beat``: nothing (sent while rank 0 is idle, so that a follower's wait never reaches the process group's
  timeout); ``stop``: rank 0's engine has ended; the follower returns.

Each announcement is one ``broadcast_object_list`` from rank 0, sent before rank 0 runs the operation itself, so that
every rank meets the operation's collectives (the exchanges of the MoE layers) in the same order. Followers compute
no logits: only rank 0 samples, so every rank feeds the same tokens whatever their CPUs round differently.

Speculative decoding (its MTP block is expert-parallel too) and the compiled decoding step have not been run with the
experts split: ``check_options`` refuses them.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from dsv4.model.decode import DecodeState
from dsv4.serve.engine import Engine

log = logging.getLogger("dsv4.serve")

__all__ = ["Follower", "LeaderEngine", "check_options", "start"]

HEARTBEAT_S = 30.0  # rank 0 idle this long: a ``beat`` (the process group's timeout is far longer)


def check_options(compile: bool | None, speculative: bool) -> None:
    """Refuse what has not been run with the experts split over ranks (on every rank, before any weight is read)."""
    if speculative:
        raise ValueError("--speculative is not available with the experts spread over ranks (torchrun): serve "
                         "without it, or in one process")
    if compile:
        raise ValueError("--compile: the compiled decoding step has not been tested with the experts spread over "
                         "ranks (torchrun); serve eager (--no-compile, the default there)")


def _send(msg: tuple, group=None) -> None:
    dist.broadcast_object_list([msg], src=_src(group), group=group)


def _recv(group=None) -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=_src(group), group=group)
    return box[0]


def _src(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def start(ranks, error: BaseException | None, shape: dict | None = None) -> dict:
    """Every rank's setup (loading, and on rank 0 the engine) agreed on at once: each rank passes the error its setup
    raised (or None), rank 0 its state's shape (``rows``, ``capacity``). Raises on every rank if any rank failed
    (each failed rank re-raises its own error); else returns rank 0's shape."""
    got = [None] * ranks.size
    dist.all_gather_object(got, (None if error is None else f"{type(error).__name__}: {error}", shape),
                           group=ranks.group)
    if error is not None:
        raise error
    failed = [(r, e) for r, (e, _) in enumerate(got) if e is not None]
    if failed:
        raise RuntimeError("serving across ranks did not start: " + "; ".join(f"rank {r}: {e}" for r, e in failed))
    return got[0][1]


class LeaderEngine(Engine):
    """Rank 0's engine: ``Engine``, announcing each model operation to the followers before running it (see the
    module). Takes ``Engine``'s arguments, ``ranks`` (``dsv4.parallel.inference.Ranks``, rank 0) and ``heartbeat_s``.
    After construction, ``start`` (collective) must run on every rank before ``run``."""

    def __init__(self, model, tokenizer, *, ranks, heartbeat_s: float | None = None, compile: bool | None = False,
                 speculative: bool = False, **kwargs):
        check_options(compile, speculative)
        if not ranks.is_main:
            raise ValueError(f"LeaderEngine runs on rank 0; this is rank {ranks.rank} (run a Follower)")
        super().__init__(model, tokenizer, compile=False, speculative=False, **kwargs)
        self.ranks = ranks
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self._handles: dict[int, int] = {}  # id(Prefill) -> the followers' name of its cache
        self._next_handle = 0
        self._last_sent = time.monotonic()
        step = self.step

        def announced_step(tokens: torch.Tensor) -> torch.Tensor:
            self._announce(("step", tokens.clone(), self.state.active.clone()))
            return step(tokens)

        self.step = announced_step

    @property
    def shape(self) -> dict:
        """What a follower needs to build the same decode state."""
        return {"rows": self.state.rows, "capacity": self.state.capacity}

    def _announce(self, msg: tuple) -> None:
        _send(msg, self.ranks.group)
        self._last_sent = time.monotonic()

    def run(self) -> None:
        try:
            super().run()
        finally:
            try:
                self._announce(("stop",))
            except Exception as e:  # a follower already gone: nothing left to tell
                log.warning("could not tell the other ranks to stop (%s: %s)", type(e).__name__, e)

    # every turn begins here: a beat when idle long enough
    def _take_new(self) -> None:
        if time.monotonic() - self._last_sent >= self.heartbeat_s:
            self._announce(("beat",))
        super()._take_new()

    def _drop_cancelled(self) -> None:
        before = list(self.prefilling)
        super()._drop_cancelled()
        kept = {id(j) for j in self.prefilling}
        for job in before:
            if id(job) not in kept:
                self._announce(("drop", self._handles.pop(id(job))))

    def _admit(self) -> None:
        known = {id(j) for j in self.prefilling}
        super()._admit()
        for job in self.prefilling:
            if id(job) in known:
                continue
            handle = self._handles[id(job)] = self._next_handle
            self._next_handle += 1
            # a prefix-cache hit: the restored cache itself (the followers hold no prefix cache)
            self._announce(("new", handle, job.cache if job.position > 0 else None))

    def _prefill_one_chunk(self) -> bool:
        if self.prefilling:
            job = self.prefilling[0]
            last = len(job.cuts) == 1
            handle = self._handles.pop(id(job)) if last else self._handles[id(job)]
            ids = job.request.prompt_ids[job.position:job.cuts[0]]
            self._announce(("prefill", handle, ids, list(job.rows) if last else None))
        return super()._prefill_one_chunk()


class Follower:
    """A rank other than 0 while rank 0 serves: replays rank 0's model operations (see the module) until rank 0's
    engine ends. ``run`` after ``start``, with rank 0's shape."""

    def __init__(self, model, ranks, shape: dict):
        if ranks.is_main:
            raise ValueError("rank 0 runs the LeaderEngine, not a Follower")
        self.model, self.ranks = model.eval(), ranks
        with torch.inference_mode():
            self.state = DecodeState(model, shape["rows"], shape["capacity"])
        self.caches: dict[int, object] = {}
        self.counts = {"new": 0, "hits": 0, "prefill": 0, "drop": 0, "step": 0, "beat": 0}

    def run(self) -> None:
        """Until rank 0's ``stop``; an operation this follower cannot replay raises (naming it)."""
        with torch.inference_mode():
            while True:
                msg = _recv(self.ranks.group)
                kind = msg[0]
                if kind == "stop":
                    c = self.counts
                    log.info("rank %d followed rank 0: %d prompts (%d from the prefix cache), %d prefill chunks, "
                             "%d decoding steps, %d cancelled, %d beats", self.ranks.rank, c["new"], c["hits"],
                             c["prefill"], c["step"], c["drop"], c["beat"])
                    return
                if kind not in self.counts:
                    raise RuntimeError(f"rank {self.ranks.rank}: unknown operation {kind!r} from rank 0")
                self.counts[kind] += 1
                getattr(self, "_" + kind)(*msg[1:])

    def _new(self, handle: int, cache) -> None:
        self.counts["hits"] += cache is not None
        self.caches[handle] = cache if cache is not None else self.model.new_cache(1)

    def _prefill(self, handle: int, ids: list[int], rows: list[int] | None) -> None:
        cache = self._cache(handle)
        self.model.hidden_streams(torch.tensor([ids], device=self.model.device), cache=cache)
        if rows is not None:  # the prompt's last chunk: its samples' rows continue it
            for row in rows:
                self.state.load_row(row, cache)
            del self.caches[handle]

    def _drop(self, handle: int) -> None:
        self._cache(handle)
        del self.caches[handle]

    def _step(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        if (active & ~self.state.active).any():
            rows = torch.nonzero(active & ~self.state.active).view(-1).tolist()
            raise RuntimeError(f"rank {self.ranks.rank} is out of step with rank 0: rows {rows} are active on rank 0 "
                               "only")
        for row in torch.nonzero(self.state.active & ~active).view(-1).tolist():  # ended on rank 0 since
            self.state.reset_row(row)
        self.model.hidden_streams(tokens.unsqueeze(1).to(self.model.device), cache=self.state)

    def _beat(self) -> None:
        pass

    def _cache(self, handle: int):
        if handle not in self.caches:
            raise RuntimeError(f"rank {self.ranks.rank} is out of step with rank 0: no prompt cache {handle}")
        return self.caches[handle]
