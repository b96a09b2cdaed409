"""The process group and the device meshes of a parallel run (``Parallel``), their timeouts, and the process-level
helpers of a launch (rank 0 or not, world size, rank 0 first, the end of the process group).

``Parallel.init(ep=..., dp_shard=..., timeout_s=...)`` joins the process group of a ``torchrun`` launch (its
environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or makes a one-rank one.
Backend: NCCL when CUDA is present, else gloo (``DSV4_DIST_BACKEND`` overrides). Every group gets the run's
``--dist-timeout``; waits that may take longer (rank 0 building the tokenizer and the shards) use a gloo group of
their own with a one-day timeout. ``Parallel.parallelize(model)`` builds two meshes when it knows the expert count:

- the EP mesh ``(ep_replicate, ep)`` (``ep`` alone when ``ep`` is the world size): ``ep`` ranks share the experts of
  each layer (``ep=None`` picks ``gcd(world, n_routed_experts)``); ``dsv4.parallel.expert``;
- the data-parallel mesh ``(dp_replicate, dp_shard)`` (``dp_shard`` alone when it is the world size): FSDP2 over
  ``dp_shard`` ranks (default: all), HSDP replicas over ``dp_replicate``; ``dsv4.parallel.fsdp``.

The other methods of ``Parallel`` are the run's entry points into the sibling modules (``parallelize``, ``muon``,
``checkpoint``): each calls the function that owns the work with this run's meshes. A rank that dies makes the
collectives of the others fail (gloo: at once; NCCL: through its watchdog) or time out after ``--dist-timeout``;
``dsv4.parallel.trainer`` turns that into a ``DistributedError``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv4.parallel import dcp, expert, fsdp, muon
from dsv4.parallel.parallelize import parallelize
from dsv4.train.optim import HybridOptimizer

__all__ = ["DEFAULT_TIMEOUT_S", "DistributedError", "Parallel", "finish", "is_main", "launched", "main_first",
           "main_only", "world_size"]

DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the network broke."""


class Parallel:
    """One process's place in the run: the process group, the meshes, and what to do with the model on them.

    Construct it with ``Parallel.init(...)`` (or directly once the process group exists). ``ep`` / ``dp_shard``
    are checked against the world size here and against the model in ``parallelize``.
    """

    def __init__(self, ep: int | None = None, dp_shard: int | None = None, backend: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if not dist.is_initialized():
            raise RuntimeError("Parallel: the process group is not initialized; use Parallel.init(...)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.backend = backend or dist.get_backend()
        if torch.cuda.is_available() and "nccl" in str(self.backend):
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.timeout_s = timeout_s
        self.requested_ep, self.requested_dp_shard = ep, dp_shard
        self.ep: int | None = None
        self.dp_shard: int | None = None
        self.ep_mesh = self.dp_mesh = None  # DeviceMesh, by build_meshes
        self.expert_params: list[nn.Parameter] = []  # the expert slices, by parallelize
        self.model: nn.Module | None = None  # the parallel model, by parallelize
        # a gloo group for host-side waits (tokenizer / shard building) that may take longer than the timeout
        self._slow = dist.new_group(backend="gloo", timeout=timedelta(days=1))
        self.set_timeout(None)
        if dp_shard is not None:
            self.check_degree("dp_shard", dp_shard)
        if ep is not None:
            self.check_degree("ep", ep)

    @classmethod
    def init(cls, ep: int | None = None, dp_shard: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
             backend: str | None = None) -> Parallel:
        """Join the process group of this launch (``torchrun``'s environment) or make a one-rank one."""
        if not dist.is_initialized():
            backend = backend or os.environ.get("DSV4_DIST_BACKEND") or \
                ("nccl" if torch.cuda.is_available() else "gloo")
            timeout = timedelta(seconds=timeout_s)
            if "nccl" in backend:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            if launched():
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return cls(ep=ep, dp_shard=dp_shard, backend=backend, timeout_s=timeout_s)

    def set_timeout(self, group) -> None:
        """Give ``group`` (None: the default one) this run's timeout; subgroups otherwise get PyTorch's default
        (30 min for gloo) whatever the default group has."""
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(timedelta(seconds=self.timeout_s), group)
        except (ImportError, AttributeError, ValueError, RuntimeError):  # a private API: best effort
            pass

    def check_degree(self, name: str, value: int) -> None:
        if not isinstance(value, int) or value < 1 or self.world % value:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive divisor of the world size "
                             f"{self.world}, got {value!r}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (builds files), then the others (read them)."""
        if not self.is_main:
            dist.barrier(group=self._slow)
        yield
        if self.is_main:
            dist.barrier(group=self._slow)

    def build_meshes(self, n_experts: int) -> None:
        """The EP and data-parallel meshes for a model with ``n_experts`` routed experts (see the module docstring),
        every group of them with this run's timeout."""
        from torch.distributed.device_mesh import init_device_mesh

        self.ep = self.requested_ep or math.gcd(self.world, n_experts)
        self.check_degree("ep", self.ep)
        if n_experts % self.ep:
            raise ValueError(f"--ep {self.ep}: {n_experts} routed experts do not split evenly over {self.ep} ranks")
        self.dp_shard = self.requested_dp_shard or self.world
        self.check_degree("dp_shard", self.dp_shard)
        kind = self.device.type
        if self.world // self.ep > 1:
            self.ep_mesh = init_device_mesh(kind, (self.world // self.ep, self.ep),
                                            mesh_dim_names=("ep_replicate", "ep"))
        else:
            self.ep_mesh = init_device_mesh(kind, (self.ep,), mesh_dim_names=("ep",))
        if self.world // self.dp_shard > 1:
            self.dp_mesh = init_device_mesh(kind, (self.world // self.dp_shard, self.dp_shard),
                                            mesh_dim_names=("dp_replicate", "dp_shard"))
        else:
            self.dp_mesh = init_device_mesh(kind, (self.dp_shard,), mesh_dim_names=("dp_shard",))
        for mesh in (self.ep_mesh, self.dp_mesh):
            for dim in range(mesh.ndim):
                self.set_timeout(mesh.get_group(dim))

    def layout(self) -> dict:
        return {"world_size": self.world, "ep": self.ep, "dp_shard": self.dp_shard, "backend": str(self.backend)}

    # --------------------------------------------------------------------------------- sums over all ranks
    def total(self, count: torch.Tensor) -> torch.Tensor:
        """A count summed over all ranks (for ``lm_losses(..., total=...)``)."""
        count = count.detach().clone()
        dist.all_reduce(count)
        return count

    def sum_values(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-rank values (any shapes) summed over all ranks, in one all-reduce."""
        flat = torch.cat([v.detach().float().reshape(-1) for v in values])
        dist.all_reduce(flat)
        return [piece.view(v.shape) for v, piece in zip(values, flat.split([v.numel() for v in values]))]

    # ----------------------------------------------------- the model, through the modules that own the work
    def parallelize(self, model: nn.Module) -> nn.Module:
        """``dsv4.parallel.parallelize.parallelize``: EP and FSDP2 applied to ``model`` in place; returns it."""
        return parallelize(model, self)

    def sync_expert_grads(self) -> None:
        """``dsv4.parallel.expert.sync_expert_grads`` of the model's expert slices."""
        expert.sync_expert_grads(self.expert_params, self.ep_mesh, self.device)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """``dsv4.parallel.fsdp.clip_grad_norm_``: the global gradient norm, and the clipping."""
        return fsdp.clip_grad_norm_(model, max_norm, self.expert_params, self.dp_mesh, self.ep_mesh, self.device)

    def build_optimizer(self, model: nn.Module, **kwargs) -> HybridOptimizer:
        """``dsv4.parallel.muon.build_optimizer``: Muon (distributed) + AdamW over the parallel model."""
        return muon.build_optimizer(model, **kwargs)

    def full_state_dict(self, model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """``dsv4.parallel.dcp.full_state_dict``: the whole tensors (collective)."""
        return dcp.full_state_dict(self, model, rank0_only)

    def full_grads(self, model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor | None]:
        """``dsv4.parallel.dcp.full_grads``: the whole gradients (collective)."""
        return dcp.full_grads(self, model, rank0_only)

    def save_pretrained(self, model: nn.Module, path: str | Path, **kwargs) -> None:
        """``dsv4.parallel.dcp.save_pretrained``: the HF layout, written by rank 0 (collective)."""
        dcp.save_pretrained(self, model, path, **kwargs)

    def save_checkpoint(self, root: str | Path, step: int, model: nn.Module, optimizer: HybridOptimizer,
                        meta: dict, keep: int = 3, extra: dict[str, torch.Tensor] | None = None) -> Path:
        """``dsv4.parallel.dcp.save_checkpoint`` (collective)."""
        return dcp.save_checkpoint(self, root, step, model, optimizer, meta, keep=keep, extra=extra)

    def load_checkpoint(self, path: str | Path, model: nn.Module, optimizer: HybridOptimizer,
                        extra: dict[str, torch.Tensor] | None = None) -> dict:
        """``dsv4.parallel.dcp.load_checkpoint`` (collective)."""
        return dcp.load_checkpoint(self, path, model, optimizer, extra=extra)


# ------------------------------------------------------------------------------------- process-level helpers

def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or with its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main() -> bool:
    """Rank 0, or a process without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def main_only(say):
    """``say`` on rank 0, a no-op elsewhere."""
    return say if is_main() else (lambda *a, **k: None)


def main_first(par: Parallel | None) -> AbstractContextManager:
    """Rank 0 runs the block first, then the others (``contextlib.nullcontext`` without ``par``)."""
    return par.main_first() if par is not None else nullcontext()


def finish() -> bool:
    """End the process group (if any); True on rank 0 (the one that reports)."""
    main = is_main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return main
