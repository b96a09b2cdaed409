"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) of a parallel run, and its whole weights.

A checkpoint is a directory ``step-XXXXXXXX`` holding one ``.distcp`` file per rank and ``.metadata``: the model, the
Muon and AdamW states (by parameter name), the RNG and the trainer's extra tensors, the experts stored as one
``[E, I, d]`` tensor sharded along E, so that it loads at any number of ranks and any ``ep``. Rank 0 creates a
temporary sibling directory (``dsv4.atomic.atomic_directory``) and broadcasts its name, every rank writes its part
into it, and after a barrier rank 0 writes ``meta.json`` (the marker), fsyncs it all and renames it into place, the
previous one of that step removed only after that; older checkpoints are pruned after it. Single-process checkpoints
(``dsv4.train.checkpoint``) load too, each rank taking its part of the whole tensors.

``full_state_dict`` / ``full_grads`` gather whole tensors (FSDP2 shards and expert slices); ``save_pretrained``
writes the HF layout from rank 0, at any rank count.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from dsv4.parallel.expert import (as_expert_dtensor, expert_global_shape, expert_names, gather_experts,
                                  local_experts)
from dsv4.train.optim import HybridOptimizer

if TYPE_CHECKING:
    from dsv4.parallel.mesh import Parallel

__all__ = ["checkpoint_failure", "full_grads", "full_state_dict", "is_distributed_checkpoint", "load_checkpoint",
           "save_checkpoint", "save_pretrained"]


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ".metadata").exists()


def checkpoint_failure(e) -> str:
    """The first rank's error of a DCP ``CheckpointException``, on one line (its str is a traceback per rank)."""
    for rank, (exc, _) in sorted(e.failures.items()):
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first} (rank {rank})"
    return str(e).strip().splitlines()[0]


# ---------------------------------------------------------------------------------------------- whole weights

def _whole(par: Parallel, t: torch.Tensor, expert: bool) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor()
    return gather_experts(t, par.ep_mesh) if expert else t


def full_state_dict(par: Parallel, model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.state_dict()`` whole, on CPU (collective; empty on other ranks with rank0_only)."""
    names = expert_names(model, par.expert_params)
    out = {}
    for key, t in model.state_dict().items():
        t = _whole(par, t, key in names)
        if par.is_main or not rank0_only:
            out[key] = t.detach().cpu().clone()
    return out


def full_grads(par: Parallel, model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient whole, on CPU (collective), None where it has none."""
    names = expert_names(model, par.expert_params)
    out = {}
    for key, p in model.named_parameters():
        g = None if p.grad is None else _whole(par, p.grad, key in names).detach().cpu().clone()
        if par.is_main or not rank0_only:
            out[key] = g
    return out


class _FullModel:
    """What ``dsv4.weights.save_pretrained`` reads of a model (``config``, ``named_modules()``, ``state_dict()``),
    from whole tensors: one module, holding no packed weights."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def named_modules(self):
        yield "", self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def save_pretrained(par: Parallel, model: nn.Module, path: str | Path, **kwargs) -> None:
    """HF layout (``dsv4.weights.save_pretrained``) of the whole model, written by rank 0 (collective)."""
    from dsv4.weights import save_pretrained as save_hf

    state = full_state_dict(par, model)
    if par.is_main:
        save_hf(_FullModel(model.config, state), path, **kwargs)
    dist.barrier()


def _local_copy(par: Parallel, target: torch.Tensor, full: torch.Tensor, expert: bool) -> None:
    """Copy this rank's part of the whole tensor ``full`` into ``target`` (DTensor, expert slice or plain)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.detach()
    if isinstance(target, DTensor):
        piece = distribute_tensor(full.to(target.device), target.device_mesh, target.placements,
                                  src_data_rank=None).to_local()
        target.to_local().copy_(piece)
    elif expert:
        target.copy_(local_experts(full, par.ep_mesh))
    else:
        target.copy_(full)


# ------------------------------------------------------------------------------------------------ DCP state

def _checkpoint_state(par: Parallel, model: nn.Module, optimizer: HybridOptimizer, keys: set[str] | None = None
                      ) -> tuple[dict[str, torch.Tensor], list]:
    """The flat name -> tensor dict DCP reads and writes, and how to put loaded optimizer state back.

    With ``keys`` (what a checkpoint holds) the optimizer entries are fresh tensors for exactly those keys."""
    names = expert_names(model, par.expert_params)
    as_global = lambda t: as_expert_dtensor(t, par.ep_mesh)  # noqa: E731
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        state[f"model.{key}"] = as_global(t) if key in names else t
    install = []
    param_names = {id(p): n for n, p in model.named_parameters()}
    for opt_name, opt in (("muon", optimizer.muon), ("adamw", optimizer.adamw)):
        for group in opt.param_groups:
            for p in group["params"]:
                name = param_names[id(p)]
                prefix = f"optim.{opt_name}.{name}."
                if keys is None:
                    for k, v in opt.state.get(p, {}).items():
                        if torch.is_tensor(v):
                            state[prefix + k] = as_global(v) if name in names and v.dim() else v
                    continue
                for full in sorted(k for k in keys if k.startswith(prefix) and "." not in k[len(prefix):]):
                    k = full[len(prefix):]
                    if k == "step":
                        v = torch.zeros((), dtype=torch.float32)
                    else:
                        v = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state[full] = as_global(v) if name in names and v.dim() else v  # as saved
                    install.append((opt, p, k, v))
    state["trainer.rng"] = torch.get_rng_state()
    return state, install


def save_checkpoint(par: Parallel, root: str | Path, step: int, model: nn.Module, optimizer: HybridOptimizer,
                    meta: dict, keep: int = 3, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A distributed checkpoint ``root/step-XXXXXXXX`` (collective; see the module docstring). ``extra``: more
    tensors (the same on every rank) stored as ``trainer.<name>``."""
    import torch.distributed.checkpoint as dcp

    from dsv4.atomic import atomic_directory
    from dsv4.train.checkpoint import prune_checkpoints

    root = Path(root)
    final = root / f"step-{step:08d}"
    # rank 0 owns the temporary directory (dsv4.atomic.atomic_directory) and tells the others its name; every
    # rank writes its part into it, and rank 0 adds meta.json and renames it into place once all have finished
    name: list[str | None] = [None]
    with (atomic_directory(final) if par.is_main else contextlib.nullcontext()) as tmp:
        if par.is_main:
            name[0] = tmp.name
        dist.broadcast_object_list(name, src=0, device=par.device)
        tmp = root / name[0]
        state, _ = _checkpoint_state(par, model, optimizer)
        state.update({f"trainer.{k}": v for k, v in (extra or {}).items()})
        dcp.save(state, checkpoint_id=str(tmp))
        dist.barrier()  # every rank's files are written
        if par.is_main:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "format": "dcp",
                                                       "layout": par.layout()}, indent=2))  # last: the marker
    # a failed write (or a lost rank) raised above: rank 0 removed the temporary directory, the old one stays
    if par.is_main:
        prune_checkpoints(root, keep, final)
    dist.barrier()
    return final


def load_checkpoint(par: Parallel, path: str | Path, model: nn.Module, optimizer: HybridOptimizer,
                    extra: dict[str, torch.Tensor] | None = None) -> dict:
    """Load a checkpoint written at any rank count (or a single-process one) into the parallel model and optimizer;
    returns its ``meta`` (with ``step``, ``skipped``, ``data``). ``extra``: tensors to fill from the checkpoint's
    ``trainer.<name>`` entries (distributed checkpoints)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from dsv4.atomic import recover_directory

    path = Path(path)
    recover_directory(path)  # on every rank: safe when several recover at once
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: meta.json is missing")
    if not is_distributed_checkpoint(path):
        return _load_single_process(par, path, model, optimizer)
    try:
        meta = json.loads((path / "meta.json").read_text())
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except (json.JSONDecodeError, OSError, EOFError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {e}") from None
    keys = set(saved)
    state, install = _checkpoint_state(par, model, optimizer, keys)
    missing = sorted(k for k in state if k.startswith("model.") and k not in keys)
    unexpected = sorted(k for k in keys if k.startswith("model.") and k not in state)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    # checked here: DCP's own size error is a CheckpointException (a BaseException) with a traceback per rank
    shapes = [f"{k[len('model.'):]}: checkpoint {tuple(saved[k].size)} vs model {tuple(v.shape)}"
              for k, v in state.items() if k.startswith("model.") and hasattr(saved[k], "size")
              and tuple(saved[k].size) != tuple(v.shape)]
    if shapes:
        raise ValueError(f"checkpoint {path} does not match the model: mis-shaped tensor(s): " + "; ".join(shapes[:10]))
    if "trainer.rng" not in keys:
        state.pop("trainer.rng")
    for k, v in (extra or {}).items():
        if f"trainer.{k}" not in keys:
            raise ValueError(f"checkpoint {path} lacks trainer.{k}")
        state[f"trainer.{k}"] = v
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as e:  # a BaseException: no handler for errors would see it
        raise ValueError(f"checkpoint {path} could not be read: {checkpoint_failure(e)}") from None
    for opt, p, k, v in install:
        opt.state[p][k] = v
    if "trainer.rng" in state:
        torch.set_rng_state(state["trainer.rng"])
    return meta


class _Plain(nn.Module):
    """Receives the whole tensors of a single-process checkpoint under the model's names."""

    def __init__(self, own: dict[str, torch.Tensor]):
        super().__init__()
        self._own = own

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self._own


def _load_single_process(par: Parallel, path: Path, model: nn.Module, optimizer: HybridOptimizer) -> dict:
    """A ``dsv4.train.checkpoint`` directory (whole tensors): each rank takes its shards."""
    from dsv4.train.checkpoint import load_checkpoint as load_whole

    names = expert_names(model, par.expert_params)
    targets = model.state_dict()
    own = {}
    for key, t in targets.items():  # a DTensor's shape is the global one
        shape = expert_global_shape(t, par.ep_mesh) if key in names else tuple(t.shape)
        own[key] = torch.empty(shape, dtype=t.dtype)
    trainer_state, meta = load_whole(path, _Plain(own))
    with torch.no_grad():
        for key, t in targets.items():
            _local_copy(par, t, own[key], key in names)
    saved = trainer_state["optimizer"]
    param_names = {id(p): n for n, p in model.named_parameters()}
    for opt_name, opt in (("muon", optimizer.muon), ("adamw", optimizer.adamw)):
        sd = saved[opt_name]
        ours = [p for g in opt.param_groups for p in g["params"]]
        index = [i for g in sd["param_groups"] for i in g["params"]]
        if len(index) != len(ours):
            raise ValueError(f"checkpoint {path}: its {opt_name} state covers {len(index)} parameters, "
                             f"this model has {len(ours)}")
        for i, p in zip(index, ours):
            if i not in sd["state"]:
                continue
            entry = {}
            for k, v in sd["state"][i].items():
                if torch.is_tensor(v) and v.dim():
                    target = torch.zeros_like(p, dtype=v.dtype, memory_format=torch.preserve_format)
                    _local_copy(par, target, v, param_names[id(p)] in names)
                    v = target
                entry[k] = v
            opt.state[p] = entry
    torch.set_rng_state(trainer_state["rng"])
    meta.update(step=int(trainer_state["step"]), skipped=int(trainer_state["skipped"]), data=trainer_state["data"])
    if "anticipatory" in trainer_state:
        meta["anticipatory_state"] = trainer_state["anticipatory"]
    return meta
