"""The safetensors files of a checkpoint directory: one ``model.safetensors``, or shards named by
``model.safetensors.index.json``. Only safetensors is ever read; never pickle. Tensors keep their stored names and
dtypes here; naming (``dsv4.weights.names``) and precision (``dsv4.weights.official``) are the callers'.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def safetensor_files(path: Path) -> list[Path]:
    """The shards of the checkpoint directory ``path``: those its index names, else every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index ({e!r})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
                         for p in path.glob(pattern))
        hint = f" (found {pickles}: pickle checkpoints are never read; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors files in {path}{hint}")
    return files


def _check_index(path: Path, where: dict[str, str]) -> None:
    """The index of a sharded checkpoint agrees with its shards: ``where`` maps each tensor to the shard holding it."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    absent = sorted(k for k in weight_map if k not in where)
    if absent:
        raise ValueError(f"{index} lists tensor(s) that no shard holds: {absent[:5]}")
    moved = sorted(k for k in where if weight_map.get(k, where[k]) != where[k])
    if moved:
        raise ValueError(f"{index} places tensor(s) in a different shard than the one holding them: "
                         + ", ".join(f"{k} (index: {weight_map[k]}, held by {where[k]})" for k in moved[:5]))


def _merge(tensors: dict, where: dict[str, str], part: dict, f: Path) -> None:
    dup = sorted(set(part) & set(tensors))
    if dup:
        raise ValueError(f"tensor(s) {dup[:5]} appear in more than one shard ({where[dup[0]]} and {f.name})")
    tensors.update(part)
    where.update(dict.fromkeys(part, f.name))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by its stored name, read into memory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f in safetensor_files(path):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        _merge(tensors, where, part, f)
    _check_index(path, where)
    return tensors


# safetensors dtype names -> torch dtypes (the ones checkpoints of this model use, and the usual others)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
           "U32": torch.uint32, "U64": torch.uint64}
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
SAFETENSORS_DTYPE = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file as its header describes it: ``start`` and ``stop`` are absolute byte
    offsets in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_header(f: str | Path) -> tuple[dict[str, TensorInfo], dict]:
    """The tensors (name -> ``TensorInfo``) and the ``__metadata__`` of one safetensors file, from its header alone,
    checked against the file's size and each tensor's dtype and shape. Raises ``ValueError`` naming the file."""
    f = Path(f)
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{f} is not a readable safetensors file: {size} bytes, shorter than its header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{f} is not a readable safetensors file: header of {n} bytes in a file of {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f} is not a readable safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{f} is not a readable safetensors file: its header is not an object")
    meta = header.pop("__metadata__", None) or {}
    base, out = 8 + n, {}
    for name, h in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[h["dtype"]], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{f} is not a readable safetensors file: tensor {name!r} has an unreadable or "
                             "unknown entry in the header "
                             f"({h!r}: {e!r})") from None
        want = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != want or begin < 0:
            raise ValueError(f"{f} is not a readable safetensors file: tensor {name!r} of shape {list(shape)} "
                             f"{h['dtype']} should take {want} bytes, the header gives it {end - begin}")
        if base + end > size:
            raise ValueError(f"{f} is not a readable safetensors file: tensor {name!r} ends at byte {base + end}, "
                             f"past the end of the file ({size} bytes): the file is truncated")
        out[name] = TensorInfo(name, dtype, shape, base + begin, base + end)
    return out, meta


def read_headers(path: str | Path) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of a checkpoint directory (name -> (file, ``TensorInfo``)) from the headers alone, with the
    index checked against the shards: what a memory planner or a lazy loader needs, without reading any data."""
    path = Path(path)
    out: dict[str, tuple[Path, TensorInfo]] = {}
    where: dict[str, str] = {}
    for f in safetensor_files(path):
        infos, _ = read_header(f)
        _merge(out, where, {k: (f, v) for k, v in infos.items()}, f)
    _check_index(path, where)
    return out


def map_tensors(path: str | Path, headers: dict[str, tuple[Path, TensorInfo]] | None = None
                ) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by its stored name, memory-mapped from the files: nothing is read
    until used, and pages read are the operating system's to drop again (they are file-backed and clean). The
    tensors are read-only in effect (a copy-on-write mapping: writing to one changes neither the file nor the other
    processes' view). Each file is mapped once, its tensors views of that one mapping (which lives while any of them
    does): a mapping per tensor would put thousands of whole-file mappings on each page of a large checkpoint,
    which every walk of the kernel's reverse map (reclaim, access monitoring) then visits. A tensor whose offset does
    not suit its dtype's alignment is copied into memory instead. ``headers``: the directory's ``read_headers``, if
    already read."""
    maps: dict[Path, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, (f, info) in (read_headers(path) if headers is None else headers).items():
        if f not in maps:
            maps[f] = torch.from_numpy(np.memmap(f, dtype=np.uint8, mode="c"))
        raw = maps[f][info.start:info.stop]
        if info.start % torch.empty(0, dtype=info.dtype).element_size():
            raw = raw.clone()
        out[name] = raw.view(info.dtype).view(info.shape)
    return out


def write_safetensors(tmp: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, into the
    directory ``tmp`` (the writers' temporary sibling: ``dsv4.atomic.write_directory_atomically``)."""
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
