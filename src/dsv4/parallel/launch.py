"""What ``dsv4 train`` (``dsv4.train.run``) calls to run the same way in one process and under ``torchrun``.

The ``Parallel`` of a run or ``None`` (``from_args``, from the options ``--ep``, ``--dp-shard`` and
``--dist-timeout``: fields of ``dsv4.train.options.TrainOptions`` like every option of ``dsv4 train``), the trainer
(``make_trainer``: ``Trainer`` or ``DistributedTrainer``), batches on this rank's device, the final HF export, and
the process-level helpers of ``dsv4.parallel.mesh`` (rank 0 or not, world size, rank 0 first, the end of the process
group). Each takes ``par=None`` for a single-process run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dsv4.parallel.dcp import is_distributed_checkpoint
from dsv4.parallel.mesh import (DEFAULT_TIMEOUT_S, DistributedError, Parallel, finish, is_main, launched, main_first,
                                main_only, world_size)
from dsv4.parallel.trainer import DistributedTrainer
from dsv4.train.loop import Trainer
from dsv4.train.options import TrainOptions

__all__ = ["DistributedError", "finish", "from_args", "is_main", "main_first", "main_only", "make_trainer",
           "save_pretrained", "to_device", "world_size"]


def from_args(args: TrainOptions) -> Parallel | None:
    """The ``Parallel`` of a ``dsv4 train`` run (its ``TrainOptions``, or a parsed command line): under ``torchrun``
    (any world size), or when ``--resume`` finds a distributed checkpoint (then at one rank); ``None`` for a plain
    single-process run. No ``--dist-timeout``: ``DEFAULT_TIMEOUT_S``."""
    ep, dp_shard = getattr(args, "ep", None), getattr(args, "dp_shard", None)
    if not launched():
        if (ep or 1) > 1 or (dp_shard or 1) > 1:
            raise ValueError("--ep / --dp-shard above 1 need several processes: launch with torchrun "
                             "(see docs/distributed.md)")
        from dsv4.train.checkpoint import list_checkpoints

        found = list_checkpoints(Path(args.out) / "checkpoints") if getattr(args, "resume", False) else []
        if not (found and is_distributed_checkpoint(found[-1])):
            return None
    timeout = getattr(args, "dist_timeout", None)
    return Parallel.init(ep=ep, dp_shard=dp_shard, timeout_s=DEFAULT_TIMEOUT_S if timeout is None else timeout)


def make_trainer(par: Parallel | None, model: nn.Module, data, cfg, out: str | Path, val_batches=(),
                 log: Callable[[dict], None] | None = None) -> Trainer:
    """``Trainer`` in one process; with ``par``, parallelize ``model`` (in place) and return a
    ``DistributedTrainer`` (a ``PackedLoader`` built for one process is pointed at this rank's rows)."""
    if par is None:
        return Trainer(model, data, cfg, out, val_batches=val_batches, log=log)
    if par.model is None:
        par.parallelize(model)
    if hasattr(data, "set_rank") and par.world > 1:  # a StagedLoader: its stages' loaders take this rank's rows
        data.set_rank(par.rank, par.world)
    if getattr(data, "world_size", None) == 1 and hasattr(data, "rank") and par.world > 1:
        from dsv4.data.packing import PackedLoader

        if isinstance(data, PackedLoader):
            data.rank, data.world_size = par.rank, par.world
    return DistributedTrainer(par, model, data, cfg, out, val_batches=val_batches, log=log)


def to_device(par: Parallel | None, batches: list, token_bytes: torch.Tensor | None = None
              ) -> tuple[list, torch.Tensor | None]:
    """Batches (and a token-bytes table) on this rank's device: what ``validation_loss`` needs for the parallel model."""
    if par is None:
        return batches, token_bytes
    return ([b.to(par.device) for b in batches],
            token_bytes.to(par.device) if token_bytes is not None else None)


def save_pretrained(par: Parallel | None, model: nn.Module, path: str | Path) -> None:
    """``model`` in HF layout at ``path``: ``model.save_pretrained`` in one process; with ``par``, the whole weights
    gathered and written by rank 0 (a collective: every rank calls it)."""
    if par is None:
        model.save_pretrained(path)
    else:
        par.save_pretrained(model, path)
