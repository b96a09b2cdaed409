"""Small verifiable domains for post-training on a laptop CPU (spec 7: specialists per domain, rewards that a
program checks).

Each ``Task`` draws prompts and their reference answers and scores a completion: reward 1 when the completion, up to
and including its first ``EOS``, is the answer, else 0. Tokens are characters: ids 0-2 are ``PAD``, ``EOS`` and the
prompt's end ``SEP``, then one id per symbol of ``ALPHABET``, then one marker id per task that opens its prompts (so
that one model can tell the domains apart). The ids fit any vocabulary of at least ``VOCAB_USED``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, EOS, SEP = 0, 1, 2
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_FIRST = 3  # id of ALPHABET[0]


def encode(text: str) -> list[int]:
    """Symbols of ``ALPHABET`` -> token ids."""
    bad = sorted(set(text) - set(ALPHABET))
    if bad:
        raise ValueError(f"symbols outside the task alphabet: {bad}")
    return [_FIRST + ALPHABET.index(ch) for ch in text]


def decode(ids) -> str:
    """Token ids -> text: symbols as themselves, ``EOS`` as '$', the rest as '?'; stops after the first ``EOS``."""
    out = []
    for i in (ids.tolist() if torch.is_tensor(ids) else ids):
        if i == EOS:
            out.append("$")
            break
        k = i - _FIRST
        out.append(ALPHABET[k] if 0 <= k < len(ALPHABET) else "?")
    return "".join(out)


@dataclass(frozen=True)
class Task:
    """A domain: prompts ``[marker, x_1 .. x_n, SEP]`` with x drawn from ``symbols``; the answer ``f(x)`` then EOS."""

    name: str
    marker: int
    symbols: str
    length: int

    def answer(self, text: str) -> str:
        if self.name == "reverse":
            return text[::-1]
        if self.name == "sort":
            return "".join(sorted(text))
        if self.name == "shift":  # each symbol to the next one of its symbol set, cyclically
            return "".join(self.symbols[(self.symbols.index(c) + 1) % len(self.symbols)] for c in text)
        raise ValueError(f"unknown task {self.name!r}")

    @property
    def prompt_len(self) -> int:
        return self.length + 2

    @property
    def answer_len(self) -> int:
        return self.length + 1

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` prompts [n, length + 2] and their answers [n, length + 1] (EOS last)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        pick = torch.randint(len(self.symbols), (n, self.length), generator=generator)
        texts = ["".join(self.symbols[i] for i in row) for row in pick.tolist()]
        prompts = torch.tensor([[self.marker, *encode(t), SEP] for t in texts])
        answers = torch.tensor([[*encode(self.answer(t)), EOS] for t in texts])
        return prompts, answers

    def reward(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """float32 [n]: 1 where the completion up to its first EOS is exactly the prompt's answer and EOS. A prompt
        ends at its SEP: what follows (a rollout's right padding) is not read."""
        out = []
        for p, c in zip(prompts.tolist(), completions.tolist()):
            want = [*encode(self.answer(decode(p[1:p.index(SEP)]))), EOS]
            out.append(float(c[:len(want)] == want))
        return torch.tensor(out)


TASKS = {t.name: t for t in (
    Task("reverse", _FIRST + len(ALPHABET), "abcdefghijklmnopqrstuvwxyz", 6),
    Task("sort", _FIRST + len(ALPHABET) + 1, "0123456789", 6),
    Task("shift", _FIRST + len(ALPHABET) + 2, "abcdefghijklmnopqrstuvwxyz", 6),
)}
VOCAB_USED = _FIRST + len(ALPHABET) + len(TASKS)


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
