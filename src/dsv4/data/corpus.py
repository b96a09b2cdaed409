"""Corpora: where pretraining text comes from.

A corpus is a deterministic, re-iterable sequence of ``Document``s (a name and its text). ``open_corpus(source)``
accepts

- ``"stdlib"``: the CPython standard library's ``.py`` sources on this machine (``sysconfig.get_paths()["stdlib"]``),
  without ``site-packages`` / ``dist-packages`` and, by default, without test folders (``test``, ``tests``,
  ``idle_test``). Needs no download; a few MB of real code, enough to train a small model.
- a file: one document, or one document per line when it ends in ``.jsonl`` (each line a JSON object with a ``text``
  field; blank lines are skipped);
- a folder, walked recursively: every file whose extension is in ``extensions`` (default
  ``TEXT_EXTENSIONS``) is one document, ``.jsonl`` files give one document per record. Hidden files and folders
  (``.git`` ...) and ``__pycache__`` are skipped, and so are binary files (a NUL byte in the first 8 KiB).

Documents are files (or records) in the sorted order of their paths relative to the corpus root, and are named by
those paths (a JSONL record: ``path:line``). Empty files and records with empty text are skipped; a corpus with no
text at all is an error. Bad input raises an error that names the file: ``FileNotFoundError`` for a missing path,
``ValueError`` for an empty file or corpus, bytes that are not UTF-8 (with the byte offset), a JSONL line that is
not JSON or has no string ``text`` field. ``Corpus.fingerprint()`` identifies the inputs (paths, sizes, modification
times) without reading them; token shards use it to know when they can be reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

TEXT_EXTENSIONS = frozenset({
    ".txt", ".md", ".rst", ".tex", ".org", ".adoc",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".kt", ".scala", ".swift",
    ".js", ".ts", ".jsx", ".tsx", ".rb", ".php", ".pl", ".lua", ".hs", ".ml", ".jl", ".r", ".sql", ".sh", ".bash",
    ".html", ".htm", ".xml", ".css", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".csv", ".tsv",
})
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_ALWAYS_SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One training document: ``name`` (relative path, or ``path:line`` for a JSONL record) and its ``text``."""

    name: str
    text: str


@dataclass(frozen=True)
class _Source:
    path: Path
    name: str  # relative to the corpus root, posix separators
    jsonl: bool


class Corpus:
    """A named, deterministic, re-iterable collection of documents. Build one with ``open_corpus``."""

    def __init__(self, name: str, sources: list[_Source], *, text_field: str = "text", skip_undecodable: bool = False):
        self.name = name
        self._sources = sources
        self.text_field = text_field
        self._skip_undecodable = skip_undecodable

    @property
    def files(self) -> list[Path]:
        """The files the corpus reads, in document order."""
        return [s.path for s in self._sources]

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {len(self._sources)} files)"

    def __iter__(self) -> Iterator[Document]:
        count = 0
        for src in self._sources:
            docs = _read_jsonl(src, self.text_field) if src.jsonl else _read_text(src, self._skip_undecodable)
            for doc in docs:
                count += 1
                yield doc
        if count == 0:
            raise ValueError(f"corpus {self.name!r} is empty: no document has any text")

    def texts(self) -> Iterator[str]:
        """The documents' texts, in order."""
        return (d.text for d in self)

    def fingerprint(self) -> str:
        """sha256 over the corpus name, options and each file's (name, size, mtime_ns); does not read the files."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.text_field, self._skip_undecodable]).encode())
        for s in self._sources:
            st = s.path.stat()
            h.update(json.dumps([s.name, s.jsonl, st.st_size, st.st_mtime_ns]).encode())
        return h.hexdigest()

    def identity(self) -> dict:
        """What shard indexes record about their corpus."""
        return {"name": self.name, "files": len(self._sources), "fingerprint": self.fingerprint()}


def open_corpus(source: str | os.PathLike | Corpus, *, extensions: Iterable[str] | None = None,
                text_field: str = "text", include_tests: bool = False) -> Corpus:
    """Open ``"stdlib"``, a text file, a ``.jsonl`` file or a folder as a ``Corpus`` (see the module docstring).

    ``extensions`` (folders only) replaces ``TEXT_EXTENSIONS``; ``""`` in it admits files without an extension.
    ``text_field`` is the JSONL key holding the text. ``include_tests`` keeps the stdlib's test folders.
    """
    if isinstance(source, Corpus):
        return source
    if isinstance(source, str) and source == "stdlib":
        return stdlib_corpus(include_tests=include_tests)
    path = Path(source).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"corpus path not found: {path}")
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"corpus file {path} is empty")
        return Corpus(str(path), [_Source(path, path.name, _is_jsonl(path))], text_field=text_field)
    if not path.is_dir():
        raise ValueError(f"corpus path {path} is neither a file nor a folder")
    exts = TEXT_EXTENSIONS if extensions is None else frozenset(e.lower() for e in extensions)
    sources = []
    for f in _walk(path, skip_dirs=frozenset({"__pycache__"})):
        if f.suffix.lower() not in exts or _is_binary(f):
            continue
        sources.append(_Source(f, f.relative_to(path).as_posix(), _is_jsonl(f)))
    sources.sort(key=lambda s: s.name)
    if not sources:
        raise ValueError(f"corpus folder {path} holds no text files (extensions: {', '.join(sorted(exts))})")
    if all(s.path.stat().st_size == 0 for s in sources):
        raise ValueError(f"corpus folder {path} is empty: all {len(sources)} text files are empty")
    return Corpus(str(path), sources, text_field=text_field)


def stdlib_root() -> Path:
    """The folder holding this Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(*, include_tests: bool = False) -> Corpus:
    """The CPython standard library's ``.py`` files, sorted by relative path (see the module docstring).

    Files that are not UTF-8 (a few test fixtures, only with ``include_tests``) are skipped rather than raised.
    """
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library folder {root} does not exist on this machine")
    skip = _ALWAYS_SKIPPED_DIRS | (frozenset() if include_tests else STDLIB_TEST_DIRS)
    sources = sorted((_Source(f, f.relative_to(root).as_posix(), False)
                      for f in _walk(root, skip_dirs=skip) if f.suffix == ".py"), key=lambda s: s.name)
    if not sources:
        raise ValueError(f"no .py files found in the standard library folder {root}")
    name = f"stdlib-{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}"
    return Corpus(name + ("+tests" if include_tests else ""), sources, skip_undecodable=include_tests)


def _walk(root: Path, skip_dirs: frozenset[str]) -> Iterator[Path]:
    """Regular files under root, recursively; hidden entries and ``skip_dirs`` left out."""
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow folder symlinks: no cycles
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        for fn in sorted(filenames):
            f = Path(dirpath, fn)
            if not fn.startswith(".") and f.is_file():
                yield f


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as fh:
        return b"\0" in fh.read(_SNIFF_BYTES)


def _decode(data: bytes, path: Path, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte offset {offset + e.start} ({e.reason})") from None


def _read_text(src: _Source, skip_undecodable: bool) -> Iterator[Document]:
    data = src.path.read_bytes()
    try:
        text = _decode(data, src.path)
    except ValueError:
        if skip_undecodable:
            return
        raise
    text = text.removeprefix("\ufeff")
    if text:
        yield Document(src.name, text)


def _read_jsonl(src: _Source, text_field: str) -> Iterator[Document]:
    offset = 0
    with open(src.path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = _decode(raw, src.path, offset)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{src.path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{src.path} line {lineno}: record has no {text_field!r} field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{src.path} line {lineno}: field {text_field!r} is "
                                 f"{type(text).__name__}, not a string")
            if text:
                yield Document(f"{src.name}:{lineno}", text)
