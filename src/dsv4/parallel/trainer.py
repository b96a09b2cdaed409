"""The distributed trainer: ``DistributedTrainer``, ``dsv4.train.loop.Trainer`` on a parallel model.

Each rank trains on its slice of the global batch; losses (shares of the global-batch mean), metrics, gradient norm,
optimizer, aux-loss-free bias update (``update_router_bias`` all-reduces the loads), checkpoints and anticipatory
routing are the global ones, through the hooks ``Trainer`` exposes. Rank 0 writes the metrics and the log.

A rank that dies makes the collectives of the others fail (gloo: at once; NCCL: through its watchdog) or time out
after ``--dist-timeout`` seconds; ``DistributedTrainer.run`` turns that into a ``DistributedError`` naming the step and
the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv4.parallel.dcp import checkpoint_failure, is_distributed_checkpoint
from dsv4.parallel.mesh import DistributedError, Parallel
from dsv4.train.anticipatory import AnticipatoryRouting
from dsv4.train.loop import Losses, StepResult, Trainer, lm_losses
from dsv4.train.optim import HybridOptimizer

__all__ = ["DistributedTrainer", "WholeSnapshotRouting"]


class WholeSnapshotRouting(AnticipatoryRouting):
    """``AnticipatoryRouting`` whose router snapshots are whole tensors (an FSDP2 router weight is a shard; the
    router's forward needs the whole matrix of a few steps ago)."""

    def before_step(self) -> None:
        from torch.distributed.tensor import DTensor

        super().before_step()
        last = self.snapshots[-1]
        self.snapshots[-1] = [(w.full_tensor() if isinstance(w, DTensor) else w, b) for w, b in last]
        old = self.snapshots[0] if self.active else None
        for i, router in enumerate(self.routers):
            router.routing_params = old[i] if old is not None else None


class DistributedTrainer(Trainer):
    """``Trainer`` on a parallel model (``Parallel.parallelize``): each rank trains on its slice of the global batch;
    ``run(tokens_per_step)`` takes the tokens of one rank's batch."""

    def __init__(self, parallel: Parallel, model: nn.Module, data, cfg, out: str | Path,
                 val_batches: Iterable = (), log: Callable[[dict], None] | None = None):
        if parallel.model is not model:
            raise ValueError("DistributedTrainer: pass the model returned by parallel.parallelize(model)")
        self.parallel = parallel
        self._indexer_kl = None
        self._saving = False
        super().__init__(model, data, cfg, out, val_batches=[b.to(parallel.device) for b in val_batches], log=log)
        if not parallel.is_main:
            self.metrics_path = Path(os.devnull)
        if self.anticipatory is not None:  # the same routing, with whole snapshots
            self.anticipatory = WholeSnapshotRouting(self.anticipatory.routers, cfg.anticipatory_delay,
                                                     cfg.anticipatory_duration, sigma=cfg.spike_sigma)

    @property
    def log(self) -> Callable[[dict], None]:
        return self._log

    @log.setter
    def log(self, fn: Callable[[dict], None] | None) -> None:  # only rank 0 logs
        self._log = fn if fn is not None and self.parallel.is_main else (lambda record: None)

    # ------------------------------------------------------------------------------------ hooks of Trainer
    def make_optimizer(self) -> HybridOptimizer:
        return self.parallel.build_optimizer(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def losses(self, batch) -> Losses:
        losses = lm_losses(self.model, batch.to(self.parallel.device), self.cfg.balance_alpha,
                           total=self.parallel.total)
        self._indexer_kl = losses.indexer_kl
        return losses

    def clip_gradients(self) -> torch.Tensor:
        self.parallel.sync_expert_grads()
        return self.parallel.clip_grad_norm_(self.model, self.cfg.grad_clip)

    def global_metrics(self, loss, lm, mtp, balance, loads):
        kl = self._indexer_kl
        extra = [kl if torch.is_tensor(kl) else torch.tensor(float(kl))] if kl is not None else []
        values = self.parallel.sum_values([loss, lm, mtp, balance] + extra + list(loads))
        self._indexer_kl = values[4] if extra else None
        return (*values[:4], values[4 + len(extra):])

    def train_step(self) -> StepResult:
        r = super().train_step()
        if self._indexer_kl is not None:  # the logged KL: all ranks' (the recall stays this rank's)
            r.indexer_kl = float(self._indexer_kl)
        return r

    # ---------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        self._saving = True  # stays set if the save fails: run() names it
        path = self._save()
        self._saving = False
        return path

    def _save(self) -> Path:
        meta = {**self.checkpoint_meta(), "skipped": self.skipped, "data": self.data.state_dict()}
        extra = {}
        if self.anticipatory is not None:  # scalars in meta.json, the router snapshots as tensors
            st = self.anticipatory.state_dict()
            meta["anticipatory"] = {"losses": st["losses"], "remaining": st["remaining"], "spikes": st["spikes"],
                                    "snapshots": len(st["snapshots"])}
            for i, snap in enumerate(st["snapshots"]):
                for j, (w, b) in enumerate(snap):
                    extra[f"anticipatory.{i}.{j}.weight"], extra[f"anticipatory.{i}.{j}.bias"] = w, b
        return self.parallel.save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer, meta,
                                             keep=self.cfg.keep_checkpoints, extra=extra)

    def resume(self, path: str | Path | None = None) -> int:
        from dsv4.train.checkpoint import latest_checkpoint

        path = Path(path) if path is not None else latest_checkpoint(self.out / "checkpoints")
        anticipatory = self.anticipatory
        extra, saved = {}, None
        if anticipatory is not None and is_distributed_checkpoint(path):
            try:
                saved = json.loads((path / "meta.json").read_text()).get("anticipatory")
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"checkpoint {path} is corrupt or truncated: {e}") from None
            for i in range((saved or {}).get("snapshots", 0)):
                for j, router in enumerate(anticipatory.routers):
                    extra[f"anticipatory.{i}.{j}.weight"] = torch.zeros(tuple(router.weight.shape),
                                                                        dtype=router.weight.dtype)
                    extra[f"anticipatory.{i}.{j}.bias"] = torch.zeros_like(router.bias)
        meta = self.parallel.load_checkpoint(path, self.model, self.optimizer, extra=extra)
        self.data.load_state_dict(meta["data"])
        self.step, self.skipped = int(meta["step"]), int(meta.get("skipped", 0))
        if anticipatory is not None and saved is not None:
            snapshots = [[(extra[f"anticipatory.{i}.{j}.weight"].to(self.parallel.device),
                           extra[f"anticipatory.{i}.{j}.bias"]) for j in range(len(anticipatory.routers))]
                         for i in range(saved["snapshots"])]
            anticipatory.load_state_dict({**saved, "snapshots": snapshots})
        elif anticipatory is not None and "anticipatory_state" in meta:
            anticipatory.load_state_dict(meta["anticipatory_state"])
        return self.step

    # -------------------------------------------------------------------------------------------- the run
    def run(self, tokens_per_step: int, progress: bool = True) -> dict:
        """``Trainer.run`` over the global batch (``tokens_per_step``: one rank's); a failed collective or
        checkpoint write becomes a ``DistributedError`` (also printed to stderr) naming the step and the last
        complete checkpoint."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            return super().run(tokens_per_step * self.parallel.world, progress=progress and self.parallel.is_main)
        except (RuntimeError, dist.DistError, CheckpointException) as e:  # CheckpointException: a failed dcp.save
            if isinstance(e, DistributedError):
                raise
            raise self._stopped(e) from e

    def _stopped(self, e: BaseException) -> DistributedError:
        """The error of a run that stopped on ``e``, printed to stderr."""
        from torch.distributed.checkpoint.api import CheckpointException

        from dsv4.train.checkpoint import list_checkpoints

        done = list_checkpoints(self.out / "checkpoints")
        last = str(done[-1]) if done else "none"
        where = f"while writing the checkpoint of step {self.step}" if self._saving else f"in step {self.step + 1}"
        if isinstance(e, CheckpointException):
            first = checkpoint_failure(e)
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        lost = isinstance(e, dist.DistError) or any(w in first.lower() for w in (
            "connection", "peer", "timeout", "timed out", "nccl", "gloo", "socket"))
        msg = (f"rank {self.parallel.rank}/{self.parallel.world}: training stopped {where}: "
               f"{type(e).__name__}: {first}. "
               + ("Another rank has probably died or hung (or the network failed). " if lost else "")
               + f"Last complete checkpoint: {last}; continue with --resume.")
        print(f"\ndsv4 train: error: {msg}", file=sys.stderr, flush=True)
        return DistributedError(msg)
