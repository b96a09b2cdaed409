"""Exact prefix reuse: the decode state of earlier sequences, looked up by their token ids, in memory and on disk.

A sequence is cut into blocks of ``block`` tokens (the lcm of the compression rates, so that every compressor's
incomplete block is empty at a block boundary). Block j's node is keyed by a hash chain over the token ids,
key_j = sha256(key_{j-1} || ids of block j), starting from a ``fingerprint`` of whatever produced the state (weights,
config, dtype, numerics, tokenizer), so that another model never reads this one's entries. A node holds:
  - its **history**: the compressed entries its block emitted (every layer's compressors), shared by every longer
    sequence that starts with the same tokens;
  - optionally the **boundary state** at its end (``ModelCache.boundary_state``: window rings, CSA's overlap series):
    a node with it is an *anchor*, from which a sequence resumes; the history of every node before it completes it.

``lookup(ids)`` finds the longest anchored prefix (shorter than ``ids``, so that at least one token is left to
prefill for the next logits) and rebuilds its one-row ``ModelCache``; ``store(ids, cache)`` adds a cache that sits on a
block boundary. Memory holds nodes under a byte budget, evicting the least recently used node that no other node in
memory extends. With a directory, every node is also written there (safetensors, written atomically, its tensors'
sha256 in the metadata), found again after a restart, and evicted least recently used under its own budget; a file
that is truncated or does not match its checksum is skipped with a warning, removed, and its state recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dsv4.cache import ModelCache
from dsv4.model.linear import activation_dtype
from dsv4.atomic import write_atomically

log = logging.getLogger("dsv4.serve")
FORMAT = "dsv4-prefix-1"


def chain_key(parent: str, ids: list[int]) -> str:
    """The key of a block of ``ids`` after the block keyed ``parent``."""
    return hashlib.sha256(parent.encode() + np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Node:
    key: str
    parent: str
    length: int  # tokens up to the end of this node's block
    history: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] | None = None
    children: int = 0  # nodes in memory that extend this one

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.history) + (_tensor_bytes(self.state) if self.state is not None else 0)


@dataclass
class DiskEntry:
    parent: str
    length: int
    nbytes: int
    anchored: bool


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that resumed from a cached prefix
    hit_tokens: int = 0  # tokens not prefilled thanks to the cache
    lookup_tokens: int = 0  # tokens asked for in lookups
    stored_nodes: int = 0
    evicted_nodes: int = 0
    disk_reads: int = 0
    disk_writes: int = 0
    corrupt: int = 0
    extra: dict = field(default_factory=dict)


class PrefixCache:
    def __init__(self, *, block: int, rates: dict[str, int], fingerprint: str, new_cache: Callable[[], ModelCache],
                 memory_bytes: int, disk_dir: str | os.PathLike | None = None, disk_bytes: int = 0):
        if block < 1 or any(block % r for r in rates.values()):
            raise ValueError(f"the prefix block ({block}) must be a multiple of every compression rate {rates}")
        self.block, self.rates, self.fingerprint = block, dict(rates), fingerprint
        self.new_cache = new_cache
        self.memory_budget, self.disk_budget = int(memory_bytes), int(disk_bytes)
        self.nodes: OrderedDict[str, Node] = OrderedDict()  # least recently used first
        self.memory_used = 0
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self.disk: OrderedDict[str, DiskEntry] = OrderedDict()
        self.disk_used = 0
        self.dir = None
        if disk_dir is not None:
            self.dir = Path(disk_dir) / fingerprint[:32]
            self.dir.mkdir(parents=True, exist_ok=True)
            self._scan_disk()

    # ---------------------------------------------------------------------------------------------------- lookup
    def keys(self, ids: list[int], blocks: int) -> list[str]:
        out, key = [], self.fingerprint
        for j in range(blocks):
            key = chain_key(key, ids[j * self.block:(j + 1) * self.block])
            out.append(key)
        return out

    def lookup(self, ids: list[int]) -> tuple[int, ModelCache | None]:
        """(L, a one-row cache of the first L tokens of ``ids``) for the longest anchored prefix with L < len(ids),
        or (0, None)."""
        with self.lock:
            self.stats.lookups += 1
            self.stats.lookup_tokens += len(ids)
            keys = self.keys(ids, (len(ids) - 1) // self.block)
            while best := self._deepest_anchor(keys):
                nodes = self._load_chain(keys[:best])
                if nodes is not None:
                    break  # else a corrupt file was removed: look again
            else:
                return 0, None
            for node in nodes:  # parents before children: a chain's leaf is its most recently used node
                self.nodes.move_to_end(node.key)
            length = best * self.block
            cache = self.new_cache().fill([n.history for n in nodes], nodes[-1].state, length)
            self.stats.hits += 1
            self.stats.hit_tokens += length
            return length, cache

    def _deepest_anchor(self, keys: list[str]) -> int:
        """How many of the chain's blocks lead to its deepest anchor, in memory or on disk (0: none)."""
        best = 0
        for j, key in enumerate(keys):
            node, entry = self.nodes.get(key), self.disk.get(key)
            if node is None and entry is None:
                break
            if (node is not None and node.state is not None) or (entry is not None and entry.anchored):
                best = j + 1
        return best

    def _load_chain(self, keys: list[str]) -> list[Node] | None:
        """The nodes of ``keys`` in memory, reading from disk what is only there (the last with its state); None if
        a file was corrupt (it is then removed)."""
        nodes = []
        for j, key in enumerate(keys):
            node = self.nodes.get(key)
            want_state = j == len(keys) - 1
            if node is None or (want_state and node.state is None):
                node = self._read(key, keep=node)
                if node is None:
                    return None
            nodes.append(node)
        return nodes

    # ----------------------------------------------------------------------------------------------------- store
    def store(self, ids: list[int], cache: ModelCache) -> int:
        """Add the blocks of a one-row cache of the first ``cache.seen`` tokens of ``ids`` (a multiple of the block)
        and make its last block an anchor; returns the number of new nodes."""
        length = cache.seen
        if length % self.block or length > len(ids) or cache.batch_size != 1:
            raise ValueError(f"store takes a one-row cache on a block boundary of {self.block} within the ids, got "
                             f"{length} tokens of {len(ids)}")
        if length == 0:
            return 0
        with self.lock:
            keys = self.keys(ids, length // self.block)
            new = 0
            parent = self.fingerprint
            for j, key in enumerate(keys):
                last = j == len(keys) - 1
                node = self.nodes.get(key)
                if node is None:
                    history = cache.history(j * self.block, (j + 1) * self.block, self.rates)
                    node = Node(key, parent, (j + 1) * self.block, history)
                    self._insert(node)
                    new += 1
                if last and node.state is None:
                    node.state = cache.boundary_state()
                    self.memory_used += _tensor_bytes(node.state)
                if self.dir is not None and (key not in self.disk or (last and not self.disk[key].anchored)):
                    self._write(node)
                self.nodes.move_to_end(key)
                parent = key
            self.stats.stored_nodes += new
            self._evict_memory()
            self._evict_disk()
            return new

    def _insert(self, node: Node) -> None:
        self.nodes[node.key] = node
        self.memory_used += node.nbytes
        parent = self.nodes.get(node.parent)
        if parent is not None:
            parent.children += 1

    def _drop(self, key: str) -> None:
        node = self.nodes.pop(key)
        self.memory_used -= node.nbytes
        parent = self.nodes.get(node.parent)
        if parent is not None:
            parent.children -= 1

    def _evict_memory(self) -> None:
        while self.memory_used > self.memory_budget and self.nodes:
            victim = next((k for k, n in self.nodes.items() if n.children == 0), None)
            if victim is None:
                break
            self._drop(victim)
            self.stats.evicted_nodes += 1

    # ------------------------------------------------------------------------------------------------------ disk
    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def _write(self, node: Node) -> None:
        from safetensors.torch import save_file

        tensors = {f"h.{k}": v.contiguous() for k, v in node.history.items()}
        if node.state is not None:
            tensors.update({f"s.{k}": v.contiguous() for k, v in node.state.items()})
        meta = {"format": FORMAT, "parent": node.parent, "length": str(node.length),
                "anchored": str(node.state is not None), "sha256": _checksum(tensors)}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())

        write_atomically(self._path(node.key), write)
        nbytes = self._path(node.key).stat().st_size
        old = self.disk.pop(node.key, None)
        self.disk_used += nbytes - (old.nbytes if old is not None else 0)
        self.disk[node.key] = DiskEntry(node.parent, node.length, nbytes, node.state is not None)
        self.stats.disk_writes += 1

    def _read(self, key: str, keep: Node | None) -> Node | None:
        """The node of ``key`` from its file, checked; None (and the file removed) if it is corrupt."""
        from safetensors import safe_open

        path = self._path(key) if self.dir is not None else None
        if path is None or key not in self.disk:
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("format") != FORMAT or meta.get("sha256") != _checksum(tensors):
                raise ValueError("checksum mismatch")
        except Exception as e:  # truncated, unreadable, or altered: never used
            log.warning("prefix cache: skipping corrupt entry %s (%s); it will be recomputed", path.name, e)
            self.stats.corrupt += 1
            self._forget_disk(key)
            return None
        self.stats.disk_reads += 1
        history = {k[2:]: v for k, v in tensors.items() if k.startswith("h.")}
        state = {k[2:]: v for k, v in tensors.items() if k.startswith("s.")} or None
        if keep is not None:  # in memory without its state: add the state
            if state is not None and keep.state is None:
                keep.state = state
                self.memory_used += _tensor_bytes(state)
            node = keep
        else:
            node = Node(key, meta["parent"], int(meta["length"]), history, state)
            self._insert(node)
        self.disk.move_to_end(key)
        return node

    def _forget_disk(self, key: str) -> None:
        entry = self.disk.pop(key, None)
        if entry is not None:
            self.disk_used -= entry.nbytes
        self._path(key).unlink(missing_ok=True)

    def _scan_disk(self) -> None:
        """Index the files a previous run left (oldest first by modification time); leftovers of interrupted writes
        are removed."""
        from safetensors import safe_open

        for tmp in self.dir.glob("*.tmp-*"):
            tmp.unlink(missing_ok=True)
        files = sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                entry = DiskEntry(meta["parent"], int(meta["length"]), path.stat().st_size,
                                  meta.get("anchored") == "True")
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
            except Exception as e:
                log.warning("prefix cache: skipping unreadable entry %s (%s)", path.name, e)
                self.stats.corrupt += 1
                path.unlink(missing_ok=True)
                continue
            self.disk[path.stem] = entry
            self.disk_used += entry.nbytes
        self._evict_disk()

    def _evict_disk(self) -> None:
        if self.dir is None:
            return
        while self.disk_used > self.disk_budget and self.disk:
            children = {e.parent for e in self.disk.values()}
            victim = next((k for k in self.disk if k not in children), next(iter(self.disk)))
            self._forget_disk(victim)

    # ---------------------------------------------------------------------------------------------------- report
    def summary(self) -> dict:
        s = self.stats
        return {"memory_bytes": self.memory_used, "memory_nodes": len(self.nodes), "disk_bytes": self.disk_used,
                "disk_nodes": len(self.disk), "lookups": s.lookups, "hits": s.hits, "hit_tokens": s.hit_tokens,
                "lookup_tokens": s.lookup_tokens, "stored_nodes": s.stored_nodes, "evicted_nodes": s.evicted_nodes,
                "disk_reads": s.disk_reads, "disk_writes": s.disk_writes, "corrupt": s.corrupt}


def model_fingerprint(model, tokenizer_sha256: str = "", numerics: str = "plain") -> str:
    """A digest of what produces a model's decode state: its weights (every tensor of the state dict), config,
    dtype, numerics and tokenizer."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{activation_dtype(model.embed)}|{numerics}|{tokenizer_sha256}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
