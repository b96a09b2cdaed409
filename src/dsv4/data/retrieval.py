"""Key-value retrieval in long filler text: the task of the ``million`` lab (``dsv4.lab.million``).

A context is filler text from the built-in corpus (the CPython standard library's sources, as bytes) with needles
hidden in it; a question then asks for one of them::

    ... filler bytes ... NEEDLE key value key value ... filler bytes ... NEEDLE key' value' key' value' ... | QUERY key -> value

Tokens (``RetrievalVocab``): ids 0-255 are the filler's bytes; then ``NEEDLE`` and ``QUERY`` markers, ``keys`` key
tokens and ``values`` value tokens, which appear only in needles and questions. A needle states its pair ``repeats``
times, as passkey prompts repeat the passkey (Mohtashami & Jaggi 2023): with 4 repeats the needle spans 9 tokens, so
some compressed entry of a 4x compressing layer is made of the pair alone. Keys are distinct within a context and
each value is drawn uniformly at random per needle, so nothing but the context tells the answer: a model that has not
found the needle answers at chance (1 / ``values``).

Filler comes from the standard library's files, split by file: every ``HELD_OUT``-th file (in corpus order) is
evaluation text, the rest training text, so that evaluation contexts are text the model never trained on. A filler
window is a stretch of the split's bytes from a random offset (wrapping around the end).

Training rows (``RetrievalLoader``): ``seq_len + 1`` tokens, the needles spread over the context part (one at a random
place in each of ``n_needles`` equal stretches), then questions for them (all, or a random subset) in random order, each ``QUERY key value``.
``answer_mask`` marks the value tokens of the questions: the targets the lab trains on. A row is a function of
(seed, step, row), so a loader resumes exactly from its ``state_dict``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from dsv4.data.packing import Batch

HELD_OUT = 10  # every 10th file of the corpus is evaluation filler
QUESTION_TOKENS = 3  # QUERY key value (the value is the answer)


@dataclass(frozen=True)
class RetrievalVocab:
    """Token ids of the task: bytes 0-255, then NEEDLE, QUERY, the keys and the values."""

    keys: int = 32
    values: int = 32
    repeats: int = 4  # a needle is NEEDLE followed by (key value) this many times
    needle: int = 256
    query: int = 257

    def __post_init__(self) -> None:
        for name, low in (("keys", 2), ("values", 2), ("repeats", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"RetrievalVocab.{name} must be an integer >= {low}, got {v!r}")

    @property
    def needle_tokens(self) -> int:
        return 1 + 2 * self.repeats

    @property
    def first_key(self) -> int:
        return 258

    @property
    def first_value(self) -> int:
        return 258 + self.keys

    @property
    def size(self) -> int:
        return 258 + self.keys + self.values

    def key(self, i: int) -> int:
        return self.first_key + i

    def value(self, i: int) -> int:
        return self.first_value + i

    def is_value(self, token: int) -> bool:
        return self.first_value <= token < self.size


@functools.lru_cache(maxsize=2)
def filler_bytes(split: str) -> np.ndarray:
    """The filler text of a split (``"train"`` or ``"eval"``) as one uint8 array: the standard library's files, every
    ``HELD_OUT``-th one for ``"eval"``, the others for ``"train"``, joined by newlines."""
    from dsv4.data.corpus import stdlib_corpus

    if split not in ("train", "eval"):
        raise ValueError(f"filler split must be 'train' or 'eval', got {split!r}")
    held = split == "eval"
    parts = [doc.text.encode() + b"\n" for i, doc in enumerate(stdlib_corpus()) if (i % HELD_OUT == 0) == held]
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def filler(split: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` filler tokens (bytes as int64) from a random offset of the split's text, wrapping at its end."""
    pool = filler_bytes(split)
    start = int(rng.integers(0, len(pool)))
    idx = (start + np.arange(length)) % len(pool)
    return pool[idx].astype(np.int64)


@dataclass(frozen=True)
class Needle:
    """A needle: its key and value indices, the position of its NEEDLE token and its length in tokens (keys at
    +1, +3, ..., values at +2, +4, ...)."""

    key: int
    value: int
    position: int
    length: int

    @property
    def value_positions(self) -> list[int]:
        return list(range(self.position + 2, self.position + self.length, 2))


def needle_context(length: int, n_needles: int, vocab: RetrievalVocab, rng: np.random.Generator,
                   split: str = "eval", lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, list[Needle]]:
    """A context of ``length`` tokens: filler with ``n_needles`` needles, one at a random place in each of
    ``n_needles`` equal stretches of [lo, hi) (``hi`` defaults to ``length``; distinct keys, random values).
    Returns (tokens, needles in order)."""
    if n_needles < 1 or n_needles > vocab.keys:
        raise ValueError(f"needles per context must be in [1, {vocab.keys}] (the key count), got {n_needles}")
    hi = length if hi is None else hi
    if not 0 <= lo < hi <= length:
        raise ValueError(f"the needles' stretch [{lo}, {hi}) must lie within the context's {length} tokens")
    stretch = (hi - lo) // n_needles
    span = vocab.needle_tokens
    if stretch < span:
        raise ValueError(f"a context of {length} tokens has no room for {n_needles} needles")
    tokens = filler(split, length, rng)
    keys = rng.permutation(vocab.keys)[:n_needles]
    needles = []
    for i, key in enumerate(keys):
        at = lo + i * stretch + int(rng.integers(0, stretch - span + 1))
        value = int(rng.integers(0, vocab.values))
        tokens[at:at + span] = [vocab.needle] + [vocab.key(int(key)), vocab.value(value)] * vocab.repeats
        needles.append(Needle(int(key), value, at, span))
    return tokens, needles


def question(needle: Needle, vocab: RetrievalVocab) -> list[int]:
    """The question's tokens, ``QUERY key``: the model's next token after them is its answer."""
    return [vocab.query, vocab.key(needle.key)]


@dataclass
class RetrievalBatch(Batch):
    """A ``Batch`` whose ``answer_mask`` [B, T + 1] marks the tokens that are answers (the targets trained on)."""

    answer_mask: torch.Tensor | None = None

    @property
    def answer_targets(self) -> torch.Tensor:
        """[B, T] bool: which next-token targets of the inputs are answers."""
        return self.answer_mask[:, 1:]


def retrieval_row(seq_len: int, n_needles: int, n_questions: int, vocab: RetrievalVocab, rng: np.random.Generator,
                  gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One training row of ``seq_len + 1`` tokens and its answer mask: the context, then ``n_questions`` questions
    about distinct needles of it, each followed by its answer. The needles lie before the context's last ``gap``
    tokens of filler (a gap wider than the sliding window leaves the compressed entries as the only way to them)."""
    total = seq_len + 1
    context = total - QUESTION_TOKENS * n_questions
    if n_questions > n_needles:
        raise ValueError(f"{n_questions} questions need as many needles, got {n_needles}")
    if gap < 0 or context - gap < n_needles * vocab.needle_tokens:
        raise ValueError(f"a row of {seq_len} tokens has no room for {n_needles} needles, {n_questions} questions "
                         f"and a gap of {gap}")
    tokens, needles = needle_context(context, n_needles, vocab, rng, split="train", hi=context - gap)
    asked = rng.permutation(n_needles)[:n_questions]
    qs = np.concatenate([[vocab.query, vocab.key(needles[i].key), vocab.value(needles[i].value)] for i in asked])
    row = np.concatenate([tokens, qs.astype(np.int64)])
    mask = np.zeros(total, dtype=bool)
    mask[context + 2::QUESTION_TOKENS] = True
    return row, mask


class RetrievalLoader:
    """Batches of ``retrieval_row``s forever; row r of step s comes from the generator seeded (seed, s, r). The
    needle and question counts scale with the row length: one needle per ``tokens_per_needle`` context tokens
    (at least 2, at most the key count), questions for ``asked`` of them (a fraction; at least 1); with a ``gap``, the
    needles lie before the last ``gap`` context tokens and are counted on the tokens before it."""

    def __init__(self, vocab: RetrievalVocab, batch_size: int, seq_len: int, seed: int = 0,
                 tokens_per_needle: int = 128, asked: float = 1.0, gap: int = 0):
        if batch_size < 1 or seq_len < 32:
            raise ValueError(f"a retrieval loader needs batch_size >= 1 and seq_len >= 32, got {batch_size} and "
                             f"{seq_len}")
        if not 0 <= gap <= seq_len // 2:
            raise ValueError(f"the gap before the questions must be in [0, seq_len / 2], got {gap}")
        self.vocab, self.batch_size, self.seq_len, self.seed, self.gap = vocab, batch_size, seq_len, seed, gap
        self.n_needles = max(2, min(vocab.keys, (seq_len - gap) // tokens_per_needle))
        if not 0 < asked <= 1:
            raise ValueError(f"the fraction of needles asked about must be in (0, 1], got {asked}")
        self.n_questions = max(1, int(self.n_needles * asked))
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> RetrievalBatch:
        rows, masks = [], []
        for r in range(self.batch_size):
            rng = np.random.default_rng([self.seed, self.step, r])
            row, mask = retrieval_row(self.seq_len, self.n_needles, self.n_questions, self.vocab, rng, self.gap)
            rows.append(row)
            masks.append(mask)
        self.step += 1
        tokens = torch.from_numpy(np.stack(rows))
        zeros = torch.zeros_like(tokens)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens).clone()
        return RetrievalBatch(tokens, zeros, positions, torch.from_numpy(np.stack(masks)))

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
