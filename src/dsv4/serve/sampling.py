"""What a request asks for and gets back, and how each token is chosen: ``SamplingParams`` (checked, a bad value an
``EngineError``), ``sample_token`` (greedy, or temperature and top-p), ``logprobs_of`` (the chosen token's
log-probability and the most likely ones), stop strings (``find_stop``, ``stop_holdback``: text is held back while a
stop string may still begin in it), and the ``Event``s a request's samples emit (``new_outputs`` / ``add_event``
gather them). The engine (``dsv4.serve.engine``) runs the model and calls these per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dsv4.generate import next_token_probs


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


def new_outputs(n: int) -> list[dict]:
    """Per sample, what ``add_event`` gathers: its text, token ids, log-probabilities and finish reason."""
    return [{"text": "", "token_ids": [], "logprobs": [], "finish_reason": None} for _ in range(n)]


def add_event(outs: list[dict], ev: Event) -> None:
    o = outs[ev.index]
    o["text"] += ev.text
    o["token_ids"] += ev.token_ids
    o["logprobs"] += ev.logprobs
    o["finish_reason"] = ev.finish_reason or o["finish_reason"]


def sample_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one position's logits [vocab]: the most likely at temperature 0, else drawn (with
    ``generator`` when the request has a seed) after temperature and top-p."""
    if p.temperature == 0:
        return int(logits.argmax())
    probs = next_token_probs(logits.unsqueeze(0), p.temperature, p.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token: int, k: int) -> dict:
    """``{"token", "logprob", "top"}``: the log-probability of ``token`` under ``logits`` [vocab] and the ``k`` most
    likely (id, log-probability) pairs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k else None
    return {"token": token, "logprob": float(lp[token]),
            "top": [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]}


def find_stop(text: str, sent: int, stops: list[str]) -> int:
    """Where the first of ``stops`` begins in ``text``, or -1. The first ``sent`` characters were emitted, so only a
    stop string reaching past them is looked for (each from ``sent - len(stop)`` on)."""
    return min((i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0), default=-1)


def stop_holdback(stops: list[str]) -> int:
    """How many of the last characters may not be emitted yet: a stop string may still begin in them."""
    return max((len(s) for s in stops), default=1) - 1
