"""Token shards: a corpus tokenized once into memory-mapped files on disk, with a JSON index.

``build_shards(corpus, tokenizer, out_dir)`` writes into ``out_dir``

- ``shard_00000.bin``, ...: raw little-endian token ids, ``uint16`` when the vocabulary fits (<= 65,536 ids), else
  ``uint32``. Each document is stored whole in one shard as ``[BOS] + tokens(text) + [EOS]`` (BOS only with
  ``add_bos``, the default); a shard is closed once it holds ``shard_tokens`` tokens.
- ``index.json``: the inputs (corpus fingerprint, tokenizer identity with its sha256, options) and their hash
  ``key``; the shards; per document its ``name``, ``shard``, ``start`` offset and ``length`` in tokens and its text's
  UTF-8 ``bytes``; and the ``train`` / ``val`` splits as lists of document ids (positions in the document table).

The validation split holds out whole documents, chosen by ``split_documents`` (the one definition of which
documents a run validates on; ``dsv4.data.packing.validation_batches`` defines which of their rows are evaluated):
``max(1, round(val_fraction * n_docs))`` of them, drawn with ``numpy.random.default_rng(seed)``; both splits must
keep at least one document (``val_fraction=0`` means no validation split). ``VAL_FRACTION`` (0.02) is the fraction
``dsv4 train``, ``dsv4 demo`` and ``dsv4 eval`` hold out, and ``build_shards``' default. Documents keep corpus order
in the shards; the splits are disjoint by construction.

Building is atomic: everything is written in a temporary sibling folder, fsynced and renamed into place at the end, so
an interrupted build leaves nothing behind. Calling ``build_shards`` again with the same inputs returns the
existing shards without reading the corpus; different inputs raise ``ValueError`` naming what changed unless
``overwrite=True``. A folder that is not a shard folder is never replaced. ``load_shards(path)`` opens a built folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from dsv4.atomic import fsync_directory, fsync_tree
from dsv4.data.corpus import Corpus, open_corpus
from dsv4.data.tokenizer import Tokenizer, load_tokenizer

FORMAT = "dsv4-token-shards"
VERSION = 1
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
VAL_FRACTION = 0.02  # of the documents, held out for validation by every command that trains or evaluates
_ENCODE_BATCH = 64


class ShardSet:
    """A built shard folder: the index plus memory-mapped token files. Open one with ``load_shards``."""

    def __init__(self, path: Path, index: dict):
        self.path = Path(path)
        self.index = index
        self.key: str = index["key"]
        self.dtype = np.dtype(index["dtype"])
        docs = index["docs"]
        self.doc_names: list[str] = docs["name"]
        self.doc_shard = np.asarray(docs["shard"], dtype=np.int64)
        self.doc_start = np.asarray(docs["start"], dtype=np.int64)
        self.doc_length = np.asarray(docs["length"], dtype=np.int64)
        self._split_docs = {s: np.asarray(v["docs"], dtype=np.int64) for s, v in index["splits"].items()}
        self._maps: list[np.memmap] | None = None

    @property
    def tokenizer(self) -> dict:
        """The identity (name, sha256, vocab_size, bos_id, eos_id) of the tokenizer that made the shards."""
        return self.index["inputs"]["tokenizer"]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer["vocab_size"]

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer["bos_id"] if self.index["inputs"]["add_bos"] else None

    @property
    def eos_id(self) -> int:
        return self.tokenizer["eos_id"]

    @property
    def n_docs(self) -> int:
        return len(self.doc_length)

    @property
    def splits(self) -> tuple[str, ...]:
        """Names of the splits that hold documents ("train", and "val" unless val_fraction was 0)."""
        return tuple(s for s in SPLITS if len(self._split_docs.get(s, ())) > 0)

    def split_docs(self, split: str) -> np.ndarray:
        """Document ids of a split, in corpus order."""
        if split not in self.splits:
            raise ValueError(f"shards at {self.path} have no split {split!r} (splits: {', '.join(self.splits)})")
        return self._split_docs[split]

    def split_stats(self, split: str) -> dict:
        """``n_docs``, ``n_tokens`` (specials included), ``n_text_tokens`` and ``n_bytes`` of a split."""
        self.split_docs(split)
        return {k: v for k, v in self.index["splits"][split].items() if k != "docs"}

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per text token of a split: bits/byte = (nats/token over text tokens) / ln 2 / this."""
        s = self.split_stats(split)
        return s["n_bytes"] / s["n_text_tokens"]

    def document(self, doc_id: int) -> np.ndarray:
        """The stored tokens of a document (BOS, text, EOS): a read-only view into its shard."""
        return self.tokens(doc_id, 0, int(self.doc_length[doc_id]))

    def tokens(self, doc_id: int, start: int, length: int) -> np.ndarray:
        """``length`` stored tokens of a document from offset ``start``: a read-only view into its shard."""
        if start < 0 or length < 0 or start + length > self.doc_length[doc_id]:
            raise IndexError(f"tokens [{start}, {start + length}) outside document {doc_id} "
                             f"of length {self.doc_length[doc_id]}")
        if self._maps is None:
            self._maps = [np.memmap(self.path / s["file"], dtype=self.dtype, mode="r", shape=(s["n_tokens"],))
                          for s in self.index["shards"]]
        begin = int(self.doc_start[doc_id]) + start
        return self._maps[int(self.doc_shard[doc_id])][begin:begin + length]

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}: {len(self._split_docs[s])} docs" for s in self.splits)
        return f"ShardSet({str(self.path)!r}, {self.index['n_tokens']} tokens, {counts})"


def load_shards(path: str | os.PathLike) -> ShardSet:
    """Open a folder written by ``build_shards``; checks the index and that every shard file is complete."""
    path = Path(path).expanduser()
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise FileNotFoundError(f"no token shards at {path}: {INDEX_FILE} not found")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{index_file}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{index_file}: not a {FORMAT} index of version {VERSION}")
    itemsize = np.dtype(index["dtype"]).itemsize
    for shard in index["shards"]:
        f = path / shard["file"]
        if not f.is_file():
            raise FileNotFoundError(f"shard file {f} listed in {index_file} is missing")
        if f.stat().st_size != shard["n_tokens"] * itemsize:
            raise ValueError(f"shard file {f} has {f.stat().st_size} bytes, expected "
                             f"{shard['n_tokens'] * itemsize}: it is damaged; rebuild with overwrite=True")
    return ShardSet(path, index)


def build_shards(corpus: Corpus | str | os.PathLike, tokenizer: Tokenizer | str | os.PathLike,
                 out_dir: str | os.PathLike, *, val_fraction: float = VAL_FRACTION, seed: int = 0, add_bos: bool = True,
                 shard_tokens: int = 1 << 28, overwrite: bool = False) -> ShardSet:
    """Tokenize ``corpus`` with ``tokenizer`` into shards at ``out_dir`` (see the module docstring), or return the
    shards already there when they were built from the same inputs. ``corpus`` and ``tokenizer`` may also be what
    ``open_corpus`` / ``load_tokenizer`` accept."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    corpus = open_corpus(corpus)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no EOS token, which shards put after every document")
    if add_bos and tok.bos_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no BOS token; pass add_bos=False or a bos_token")
    if tok.vocab_size > 1 << 32:
        raise ValueError(f"vocab_size {tok.vocab_size} does not fit uint32 token files")
    inputs = {"corpus": corpus.identity(), "tokenizer": tok.identity(), "add_bos": add_bos,
              "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens}
    keyed = {**inputs, "tokenizer": {k: v for k, v in inputs["tokenizer"].items() if k != "name"}}  # name: a label
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()

    out = Path(out_dir).expanduser()
    existing = _existing(out, key, inputs, overwrite)
    if existing is not None:
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        index = _write(tmp, corpus, tok, inputs, key, val_fraction, seed, add_bos, shard_tokens)
        return _install(tmp, out, key, index)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _existing(out: Path, key: str, inputs: dict, overwrite: bool) -> ShardSet | None:
    """The shards at ``out`` when they match ``key``; None when ``out`` may be (re)built; raises otherwise."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"shard folder {out} exists and is not a folder")
    if not (out / INDEX_FILE).is_file():
        if any(out.iterdir()):
            raise ValueError(f"{out} exists and is not a token-shard folder ({INDEX_FILE} missing); "
                             "refusing to replace it")
        return None
    try:
        shards = load_shards(out)
    except (ValueError, FileNotFoundError):
        if overwrite:
            return None
        raise
    if shards.key == key:
        return shards
    if overwrite:
        return None
    old = shards.index.get("inputs", {})
    changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
    raise ValueError(f"{out} holds shards built from other inputs (changed: {', '.join(changed)}); "
                     "pass overwrite=True or choose another folder")


def _write(tmp: Path, corpus: Corpus, tok: Tokenizer, inputs: dict, key: str, val_fraction: float, seed: int,
           add_bos: bool, shard_tokens: int) -> dict:
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    names: list[str] = []
    shard_of: list[int] = []
    starts: list[int] = []
    lengths: list[int] = []
    nbytes: list[int] = []
    shards: list[dict] = []
    fh = None
    pending: list = []

    def flush():
        nonlocal fh
        encoded = tok.encode_batch([d.text for d in pending], bos=add_bos, eos=True)
        for doc, ids in zip(pending, encoded):
            if fh is None or shards[-1]["n_tokens"] >= shard_tokens:
                if fh is not None:
                    fh.close()
                shards.append({"file": f"shard_{len(shards):05d}.bin", "n_tokens": 0})
                fh = open(tmp / shards[-1]["file"], "wb")
            np.asarray(ids, dtype=dtype).tofile(fh)
            names.append(doc.name)
            shard_of.append(len(shards) - 1)
            starts.append(shards[-1]["n_tokens"])
            lengths.append(len(ids))
            nbytes.append(len(doc.text.encode("utf-8")))
            shards[-1]["n_tokens"] += len(ids)
        pending.clear()

    try:
        for doc in corpus:
            pending.append(doc)
            if len(pending) == _ENCODE_BATCH:
                flush()
        if pending:
            flush()
    finally:
        if fh is not None:
            fh.close()

    n = len(names)
    is_val = split_documents(n, val_fraction, seed, source=f"corpus {corpus.name!r}")
    n_special = 2 if add_bos else 1
    lengths_np, bytes_np = np.asarray(lengths, dtype=np.int64), np.asarray(nbytes, dtype=np.int64)
    splits = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        ids = np.flatnonzero(mask)
        n_tok = int(lengths_np[ids].sum())
        splits[split] = {"n_docs": len(ids), "n_tokens": n_tok, "n_text_tokens": n_tok - n_special * len(ids),
                         "n_bytes": int(bytes_np[ids].sum()), "docs": ids.tolist()}
    index = {"format": FORMAT, "version": VERSION, "key": key, "inputs": inputs, "dtype": dtype.str,
             "n_docs": n, "n_tokens": int(lengths_np.sum()), "shards": shards,
             "docs": {"name": names, "shard": shard_of, "start": starts, "length": lengths, "bytes": nbytes},
             "splits": splits}
    (tmp / INDEX_FILE).write_text(json.dumps(index, separators=(",", ":")), encoding="utf-8")
    return index


def split_documents(n_docs: int, val_fraction: float = VAL_FRACTION, seed: int = 0, *,
                    source: str = "the corpus") -> np.ndarray:
    """Which of ``n_docs`` documents (in corpus order) the validation split holds out, as a bool mask:
    ``max(1, round(val_fraction * n_docs))`` of them (none with ``val_fraction=0``), the first of
    ``numpy.random.default_rng(seed).permutation(n_docs)``. Raises ``ValueError`` (naming ``source``) when no
    training document would be left."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_docs))
    if n_docs - n_val < 1:
        raise ValueError(f"{source} has {n_docs} document(s): too few to hold out a validation split "
                         f"(val_fraction={val_fraction}) and keep a training document; add documents or pass "
                         "val_fraction=0")
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return is_val


def _install(tmp: Path, out: Path, key: str, index: dict) -> ShardSet:
    """Move the finished ``tmp`` folder to ``out``, replacing what ``_existing`` allowed to be replaced: its files
    and folder fsynced first, the parent after the renames, so that once this returns the shards survive a crash of
    the machine and a crash never installs a folder whose files are not on disk."""
    fsync_tree(tmp)
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
    try:
        os.rename(tmp, out)
    except OSError:
        if trash is not None:
            os.rename(trash, out)
            raise
        # Another process installed shards first: use them if they are what we built.
        other = load_shards(out)
        if other.key != key:
            raise
        return other
    fsync_directory(out.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return ShardSet(out, index)
