"""The inference engine: continuous batching over a ``DecodeState``, chunked prefill, exact prefix reuse.

One thread owns the model. Each turn of its loop it takes new requests and cancellations, admits waiting requests
into free rows (each of a request's ``n`` samples takes a row), prefills one chunk of the oldest admitted prompt (so
that a long prompt does not stall the streams of running requests), then decodes one token for every running row in
one call. Requests join and leave between turns. Callers never wait on a model step: ``submit`` queues a request
and returns, and each sample's text arrives through the request's ``emit`` callback as ``Event``s.

Prompts resume from the longest cached prefix (``PrefixCache``) and prefill only the rest; the cache gets an anchor at
every prefill chunk's end, at the prompt's last block boundary, and at each block boundary a sample decodes past.
Decoding runs at a fixed row count with per-token experts, so a row's logits do not change with what else runs.
What a request asks for, how each token is chosen, stop strings and the events: ``dsv4.serve.sampling``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsv4.generate import check_draft, draw_draft
from dsv4.model.decode import DecodeState, DecodeStep, compressor_rates
from dsv4.model.speculative import SpeculativeStep, mtp_logits
from dsv4.model.numerics import numerics_of
from dsv4.serve.prefix_cache import PrefixCache, model_fingerprint
from dsv4.serve.sampling import (EngineError, Event, SamplingParams, add_event, find_stop, logprobs_of, new_outputs,
                                 sample_token, stop_holdback)

log = logging.getLogger("dsv4.serve")


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    id: str = ""
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache
    first_token: float | None = None
    samples: list = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Prefill:
    """A prompt being prefilled: its one-row cache up to ``position``, the positions where its chunks end, the rows
    its samples will take; speculative: the MTP block's cache and the streams of its last position, which wait for
    the token after them."""

    request: Request
    cache: object
    position: int
    cuts: list[int]
    rows: list[int]
    mtp: object = None
    mtp_last: torch.Tensor | None = None


class Sample:
    """One of a request's ``n`` continuations, decoding in row ``row``."""

    def __init__(self, engine: Engine, request: Request, index: int, row: int):
        self.request, self.index, self.row = request, index, row
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(seed + index) if seed is not None else None
        self.ids: list[int] = []  # generated ids
        self.all_ids = list(request.prompt_ids)  # prompt + generated: the prefix cache's key
        self.decoder = engine.new_decoder()
        self.text = ""  # final text so far (before any stop string)
        self.sent = 0  # characters of ``text`` emitted
        self.pending_ids: list[int] = []
        self.pending_lp: list[dict] = []
        self.done = False
        self.draft: int | None = None  # speculative: the MTP block's guess of the token after the last one
        self.draft_probs: torch.Tensor | None = None  # the distribution it was drawn from (sampling)


class Engine:
    def __init__(self, model, tokenizer, *, max_model_len: int | None = None, max_num_seqs: int = 8,
                 kv_memory_bytes: int | None = None, prefill_chunk: int = 512, prefix_cache: bool = True,
                 cache_memory_bytes: int = 2 << 30, cache_dir=None, cache_disk_bytes: int = 16 << 30,
                 speculative: bool = False, compile: bool | None = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs the model's MTP block (num_nextn_predict_layers >= 1)")
        self.speculative = speculative
        # speculative steps feed a draft one position past the last token: rows hold one position more
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings - int(speculative))
        capacity = self.max_model_len + int(speculative)
        self.block = math.lcm(*[r for r in compressor_rates(model).values()] or [1])
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = max(self.block, prefill_chunk // self.block * self.block)
        with torch.inference_mode():
            probe = DecodeState(model, 1, capacity, mtp=speculative)
        self.row_bytes = probe.nbytes()
        rows = max_num_seqs
        if kv_memory_bytes is not None:
            rows = min(rows, kv_memory_bytes // self.row_bytes)
            if rows < 1:
                raise ValueError(f"--kv-memory-gib holds no sequence of {self.max_model_len} tokens "
                                 f"({self.row_bytes / 2**30:.3f} GiB each); lower --max-model-len or raise it")
        self.rows = rows
        with torch.inference_mode():
            self.state = DecodeState(model, rows, capacity, mtp=speculative)
        if compile is None:  # by default where compiling (minutes the first time on a small CPU) is sure to pay:
            # a server of rows enough that every step runs all the experts, not a one-row chat; not for a packed
            # model, whose experts run one by one (dsv4.model.packed)
            stacked = all(getattr(m, "stacked", True) for m in model.modules())
            compile = stacked and rows * model.config.num_experts_per_tok >= model.config.n_routed_experts
        # one compiled step: the plain one, or with speculative decoding its two parts (two tokens a row, then the
        # MTP block: dsv4.model.speculative)
        self.step = DecodeStep(model, self.state, compile=compile and not speculative)
        self.spec = SpeculativeStep(model, self.state, compile=compile) if speculative else None
        self._mark = None  # the speculative step's mark of the state, written over at each step
        self.compile_seconds: float | None = (self.spec or self.step).compile_seconds
        self.prefix: PrefixCache | None = None
        if prefix_cache:
            self.prefix = PrefixCache(
                block=self.block, rates=compressor_rates(model), new_cache=lambda: model.new_cache(1),
                fingerprint=model_fingerprint(model, getattr(tokenizer, "sha256", ""), numerics_of(model)),
                memory_bytes=cache_memory_bytes, disk_dir=cache_dir, disk_bytes=cache_disk_bytes)
        self.eos = tokenizer.eos_id
        self.incoming: queue.Queue[Request] = queue.Queue()
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Prefill] = []  # admitted prompts, oldest first
        self.running: dict[int, Sample] = {}  # row -> sample
        self.free = list(range(rows))
        self.wake = threading.Event()
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._kv_in_use = 0
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "prefill_tokens": 0,
                      "drafts": 0, "accepted": 0}

    # ------------------------------------------------------------------------------------------------ interface
    def new_decoder(self):
        from dsv4.data.tokenizer import IncrementalDecoder

        return IncrementalDecoder(self.tokenizer)

    def start(self) -> Engine:
        """Run the loop in a thread of its own. (On CPUs the model's steps run up to 2x slower outside the main
        thread, whose OpenMP team PyTorch tunes: ``dsv4 serve`` runs ``run`` in the main thread instead and the
        HTTP server in another.)"""
        self.thread = threading.Thread(target=self.run, name="dsv4-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to end after its current turn (from any thread)."""
        self.stopped = True
        self.wake.set()

    def shutdown(self) -> None:
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ``EngineError`` (4xx) for a request that can never run."""
        params.check()
        if not prompt_ids:
            raise EngineError("the prompt holds no token")
        if len(prompt_ids) >= self.max_model_len:
            raise EngineError(f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is "
                              f"{self.max_model_len} (--max-model-len), prompt and completion together")
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise EngineError(f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({params.max_tokens}) exceed "
                              f"this model's maximum context length of {self.max_model_len} tokens")
        if params.n > self.rows:
            raise EngineError(f"n={params.n} exceeds the {self.rows} sequences this server decodes at once")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise EngineError(f"token ids must be in [0, {vocab})")

    def submit(self, request: Request) -> Request:
        """Queue a request (validated first); its events arrive through ``request.emit`` from the engine's thread."""
        if self.error is not None:
            raise EngineError(f"the engine has stopped: {self.error}", status=500)
        self.validate(request.prompt_ids, request.params)
        self.stats["requests"] += 1
        self.incoming.put(request)
        self.wake.set()
        return request

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[dict]:
        """Blocking: every sample's text, ids and finish reason (``submit`` with a collecting callback)."""
        outs = new_outputs(params.n)
        req = self.submit(Request(list(prompt_ids), params, lambda ev: add_event(outs, ev)))
        req.finished.wait()
        return outs

    def kv_bytes_in_use(self) -> int:
        """Decode-state bytes the running requests' tokens occupy (each row's share of its capacity up to its
        length), plus the caches of prompts being prefilled; as of the engine's last turn."""
        return self._kv_in_use

    def _count_kv(self) -> int:
        rows = sum(self.row_bytes * min(1.0, int(self.state.lengths[r]) / self.max_model_len) for r in self.running)
        return round(rows) + sum(job.cache.nbytes() for job in self.prefilling)

    # ----------------------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        """The engine's loop, until ``stop``."""
        try:
            with torch.inference_mode():
                while not self.stopped:
                    self._take_new()
                    self._drop_cancelled()
                    self._admit()
                    worked = self._prefill_one_chunk()
                    if self.running:
                        self._decode_step()
                        worked = True
                    self._kv_in_use = self._count_kv()
                    if not worked:
                        self.wake.wait(0.05)
                        self.wake.clear()
        except KeyboardInterrupt:  # Ctrl-C: the requests in flight end, quietly
            self.stopped = True
            for req in self._in_flight():
                self._finish_request(req, "abort")
        except BaseException as e:  # a failed step fails every request in flight, not silently
            log.exception("engine stopped")
            self.error = e
            for req in self._in_flight():
                self._finish_request(req, "abort")

    def _in_flight(self) -> list[Request]:
        reqs = list(self.waiting) + [job.request for job in self.prefilling]
        reqs += list({id(s.request): s.request for s in self.running.values()}.values())
        while not self.incoming.empty():
            reqs.append(self.incoming.get_nowait())
        return reqs

    def _take_new(self) -> None:
        while True:
            try:
                self.waiting.append(self.incoming.get_nowait())
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish_request(req, "abort")
        for job in [j for j in self.prefilling if j.request.cancelled]:
            self.prefilling.remove(job)
            self.free += job.rows
            self._finish_request(job.request, "abort")
        for row, sample in list(self.running.items()):
            if sample.request.cancelled:
                self._end_sample(sample, "abort")

    def _admit(self) -> None:
        """Waiting requests, oldest first, while rows are free for all their samples (none jumps the queue)."""
        while self.waiting and len(self.free) >= self.waiting[0].params.n:
            req = self.waiting.popleft()
            rows = [self.free.pop(0) for _ in range(req.params.n)]
            ids = req.prompt_ids
            start, cache = self.prefix.lookup(ids) if self.prefix is not None else (0, None)
            if cache is None:
                cache = self.model.new_cache(1)
            req.cached_tokens = start
            last = (len(ids) - 1) // self.block * self.block  # the prompt's last block boundary below its end
            cuts = sorted({c for c in range(start + self.prefill_chunk, last, self.prefill_chunk)} |
                          ({last} if last > start else set()) | {len(ids)})
            mtp = self.model.mtp[0].attn.new_cache() if self.speculative else None
            self.prefilling.append(Prefill(req, cache, start, cuts, rows, mtp))

    def _prefill_one_chunk(self) -> bool:
        if not self.prefilling:
            return False
        job = self.prefilling[0]
        req, a = job.request, job.position
        end = job.cuts.pop(0)
        ids = torch.tensor([req.prompt_ids[a:end]], device=self.model.device)
        streams, _ = self.model.hidden_streams(ids, cache=job.cache)
        logits = self.model.logits_from_streams(streams[:, -1:])[0, -1]
        if job.mtp is not None:  # the MTP block reads each position with the token after it
            if job.mtp_last is not None:
                streams = torch.cat([job.mtp_last, streams], dim=1)
            first = a - (job.mtp_last is not None)
            if end - 1 > first:
                self._mtp(streams[:, :-1], req.prompt_ids[first + 1:end], torch.arange(first, end - 1), job.mtp)
            job.mtp_last = streams[:, -1:]
        self.stats["prefill_tokens"] += end - a
        job.position = end
        if self.prefix is not None and end % self.block == 0:
            self.prefix.store(req.prompt_ids, job.cache)
        if job.cuts:
            return True
        self.prefilling.pop(0)
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        req.samples = [Sample(self, req, i, row) for i, row in enumerate(job.rows)]
        tokens = [sample_token(logits, req.params, s.generator) for s in req.samples]
        mtp = None
        if job.mtp is not None:  # each sample's first token goes with the prompt's last position
            mtp = job.mtp.repeat_rows(len(tokens))
            n = len(tokens)
            draft_logits = self._mtp(job.mtp_last.expand(n, -1, -1, -1), tokens, torch.tensor([end - 1]), mtp)[:, 0]
        for i, sample in enumerate(req.samples):
            self.state.load_row(sample.row, job.cache, None if mtp is None else (mtp, i))
            self.running[sample.row] = sample
        for i, sample in enumerate(req.samples):
            if self._take(sample, tokens[i], logits) and mtp is not None:
                self._set_draft(sample, draft_logits[i])
        return True

    def _mtp(self, streams: torch.Tensor, next_ids, positions: torch.Tensor, cache) -> torch.Tensor:
        """``mtp_logits`` with the ids after each position as a list or tensor ([B, S] or, for one position,
        [B])."""
        ids = torch.as_tensor(next_ids, device=self.model.device).view(streams.shape[0], streams.shape[1])
        return mtp_logits(self.model, streams, ids, positions.to(self.model.device), cache)

    def _set_draft(self, sample: Sample, draft_logits: torch.Tensor) -> None:
        p = sample.request.params
        sample.draft, sample.draft_probs = draw_draft(draft_logits, p.temperature, p.top_p, sample.generator)

    def _decode_step(self) -> None:
        if self.speculative:
            return self._speculative_step()
        tokens = torch.zeros(self.state.rows, dtype=torch.long)
        for row, sample in self.running.items():
            tokens[row] = sample.all_ids[-1]
        logits = self.step(tokens)
        self.stats["steps"] += 1
        for row, sample in list(self.running.items()):
            self._store_boundary(sample)
            self._take(sample, sample_token(logits[row], sample.request.params, sample.generator), logits[row])

    def _store_boundary(self, sample: Sample) -> None:
        """At a block boundary, the row's state goes to the prefix cache (an anchor of its prompt and output)."""
        if self.prefix is not None and int(self.state.lengths[sample.row]) % self.block == 0:
            self.prefix.store(sample.all_ids, self.state.extract_row(sample.row))

    def _speculative_step(self) -> None:
        """Every row takes its last token and its draft in one call; a row keeps the draft if it passes speculative
        sampling's test (then one more token from the same call), else the corrected token, and the draft's
        position is rolled back. The MTP block then drafts each row's next token. Greedy output equals plain
        decoding's; sampled output follows the model's distribution exactly."""
        rows = self.state.rows
        tokens = torch.zeros(rows, 2, dtype=torch.long)
        for row, sample in self.running.items():
            tokens[row, 0], tokens[row, 1] = sample.all_ids[-1], sample.draft
        start = torch.where(self.state.active, self.state.lengths, 0)
        positions = start.unsqueeze(1) + torch.arange(2)
        mark = self._mark = self.state.mark(into=self._mark)
        streams, logits = self.spec.verify(tokens)  # logits [R, 2, V]
        self.stats["steps"] += 1
        taken: dict[int, list[int]] = {}
        after = torch.zeros(rows, 2, dtype=torch.long)  # the MTP block's next ids: the tokens at +1 and +2
        for row, sample in self.running.items():
            p = sample.request.params
            self.stats["drafts"] += 1
            kept, first = check_draft(logits[row, 0], sample.draft, sample.draft_probs, p.temperature, p.top_p,
                                      sample.generator)
            taken[row] = [first]
            if kept:
                self.stats["accepted"] += 1
                taken[row].append(sample_token(logits[row, 1], p, sample.generator))
            after[row, :len(taken[row])] = torch.tensor(taken[row])
        short = [row for row in taken if len(taken[row]) == 1]
        draft_logits = self.spec.draft(streams, after, positions)  # [R, 2, V]
        self.state.rollback(mark, [1] * len(short), short)
        for row, sample in list(self.running.items()):
            ts = taken[row]
            if not self._take(sample, ts[0], logits[row, 0]):
                continue
            if len(ts) == 2 and not self._take(sample, ts[1], logits[row, 1]):
                continue
            self._store_boundary(sample)  # a step of two may pass a boundary: then no anchor there
            self._set_draft(sample, draft_logits[row, len(ts) - 1])

    # -------------------------------------------------------------------------------------------- per sample
    def _take(self, sample: Sample, token: int, logits: torch.Tensor) -> bool:
        """Record a sampled token (``logits``: the distribution it came from, for log-probabilities) and emit what
        became final; end the sample if it is done. Whether it goes on."""
        p = sample.request.params
        req = sample.request
        if req.first_token is None:
            req.first_token = time.perf_counter()
        if token == self.eos and not p.ignore_eos:
            self._end_sample(sample, "stop")
            return False
        sample.ids.append(token)
        sample.all_ids.append(token)
        self.stats["generation_tokens"] += 1
        sample.pending_ids.append(token)
        if p.logprobs is not None:
            sample.pending_lp.append(logprobs_of(logits, token, p.logprobs))
        if token != self.eos:  # an ignored EOS counts as a token but is no text (it would end a chat parse)
            sample.text += sample.decoder.push(token)
        if p.stop:
            cut = find_stop(sample.text, sample.sent, p.stop)
            if cut >= 0:
                sample.text = sample.text[:cut]
                self._end_sample(sample, "stop", flush=False)
                return False
        limit = p.max_tokens if p.max_tokens is not None else self.max_model_len
        if len(sample.ids) >= limit or len(sample.all_ids) >= self.max_model_len:
            self._end_sample(sample, "length")
            return False
        self._emit(sample, len(sample.text) - stop_holdback(p.stop))
        return True

    def _emit(self, sample: Sample, upto: int, finish: str | None = None) -> None:
        upto = max(upto, sample.sent)
        if upto == sample.sent and not sample.pending_ids and finish is None:
            return
        ev = Event(sample.index, sample.text[sample.sent:upto], sample.pending_ids, sample.pending_lp, finish)
        sample.sent = upto
        sample.pending_ids, sample.pending_lp = [], []
        sample.request.emit(ev)

    def _end_sample(self, sample: Sample, reason: str, flush: bool = True) -> None:
        if sample.done:
            return
        sample.done = True
        if flush:
            sample.text += sample.decoder.flush()
        self._emit(sample, len(sample.text), reason)
        if self.running.get(sample.row) is sample:
            del self.running[sample.row]
            self.state.reset_row(sample.row)
            self.free.append(sample.row)
            self._kv_in_use = self._count_kv()
        if all(s.done for s in sample.request.samples):
            sample.request.finished.set()

    def _finish_request(self, req: Request, reason: str) -> None:
        if not req.samples:
            for i in range(req.params.n):
                req.emit(Event(i, finish_reason=reason))
            req.finished.set()
            return
        for sample in req.samples:
            self._end_sample(sample, reason)
