"""The safetensors files of a checkpoint directory: one ``model.safetensors``, or shards named by
``model.safetensors.index.json``. Only safetensors is ever read; never pickle. Tensors keep their stored names and
dtypes here; naming (``dsv4.weights.names``) and precision (``dsv4.weights.official``) are the callers'.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by its stored name."""
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
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise ValueError(f"tensor(s) {dup[:5]} appear in more than one shard ({where[dup[0]]} and {f.name})")
        tensors.update(part)
        where.update(dict.fromkeys(part, f.name))
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        absent = sorted(k for k in weight_map if k not in tensors)
        if absent:
            raise ValueError(f"{index} lists tensor(s) that no shard holds: {absent[:5]}")
        moved = sorted(k for k in tensors if weight_map.get(k, where[k]) != where[k])
        if moved:
            raise ValueError(f"{index} places tensor(s) {moved[:5]} in a different shard than the one holding them")
    return tensors


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
