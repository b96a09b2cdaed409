"""The inference engine: continuous batching over a ``DecodeState``, chunked prefill, exact prefix reuse.

One thread owns the model. Each turn of its loop it takes new requests and cancellations, admits waiting requests
into free rows (each of a request's ``n`` samples takes a row), prefills one chunk of the oldest admitted prompt (so
that a long prompt does not stall the streams of running requests), then decodes one token for every running row in
one call. Requests join and leave between turns. Callers never wait on a model step: ``submit`` queues a request
and returns, and each sample's text arrives through the request's ``emit`` callback as ``Event``s.

Prompts resume from the longest cached prefix (``PrefixCache``) and prefill only the rest; the cache gets an anchor at
every prefill chunk's end, at the prompt's last block boundary, and at each block boundary a sample decodes past.
Decoding runs at a fixed row count with per-token experts, so a row's logits do not change with what else runs.
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

from dsv4.generate import next_token_probs
from dsv4.model.decode import DecodeState, compressor_rates
from dsv4.serve.prefix_cache import PrefixCache, model_fingerprint

log = logging.getLogger("dsv4.serve")


class EngineError(ValueError):
    """A request the engine cannot take; ``status`` is the HTTP status a server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: up to the model length
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the k most likely
    n: int = 1

    def check(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 0:
            raise EngineError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise EngineError(f"n must be >= 1, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise EngineError(f"top_logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise EngineError("stop strings must be non-empty strings")


@dataclass
class Event:
    """What a sample produced since its last event: text that is final (stop strings held back until they cannot
    match), the token ids, their log-probabilities; ``finish_reason`` ("stop", "length", "abort") on its last."""

    index: int  # which of the request's n samples
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


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


class Engine:
    def __init__(self, model, tokenizer, *, max_model_len: int | None = None, max_num_seqs: int = 8,
                 kv_memory_bytes: int | None = None, prefill_chunk: int = 512, prefix_cache: bool = True,
                 cache_memory_bytes: int = 2 << 30, cache_dir=None, cache_disk_bytes: int = 16 << 30):
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.block = math.lcm(*[r for r in compressor_rates(model).values()] or [1])
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = max(self.block, prefill_chunk // self.block * self.block)
        with torch.inference_mode():
            probe = DecodeState(model, 1, self.max_model_len)
        self.row_bytes = probe.nbytes()
        rows = max_num_seqs
        if kv_memory_bytes is not None:
            rows = min(rows, kv_memory_bytes // self.row_bytes)
            if rows < 1:
                raise ValueError(f"--kv-memory-gib holds no sequence of {self.max_model_len} tokens "
                                 f"({self.row_bytes / 2**30:.3f} GiB each); lower --max-model-len or raise it")
        self.rows = rows
        with torch.inference_mode():
            self.state = DecodeState(model, rows, self.max_model_len)
        self.prefix: PrefixCache | None = None
        if prefix_cache:
            self.prefix = PrefixCache(
                block=self.block, rates=compressor_rates(model), new_cache=lambda: model.new_cache(1),
                fingerprint=model_fingerprint(model, getattr(tokenizer, "sha256", "")),
                memory_bytes=cache_memory_bytes, disk_dir=cache_dir, disk_bytes=cache_disk_bytes)
        self.eos = tokenizer.eos_id
        self.incoming: queue.Queue[Request] = queue.Queue()
        self.waiting: deque[Request] = deque()
        self.prefilling: list = []  # [request, cache, position, cuts] of admitted prompts, oldest first
        self.running: dict[int, Sample] = {}  # row -> sample
        self.free = list(range(rows))
        self.wake = threading.Event()
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "prefill_tokens": 0}

    # ------------------------------------------------------------------------------------------------ interface
    def new_decoder(self):
        from dsv4.data.tokenizer import IncrementalDecoder

        return IncrementalDecoder(self.tokenizer)

    def start(self) -> Engine:
        self.thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self.stopped = True
        self.wake.set()
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
        outs = [{"text": "", "token_ids": [], "logprobs": [], "finish_reason": None} for _ in range(params.n)]

        def emit(ev: Event) -> None:
            o = outs[ev.index]
            o["text"] += ev.text
            o["token_ids"] += ev.token_ids
            o["logprobs"] += ev.logprobs
            o["finish_reason"] = ev.finish_reason or o["finish_reason"]

        req = self.submit(Request(list(prompt_ids), params, emit))
        req.finished.wait()
        return outs

    def kv_bytes_in_use(self) -> int:
        """Decode-state bytes the running requests' tokens occupy (rings, blocks and entries up to each length),
        plus the caches of prompts being prefilled."""
        n = sum(self._row_used_bytes(int(self.state.lengths[r])) for r in list(self.running))
        return n + sum(job[1].nbytes() for job in list(self.prefilling))

    def _row_used_bytes(self, length: int) -> int:
        return round(self.row_bytes * min(1.0, length / self.max_model_len))

    # ----------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
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
                    if not worked:
                        self.wake.wait(0.05)
                        self.wake.clear()
        except BaseException as e:  # a failed step fails every request in flight, not silently
            log.exception("engine stopped")
            self.error = e
            for req in self._in_flight():
                self._finish_request(req, "abort")

    def _in_flight(self) -> list[Request]:
        reqs = list(self.waiting) + [job[0] for job in self.prefilling]
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
        for job in [j for j in self.prefilling if j[0].cancelled]:
            self.prefilling.remove(job)
            self.free += job[4]
            self._finish_request(job[0], "abort")
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
            self.prefilling.append([req, cache, start, cuts, rows])

    def _prefill_one_chunk(self) -> bool:
        if not self.prefilling:
            return False
        job = self.prefilling[0]
        req, cache, pos, cuts, rows = job
        end = cuts.pop(0)
        ids = torch.tensor([req.prompt_ids[pos:end]], device=self.model.device)
        logits = self.model(ids, cache=cache, last_only=True)[0, -1]
        self.stats["prefill_tokens"] += end - pos
        job[2] = end
        if self.prefix is not None and end % self.block == 0:
            self.prefix.store(req.prompt_ids, cache)
        if cuts:
            return True
        self.prefilling.pop(0)
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        req.samples = [Sample(self, req, i, row) for i, row in enumerate(rows)]
        for sample in req.samples:
            self.state.load_row(sample.row, cache)
            self.running[sample.row] = sample
        for sample in req.samples:
            self._accept(sample, logits)
        return True

    def _decode_step(self) -> None:
        tokens = torch.zeros(self.state.rows, dtype=torch.long)
        for row, sample in self.running.items():
            tokens[row] = sample.all_ids[-1]
        logits = self.model(tokens.unsqueeze(1).to(self.model.device), cache=self.state)[:, 0]
        self.stats["steps"] += 1
        for row, sample in list(self.running.items()):
            length = int(self.state.lengths[row])
            if self.prefix is not None and length % self.block == 0:
                self.prefix.store(sample.all_ids, self.state.extract_row(row))
            self._accept(sample, logits[row])

    # -------------------------------------------------------------------------------------------- per sample
    def _accept(self, sample: Sample, logits: torch.Tensor) -> None:
        """Sample the next token from a row's logits and emit what became final; end the sample if it is done."""
        p = sample.request.params
        token = self._sample(logits, p, sample.generator)
        req = sample.request
        if req.first_token is None:
            req.first_token = time.perf_counter()
        if token == self.eos and not p.ignore_eos:
            self._end_sample(sample, "stop")
            return
        sample.ids.append(token)
        sample.all_ids.append(token)
        self.stats["generation_tokens"] += 1
        sample.pending_ids.append(token)
        if p.logprobs is not None:
            sample.pending_lp.append(self._logprobs(logits, token, p.logprobs))
        sample.text += sample.decoder.push(token)
        if p.stop:
            cut = min((i for i in (sample.text.find(s, max(0, sample.sent - len(s))) for s in p.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                sample.text = sample.text[:cut]
                self._end_sample(sample, "stop", flush=False)
                return
        limit = p.max_tokens if p.max_tokens is not None else self.max_model_len
        if len(sample.ids) >= limit or len(sample.all_ids) >= self.max_model_len:
            self._end_sample(sample, "length")
            return
        hold = max((len(s) for s in p.stop), default=1) - 1  # a stop string may still begin in the last chars
        self._emit(sample, len(sample.text) - hold)

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

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, generator) -> int:
        if p.temperature == 0:
            return int(logits.argmax())
        probs = next_token_probs(logits.unsqueeze(0), p.temperature, p.top_p)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _logprobs(self, logits: torch.Tensor, token: int, k: int) -> dict:
        lp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(lp, k) if k else None
        return {"token": token, "logprob": float(lp[token]),
                "top": [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]}
