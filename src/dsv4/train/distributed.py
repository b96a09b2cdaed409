"""Training across processes: FSDP2 for the dense parameters, expert parallelism for the routed experts, Muon with
whole-matrix orthogonalization, distributed checkpoints and HF export (docs/distributed.md has the command lines).

The model knows nothing of any of this; ``Parallel.parallelize(model)`` applies it from outside (torchtitan style):

- **Expert parallelism** over ``ep`` ranks: each ``dsv4.model.moe.Experts`` keeps only its slice of
  ``E / ep`` experts (the same module, so FP4 QAT and ``expert_weights()`` still apply; the parameters keep their
  names ``ffn.experts.w1`` etc., now ``[E / ep, I, d]``) and gets a forward pre-hook that sends every (token, expert)
  pair to the rank holding the expert (all-to-all of the rows and their gate values) and a forward hook that brings
  the expert outputs back (all-to-all) and sums them per token, in the order the local layer sums them. Both
  exchanges are autograd functions whose backward is the reverse exchange. With ``ep < world`` the expert slices are
  replicated over ``world / ep`` groups and their gradients summed over the replicas.
- **FSDP2** (``fully_shard``) over ``dp_shard`` ranks for every other parameter: one unit per block, per MTP block and
  the root; ``world / dp_shard`` replicas of that make it HSDP. Gradients are *summed* (divide factor 1), because the
  loop's losses on each rank are that rank's share of the global-batch mean (``lm_losses(..., total=...)``).
- **Muon** (``DistributedMuon``): momentum and Nesterov direction are elementwise and stay sharded; each matrix is then
  gathered whole onto one owner rank (round robin over the shard group, one all-to-all per round of ``dp_shard``
  matrices), orthogonalized there exactly as in one process, and its rows sent back (a second all-to-all). Expert
  slices are whole matrices already and are orthogonalized where they live. AdamW works on the DTensor shards.
- **Gradient clipping** sums squared norms over the shards and over the expert slices: the global norm.
- **The aux-loss-free bias update** all-reduces the expert loads over all ranks (``update_router_bias``).
- **Checkpoints** (``torch.distributed.checkpoint``): the model, the Muon and AdamW states (by parameter name) and
  the RNG in a ``step-XXXXXXXX`` directory, the experts stored as one ``[E, I, d]`` tensor sharded along E, so that
  a checkpoint loads at any number of ranks and any ``ep``. Rank 0 creates a temporary sibling directory
  (``dsv4.atomic.atomic_directory``) and broadcasts its name, every rank writes its part into it, and after a barrier
  rank 0 writes ``meta.json`` (the marker), fsyncs it all and renames it into place, the previous one of that step
  removed only after that; older checkpoints are pruned after it. Single-process checkpoints
  (``dsv4.train.checkpoint``) load too.
- ``save_pretrained`` gathers the full weights and writes the HF layout from rank 0, at any rank count.

A rank that dies makes the collectives of the others fail (gloo: at once; NCCL: through its watchdog) or time out
after ``--dist-timeout`` seconds; ``DistributedTrainer.run`` turns that into a ``DistributedError`` naming the step and
the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from dsv4.model.moe import Experts
from dsv4.train.loop import Trainer, lm_losses
from dsv4.train.optim import HybridOptimizer, Muon, build_optimizer, closure_loss

__all__ = ["DistributedError", "Parallel", "DistributedMuon", "DistributedTrainer", "expert_parallel",
           "all_to_all_rows", "add_arguments", "from_args", "is_distributed_checkpoint", "make_trainer", "main_first",
           "main_only", "is_main", "world_size", "to_device", "finish", "NullWriter"]

DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the network broke."""


def _chunk_rows(n: int, parts: int) -> list[int]:
    """Rows per part when ``n`` rows are split as DTensor / FSDP2 ``Shard(0)`` split them (``torch.chunk``)."""
    size = -(-n // parts) if n else 0
    return [max(0, min(size, n - i * size)) for i in range(parts)]


# ---------------------------------------------------------------------------------------------- all-to-all rows

class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send`` go to the ranks of ``group``; ``recv`` rows come back. Backward: the reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = (send, recv), group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send, recv = ctx.sizes
        out = grad.new_empty((sum(send),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=send, input_split_sizes=recv,
                               group=ctx.group)
        return out, None, None, None


def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all along dim 0 (``all_to_all_single``, which gloo and NCCL both have)."""
    return _AllToAll.apply(x, list(send), list(recv), group)


# ------------------------------------------------------------------------------------------- expert parallelism

class _EPState:
    def __init__(self, group, rank: int, size: int, n_experts: int):
        self.group, self.rank, self.size, self.n_experts = group, rank, size, n_experts
        self.local = n_experts // size
        self.plans: list[tuple] = []


def _ep_dispatch(module: Experts, args: tuple) -> tuple:
    """Forward pre-hook: send each (token, expert) row, with its gate value, to the rank holding the expert."""
    x, weights, indices = args
    ep: _EPState = module._ep
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # by global expert id, so grouped by destination rank
    counts = torch.bincount(flat, minlength=ep.n_experts)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=ep.group)  # [source rank, local expert]
    send = counts.view(ep.size, ep.local).sum(1).tolist()
    recv_counts = recv_counts.view(ep.size, ep.local)
    recv = recv_counts.sum(1).tolist()
    token = order // k
    x_recv = all_to_all_rows(x[token], send, recv, ep.group)
    g_recv = all_to_all_rows(weights.reshape(-1)[order].unsqueeze(1), send, recv, ep.group)
    local_idx = torch.repeat_interleave(torch.arange(ep.local, device=flat.device).repeat(ep.size),
                                        recv_counts.reshape(-1))
    ep.plans.append((x, token, send, recv, x_recv, g_recv))
    return x_recv, g_recv, local_idx.unsqueeze(1)


def _ep_combine(module: Experts, args: tuple, out_recv: torch.Tensor) -> torch.Tensor:
    """Forward hook: bring each row's expert output back and sum them per token (in the local layer's order)."""
    ep: _EPState = module._ep
    x, token, send, recv, x_recv, g_recv = ep.plans.pop()
    if out_recv.shape[0] == 0:
        # keep both exchanges in the graph on a rank that received nothing, so that every rank runs their backward
        out_recv = out_recv + 0.0 * (x_recv.sum() + g_recv.sum()).to(out_recv.dtype)
    back = all_to_all_rows(out_recv, recv, send, ep.group)
    out = torch.zeros_like(x)
    return out.index_add_(0, token, back.to(x.dtype))


def expert_parallel(experts: Experts, group, rank: int, size: int) -> Experts:
    """Make ``experts`` hold experts ``[rank * E / size, (rank + 1) * E / size)`` and exchange tokens with the other
    ranks of ``group`` (see the module docstring). The module keeps its class and its parameter names."""
    if getattr(experts, "_ep", None) is not None:
        raise ValueError("expert_parallel: this Experts module is already expert-parallel")
    n = experts.w1.shape[0]
    if n % size:
        raise ValueError(f"expert parallelism: {n} routed experts do not split over ep={size} ranks")
    lo, hi = rank * (n // size), (rank + 1) * (n // size)
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
    experts._ep = _EPState(group, rank, size, n)
    experts.register_forward_pre_hook(_ep_dispatch)
    experts.register_forward_hook(_ep_combine)
    return experts


# ------------------------------------------------------------------------------------------------------ Muon

class DistributedMuon(Muon):
    """Muon over FSDP2-sharded (DTensor) and expert-parallel parameters, equal to ``Muon`` in one process.

    Momentum and the Nesterov direction are computed on the local shards. A sharded matrix is then orthogonalized
    whole on its owner rank: parameters are dealt round robin (largest first) to the ranks of their shard group, and
    per round of ``group size`` matrices one all-to-all brings every shard to its owner and one sends the
    orthogonalized rows back. Non-DTensor parameters (expert slices, anything unsharded) hold whole matrices and are
    handled locally.
    """

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor

        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            params, views = group["params"], group["views"]
            present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                                   device=params[0].device if params else "cpu")
            if dist.is_initialized() and present.numel():
                dist.all_reduce(present, op=dist.ReduceOp.MAX)  # every rank decides alike which to skip
            rounds: dict[Any, list] = {}
            for p, view, has in zip(params, views, present.tolist()):
                if not has:
                    continue
                local = p.to_local() if isinstance(p, DTensor) else p
                g = p.grad
                g = torch.zeros_like(local, dtype=torch.float32) if g is None else \
                    (g.to_local() if isinstance(g, DTensor) else g).float()
                u = self._direction(group, p, g, local)
                shard = _shard_group(p)
                if shard is None:
                    self._apply(local, self._orthogonal(group, u, view), lr, wd)
                else:
                    rounds.setdefault(shard[0], []).append((p, view, u, local, shard))
            for jobs in rounds.values():
                jobs.sort(key=lambda j: -j[0].numel())  # same order on every rank: largest first
                size = jobs[0][4][2]
                for start in range(0, len(jobs), size):
                    self._round(group, jobs[start:start + size], lr, wd)
        return loss

    def _round(self, group: dict, jobs: list, lr: float, wd: float) -> None:
        """Job j of the round is owned by rank j of the shard group: gather it there, orthogonalize, scatter back."""
        pg, me, size = jobs[0][4]
        rows = [_chunk_rows(p.shape[0], size) for p, *_ in jobs]
        per_row = [math.prod(p.shape[1:]) for p, *_ in jobs]
        for (p, _, u, _, _), r in zip(jobs, rows):
            if u.shape[0] != r[me]:
                raise RuntimeError(f"DistributedMuon: a shard of {tuple(p.shape)} has {u.shape[0]} rows on rank {me}, "
                                   f"expected {r[me]} (Shard(0) split); only dim-0 sharding is supported")
        send = [u.numel() for _, _, u, _, _ in jobs] + [0] * (size - len(jobs))
        mine = me < len(jobs)
        recv = [r * per_row[me] for r in rows[me]] if mine else [0] * size
        u_all = torch.cat([u.reshape(-1) for _, _, u, _, _ in jobs])
        got = torch.empty(sum(recv), dtype=u_all.dtype, device=u_all.device)
        dist.all_to_all_single(got, u_all, output_split_sizes=recv, input_split_sizes=send, group=pg)
        if mine:
            p, view = jobs[me][0], jobs[me][1]
            o = self._orthogonal(group, got.view(tuple(p.shape)), view).reshape(-1)
        else:
            o = got
        back = torch.empty(sum(send), dtype=o.dtype, device=o.device)
        dist.all_to_all_single(back, o.contiguous(), output_split_sizes=send, input_split_sizes=recv, group=pg)
        for (p, _, u, local, _), piece in zip(jobs, back.split(send[:len(jobs)])):
            self._apply(local, piece.view(u.shape), lr, wd)


def _shard_group(p: torch.Tensor):
    """(process group, rank in it, its size) of a DTensor sharded along dim 0 over more than one rank, else None."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return None
    mesh = p.device_mesh
    dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if not dims:
        return None
    if len(dims) > 1 or p.placements[dims[0]].dim != 0:
        raise ValueError(f"DistributedMuon: unsupported placements {p.placements} (FSDP2 Shard(0) expected)")
    d = dims[0]
    if mesh.size(d) == 1:
        return None
    return mesh.get_group(d), mesh.get_local_rank(d), mesh.size(d)


# ------------------------------------------------------------------------------------------------- the layout

class Parallel:
    """One process's place in the run: the process group, the meshes, and what to do with the model on them.

    ``Parallel.init(ep=..., dp_shard=..., timeout_s=...)`` joins (or creates, at world size 1) the process group: the
    environment of ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or none.
    Backend: NCCL when CUDA is present, else gloo (``DSV4_DIST_BACKEND`` overrides). ``ep=None`` picks
    ``gcd(world, n_routed_experts)``; ``dp_shard=None`` shards the dense parameters over all ranks.
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
        self.ep = self.dp_shard = None
        self.dp_mesh = self.ep_mesh = None
        self.ep_group = self.ep_replica_group = self.shard_group = None
        self.expert_params: list[nn.Parameter] = []
        self.model: nn.Module | None = None
        # a gloo group for host-side waits (tokenizer / shard building) that may take longer than the timeout
        self._slow = dist.new_group(backend="gloo", timeout=timedelta(days=1))
        self._set_timeout(None)
        if dp_shard is not None:
            self._check_degree("dp_shard", dp_shard)
        if ep is not None:
            self._check_degree("ep", ep)

    @classmethod
    def init(cls, ep: int | None = None, dp_shard: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
             backend: str | None = None) -> "Parallel":
        """Join the process group of this launch (``torchrun``'s environment) or make a one-rank one."""
        if not dist.is_initialized():
            backend = backend or os.environ.get("DSV4_DIST_BACKEND") or \
                ("nccl" if torch.cuda.is_available() else "gloo")
            timeout = timedelta(seconds=timeout_s)
            if "nccl" in backend:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return cls(ep=ep, dp_shard=dp_shard, backend=backend, timeout_s=timeout_s)

    def _set_timeout(self, group) -> None:
        """Give ``group`` (None: the default one) this run's timeout; subgroups otherwise get PyTorch's default
        (30 min for gloo) whatever the default group has."""
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(timedelta(seconds=self.timeout_s), group)
        except (ImportError, AttributeError, ValueError, RuntimeError):  # a private API: best effort
            pass

    def _check_degree(self, name: str, value: int) -> None:
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
    def main_first(self):
        """Rank 0 runs the block first (builds files), then the others (read them)."""
        if not self.is_main:
            dist.barrier(group=self._slow)
        yield
        if self.is_main:
            dist.barrier(group=self._slow)

    # --------------------------------------------------------------------------------------------- the model
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this rank's device, apply expert parallelism and FSDP2 (in place; returns it)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if self.model is not None:
            raise RuntimeError("Parallel.parallelize: already applied to a model")
        config = model.config
        n_experts = config.n_routed_experts
        self.ep = self.requested_ep or math.gcd(self.world, n_experts)
        self._check_degree("ep", self.ep)
        if n_experts % self.ep:
            raise ValueError(f"--ep {self.ep}: {n_experts} routed experts do not split evenly over {self.ep} ranks")
        self.dp_shard = self.requested_dp_shard or self.world
        self._check_degree("dp_shard", self.dp_shard)
        kind = self.device.type
        model.to(self.device)
        if self.world // self.ep > 1:
            self.ep_mesh = init_device_mesh(kind, (self.world // self.ep, self.ep),
                                            mesh_dim_names=("ep_replicate", "ep"))
            self.ep_replica_group = self.ep_mesh.get_group("ep_replicate")
        else:
            self.ep_mesh = init_device_mesh(kind, (self.ep,), mesh_dim_names=("ep",))
        self.ep_group = self.ep_mesh.get_group("ep")
        ep_rank = self.ep_mesh.get_local_rank("ep")
        if self.world // self.dp_shard > 1:
            self.dp_mesh = init_device_mesh(kind, (self.world // self.dp_shard, self.dp_shard),
                                            mesh_dim_names=("dp_replicate", "dp_shard"))
        else:
            self.dp_mesh = init_device_mesh(kind, (self.dp_shard,), mesh_dim_names=("dp_shard",))
        self.shard_group = self.dp_mesh.get_group("dp_shard")
        for mesh in (self.ep_mesh, self.dp_mesh):
            for dim in range(mesh.ndim):
                self._set_timeout(mesh.get_group(dim))

        experts = [m for m in model.modules() if isinstance(m, Experts)]
        for m in experts:
            if self.ep > 1:
                expert_parallel(m, self.ep_group, ep_rank, self.ep)
        self.expert_params = [p for m in experts for p in (m.w1, m.w2, m.w3)]
        ignored = set(self.expert_params)
        units = list(model.layers) + list(getattr(model, "mtp", []))
        for unit in units:
            fully_shard(unit, mesh=self.dp_mesh, ignored_params=ignored)
        for block in getattr(model, "mtp", []):
            register_fsdp_forward_method(block, "predict")
        fully_shard(model, mesh=self.dp_mesh, ignored_params=ignored)
        register_fsdp_forward_method(model, "forward_train")
        # model.save_pretrained(path) of the parallel model: whole weights, written by rank 0 (collective)
        model.save_pretrained = lambda path, **kw: self.save_pretrained(model, path, **kw)
        for m in [model] + units:
            m.set_gradient_divide_factor(1.0)  # the losses are shares of the global mean: gradients add up
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM), no division after
        self.model = model
        return model

    def layout(self) -> dict:
        return {"world_size": self.world, "ep": self.ep, "dp_shard": self.dp_shard, "backend": str(self.backend)}

    # ----------------------------------------------------------------------------------------- the training step
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

    def sync_expert_grads(self) -> None:
        """Give an expert slice a zero gradient where its rank received no tokens but the layer's other slices got
        gradients (one process has zeros there, and Muon steps them), then sum the gradients of replicated slices
        over their replicas (``ep < world``)."""
        if not self.expert_params:
            return
        flags = torch.tensor([p.grad is not None for p in self.expert_params], dtype=torch.int32,
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for p, used in zip(self.expert_params, flags.tolist()):
            if used and p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.ep_replica_group is not None:
            grads = [p.grad for p in self.expert_params if p.grad is not None]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=self.ep_replica_group)
                for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(piece.view_as(g))

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient norm (as ``torch.nn.utils.clip_grad_norm_`` of one process) and the same clipping."""
        from torch.distributed.tensor import DTensor

        experts = {id(p) for p in self.expert_params}
        sharded = torch.zeros((), dtype=torch.float32, device=self.device)
        local_experts = torch.zeros((), dtype=torch.float32, device=self.device)
        replicated = torch.zeros((), dtype=torch.float32, device=self.device)
        grads = []
        for p in model.parameters():
            if p.grad is None:
                continue
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grads.append(g)
            sq = g.float().pow(2).sum()
            if isinstance(p.grad, DTensor):
                sharded += sq
            elif id(p) in experts:
                local_experts += sq
            else:
                replicated += sq
        dist.all_reduce(sharded, group=self.shard_group)
        dist.all_reduce(local_experts, group=self.ep_group)
        total = (sharded + local_experts + replicated).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def build_optimizer(self, model: nn.Module, **kwargs) -> HybridOptimizer:
        """``dsv4.train.optim.build_optimizer`` with ``DistributedMuon`` in place of ``Muon``."""
        opt = build_optimizer(model, **kwargs)
        muon = opt.muon
        hyper = {k: muon.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay", "rms_scale",
                                               "ns_steps", "ns_dtype")}
        opt.muon = DistributedMuon([dict(g) for g in muon.param_groups], **hyper)
        return opt

    # --------------------------------------------------------------------------------------------- full weights
    def _expert_placements(self):
        from torch.distributed.tensor import Replicate, Shard

        return [Replicate(), Shard(0)] if self.ep_replica_group is not None else [Shard(0)]

    def _as_global(self, t: torch.Tensor) -> torch.Tensor:
        """An expert slice as a DTensor over the EP mesh (sharing storage), for checkpoints."""
        from torch.distributed.tensor import DTensor

        shape = (t.shape[0] * self.ep,) + tuple(t.shape[1:])
        return DTensor.from_local(t, self.ep_mesh, self._expert_placements(), run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def _expert_names(self, model: nn.Module) -> set[str]:
        ids = {id(p) for p in self.expert_params}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    def _whole(self, t: torch.Tensor, expert: bool) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
        if expert and self.ep > 1:
            parts = [torch.empty_like(t) for _ in range(self.ep)]
            dist.all_gather(parts, t.contiguous(), group=self.ep_group)
            return torch.cat(parts)
        return t

    def full_state_dict(self, model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor of ``model.state_dict()`` whole, on CPU (collective; empty on other ranks with rank0_only)."""
        names = self._expert_names(model)
        out = {}
        for key, t in model.state_dict().items():
            t = self._whole(t, key in names)
            if self.is_main or not rank0_only:
                out[key] = t.detach().cpu().clone()
        return out

    def full_grads(self, model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor | None]:
        """Every parameter's gradient whole, on CPU (collective), None where it has none."""
        names = self._expert_names(model)
        out = {}
        for key, p in model.named_parameters():
            g = None if p.grad is None else self._whole(p.grad, key in names).detach().cpu().clone()
            if self.is_main or not rank0_only:
                out[key] = g
        return out

    def save_pretrained(self, model: nn.Module, path: str | Path, **kwargs) -> None:
        """HF layout (``dsv4.checkpoint.save_pretrained``) of the whole model, written by rank 0 (collective)."""
        from dsv4.checkpoint import save_pretrained

        state = self.full_state_dict(model)
        if self.is_main:
            save_pretrained(_FullModel(model.config, state), path, **kwargs)
        dist.barrier()

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _checkpoint_state(self, model: nn.Module, optimizer: HybridOptimizer, keys: set[str] | None = None
                          ) -> tuple[dict[str, torch.Tensor], list]:
        """The flat name -> tensor dict DCP reads and writes, and how to put loaded optimizer state back.

        With ``keys`` (what a checkpoint holds) the optimizer entries are fresh tensors for exactly those keys."""
        names = self._expert_names(model)
        state: dict[str, torch.Tensor] = {}
        for key, t in model.state_dict().items():
            state[f"model.{key}"] = self._as_global(t) if key in names else t
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
                                state[prefix + k] = self._as_global(v) if name in names and v.dim() else v
                        continue
                    for full in sorted(k for k in keys if k.startswith(prefix) and "." not in k[len(prefix):]):
                        k = full[len(prefix):]
                        if k == "step":
                            v = torch.zeros((), dtype=torch.float32)
                        else:
                            v = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                        state[full] = self._as_global(v) if name in names and v.dim() else v  # as saved
                        install.append((opt, p, k, v))
        state["trainer.rng"] = torch.get_rng_state()
        return state, install

    def save_checkpoint(self, root: str | Path, step: int, model: nn.Module, optimizer: HybridOptimizer,
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
        with (atomic_directory(final) if self.is_main else contextlib.nullcontext()) as tmp:
            if self.is_main:
                name[0] = tmp.name
            dist.broadcast_object_list(name, src=0, device=self.device)
            tmp = root / name[0]
            state, _ = self._checkpoint_state(model, optimizer)
            state.update({f"trainer.{k}": v for k, v in (extra or {}).items()})
            dcp.save(state, checkpoint_id=str(tmp))
            dist.barrier()  # every rank's files are written
            if self.is_main:
                (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "format": "dcp",
                                                           "layout": self.layout()}, indent=2))  # last: the marker
        # a failed write (or a lost rank) raised above: rank 0 removed the temporary directory, the old one stays
        if self.is_main:
            prune_checkpoints(root, keep, final)
        dist.barrier()
        return final

    def load_checkpoint(self, path: str | Path, model: nn.Module, optimizer: HybridOptimizer,
                        extra: dict[str, torch.Tensor] | None = None) -> dict:
        """Load a checkpoint written at any rank count (or a single-process one) into the parallel model and
        optimizer; returns its ``meta`` (with ``step``, ``skipped``, ``data``). ``extra``: tensors to fill from
        the checkpoint's ``trainer.<name>`` entries (distributed checkpoints)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from dsv4.atomic import recover_directory

        path = Path(path)
        recover_directory(path)  # on every rank: safe when several recover at once
        if not (path / "meta.json").exists():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: meta.json is missing")
        if not is_distributed_checkpoint(path):
            return self._load_single_process(path, model, optimizer)
        try:
            meta = json.loads((path / "meta.json").read_text())
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except (json.JSONDecodeError, OSError, EOFError, RuntimeError, ValueError) as e:
            raise ValueError(f"checkpoint {path} is corrupt or truncated: {e}") from None
        keys = set(saved)
        state, install = self._checkpoint_state(model, optimizer, keys)
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
            raise ValueError(f"checkpoint {path} does not match the model: mis-shaped tensor(s): "
                             + "; ".join(shapes[:10]))
        if "trainer.rng" not in keys:
            state.pop("trainer.rng")
        for k, v in (extra or {}).items():
            if f"trainer.{k}" not in keys:
                raise ValueError(f"checkpoint {path} lacks trainer.{k}")
            state[f"trainer.{k}"] = v
        try:
            dcp.load(state, checkpoint_id=str(path))
        except CheckpointException as e:  # a BaseException: no handler for errors would see it
            raise ValueError(f"checkpoint {path} could not be read: {_checkpoint_failure(e)}") from None
        for opt, p, k, v in install:
            opt.state[p][k] = v
        if "trainer.rng" in state:
            torch.set_rng_state(state["trainer.rng"])
        return meta

    def _load_single_process(self, path: Path, model: nn.Module, optimizer: HybridOptimizer) -> dict:
        """A ``dsv4.train.checkpoint`` directory (whole tensors): each rank takes its shards."""
        from dsv4.train.checkpoint import load_checkpoint

        class _Plain(nn.Module):  # receives the whole tensors under the model's names
            def __init__(self, own: dict):
                super().__init__()
                self._own = own

            def state_dict(self, *args, **kwargs):
                return self._own

        names = self._expert_names(model)
        own = {}
        targets = model.state_dict()
        for key, t in targets.items():
            shape = self._global_shape(t, key in names)
            own[key] = torch.empty(shape, dtype=t.dtype)
        trainer_state, meta = load_checkpoint(path, _Plain(own))
        with torch.no_grad():
            for key, t in targets.items():
                self._local_copy(t, own[key], key in names)
        saved = trainer_state["optimizer"]
        for opt_name, opt in (("muon", optimizer.muon), ("adamw", optimizer.adamw)):
            sd = saved[opt_name]
            ours = [p for g in opt.param_groups for p in g["params"]]
            index = [i for g in sd["param_groups"] for i in g["params"]]
            if len(index) != len(ours):
                raise ValueError(f"checkpoint {path}: its {opt_name} state covers {len(index)} parameters, "
                                 f"this model has {len(ours)}")
            param_names = {id(p): n for n, p in model.named_parameters()}
            for i, p in zip(index, ours):
                if i not in sd["state"]:
                    continue
                entry = {}
                for k, v in sd["state"][i].items():
                    if torch.is_tensor(v) and v.dim():
                        target = torch.zeros_like(p, dtype=v.dtype, memory_format=torch.preserve_format)
                        self._local_copy(target, v, param_names[id(p)] in names)
                        v = target
                    entry[k] = v
                opt.state[p] = entry
        torch.set_rng_state(trainer_state["rng"])
        meta.update(step=int(trainer_state["step"]), skipped=int(trainer_state["skipped"]),
                    data=trainer_state["data"])
        if "anticipatory" in trainer_state:
            meta["anticipatory_state"] = trainer_state["anticipatory"]
        return meta

    def _global_shape(self, t: torch.Tensor, expert: bool) -> tuple[int, ...]:
        if expert:
            return (t.shape[0] * self.ep,) + tuple(t.shape[1:])
        return tuple(t.shape)  # a DTensor's shape is the global one

    def _local_copy(self, target: torch.Tensor, full: torch.Tensor, expert: bool) -> None:
        """Copy this rank's part of the whole tensor ``full`` into ``target`` (DTensor, expert slice or plain)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        full = full.detach()
        if isinstance(target, DTensor):
            piece = distribute_tensor(full.to(target.device), target.device_mesh, target.placements,
                                      src_data_rank=None).to_local()
            target.to_local().copy_(piece)
        elif expert:
            n = target.shape[0]
            rank = self.ep_mesh.get_local_rank("ep")
            target.copy_(full[rank * n:(rank + 1) * n])
        else:
            target.copy_(full)


def _checkpoint_failure(e) -> str:
    """The first rank's error of a DCP ``CheckpointException``, on one line (its str is a traceback per rank)."""
    for rank, (exc, _) in sorted(e.failures.items()):
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first} (rank {rank})"
    return str(e).strip().splitlines()[0]


class _FullModel:
    """What ``dsv4.checkpoint.save_pretrained`` reads of a model (``config``, ``state_dict()``), from whole tensors."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ".metadata").exists()


# ------------------------------------------------------------------------------------------------ the trainer

class DistributedTrainer(Trainer):
    """``dsv4.train.loop.Trainer`` on a parallel model (``Parallel.parallelize``): each rank trains on its slice of
    the global batch; losses, gradient norm, optimizer, checkpoints and metrics are the global ones. Rank 0 writes
    the metrics and the log; ``run(tokens_per_step)`` takes the tokens of one rank's batch."""

    def __init__(self, parallel: Parallel, model: nn.Module, data, cfg, out: str | Path,
                 val_batches: Iterable = (), log=None):
        if parallel.model is not model:
            raise ValueError("DistributedTrainer: pass the model returned by parallel.parallelize(model)")
        self.parallel = parallel
        self._indexer_kl = None
        self._saving = False
        super().__init__(model, data, cfg, out, val_batches=[b.to(parallel.device) for b in val_batches], log=log)
        if not parallel.is_main:
            self.metrics_path = Path(os.devnull)
        if getattr(self, "anticipatory", None) is not None:
            self.anticipatory.__class__ = _whole_snapshots(type(self.anticipatory))

    @property
    def log(self):
        return self._log

    @log.setter
    def log(self, fn) -> None:  # only rank 0 logs
        self._log = fn if fn is not None and self.parallel.is_main else (lambda record: None)

    # hooks of Trainer.train_step
    def make_optimizer(self) -> HybridOptimizer:
        return self.parallel.build_optimizer(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def losses(self, batch):
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

    def train_step(self):
        r = super().train_step()
        if self._indexer_kl is not None:  # the logged KL: all ranks' (the recall stays this rank's)
            r.indexer_kl = float(self._indexer_kl)
        return r

    # checkpoints
    def save(self) -> Path:
        self._saving = True  # stays set if the save fails: run() names it
        path = self._save()
        self._saving = False
        return path

    def _save(self) -> Path:
        meta = {**self.checkpoint_meta(), "skipped": self.skipped, "data": self.data.state_dict()}
        extra = {}
        anticipatory = getattr(self, "anticipatory", None)
        if anticipatory is not None:  # scalars in meta.json, the router snapshots as tensors
            st = anticipatory.state_dict()
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
        anticipatory = getattr(self, "anticipatory", None)
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

    def run(self, tokens_per_step: int, progress: bool = True) -> dict:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            return super().run(tokens_per_step * self.parallel.world, progress=progress and self.parallel.is_main)
        except (RuntimeError, dist.DistError, CheckpointException) as e:  # CheckpointException: a failed dcp.save
            if isinstance(e, DistributedError):
                raise
            from dsv4.train.checkpoint import list_checkpoints

            done = list_checkpoints(self.out / "checkpoints")
            last = str(done[-1]) if done else "none"
            where = (f"while writing the checkpoint of step {self.step}" if self._saving
                     else f"in step {self.step + 1}")
            if isinstance(e, CheckpointException):
                first = _checkpoint_failure(e)
            else:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            lost = isinstance(e, dist.DistError) or any(w in first.lower() for w in (
                "connection", "peer", "timeout", "timed out", "nccl", "gloo", "socket"))
            msg = (f"rank {self.parallel.rank}/{self.parallel.world}: training stopped {where}: "
                   f"{type(e).__name__}: {first}. "
                   + ("Another rank has probably died or hung (or the network failed). " if lost else "")
                   + f"Last complete checkpoint: {last}; continue with --resume.")
            print(f"\ndsv4 train: error: {msg}", file=sys.stderr, flush=True)
            raise DistributedError(msg) from e


def _whole_snapshots(cls: type) -> type:
    """``AnticipatoryRouting`` whose router snapshots are whole tensors (an FSDP2 router weight is a shard)."""

    class WholeSnapshots(cls):
        def before_step(self) -> None:
            from torch.distributed.tensor import DTensor

            super().before_step()
            last = self.snapshots[-1]
            self.snapshots[-1] = [(w.full_tensor() if isinstance(w, DTensor) else w, b) for w, b in last]
            old = self.snapshots[0] if self.active else None
            for i, router in enumerate(self.routers):
                router.routing_params = old[i] if old is not None else None

    WholeSnapshots.__name__ = WholeSnapshots.__qualname__ = f"Whole{cls.__name__}"
    return WholeSnapshots


# ------------------------------------------------------------------------------------------------------ the CLI

def add_arguments(p) -> None:
    """The flags of ``dsv4 train`` for several processes (they apply under ``torchrun``)."""
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel degree: ranks the routed experts of each layer are spread over "
                        "(divides the world size and the expert count; default gcd(world, experts))")
    p.add_argument("--dp-shard", type=int, default=None,
                   help="FSDP2 shard degree of the dense parameters (divides the world size; default: all ranks; "
                        "smaller = HSDP with world/dp-shard replicas)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait for the other ranks before the run fails")


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main() -> bool:
    """Rank 0, or a process without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def main_only(say):
    """``say`` on rank 0, a no-op elsewhere."""
    return say if is_main() else (lambda *a, **k: None)


def main_first(par: Parallel | None):
    """Rank 0 runs the block first, then the others (``contextlib.nullcontext`` without ``par``)."""
    return par.main_first() if par is not None else contextlib.nullcontext()


def make_trainer(par: Parallel | None, model: nn.Module, data, cfg, out, val_batches=(), log=None):
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


def to_device(par: Parallel | None, batches: list, token_bytes: torch.Tensor | None = None):
    """Batches (and a token-bytes table) on this rank's device: what ``evaluate`` needs for the parallel model."""
    if par is None:
        return batches, token_bytes
    return ([b.to(par.device) for b in batches],
            token_bytes.to(par.device) if token_bytes is not None else None)


class NullWriter:
    """Stands in for a log writer on ranks other than 0."""

    def scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def finish() -> bool:
    """End the process group (if any); True on rank 0 (the one that reports)."""
    main = is_main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return main


def from_args(args) -> Parallel | None:
    """The ``Parallel`` of a ``dsv4 train`` run: under ``torchrun`` (any world size), or when ``--resume`` finds a
    distributed checkpoint (then at one rank); ``None`` for a plain single-process run."""
    ep, dp_shard = getattr(args, "ep", None), getattr(args, "dp_shard", None)
    if not _launched():
        if (ep or 1) > 1 or (dp_shard or 1) > 1:
            raise ValueError("--ep / --dp-shard above 1 need several processes: launch with torchrun "
                             "(see docs/distributed.md)")
        from dsv4.train.checkpoint import list_checkpoints

        found = list_checkpoints(Path(args.out) / "checkpoints") if getattr(args, "resume", False) else []
        if not (found and is_distributed_checkpoint(found[-1])):
            return None
    return Parallel.init(ep=ep, dp_shard=dp_shard, timeout_s=getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S))
