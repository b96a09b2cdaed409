"""Expert parallelism: the routed experts of every MoE layer spread over the ``ep`` ranks of the EP mesh.

``apply_expert_parallel(model, mesh)`` gives each ``dsv4.model.moe.Experts`` module the slice of ``E / ep`` experts
its rank holds (the same module, so FP4 QAT and ``expert_weights()`` still apply; the parameters keep their names
``ffn.experts.w1`` etc., now ``[E / ep, I, d]``) and installs an ``ExpertParallel`` on it through PyTorch's public
module-hook API, as torchtitan's ``ExpertParallel`` style does: its forward pre-hook ``dispatch`` sends every
(token, expert) pair to the rank holding the expert (all-to-all of the rows and their gate values), the module runs
its local experts on what it received, and its forward hook ``combine`` brings the expert outputs back (all-to-all)
and sums them per token, in the order the local layer sums them. Both exchanges are autograd functions whose
backward is the reverse exchange. With ``ep < world`` the slices are replicated over the ``ep_replicate`` mesh
dimension; ``sync_expert_grads`` sums their gradients over the replicas.

This module also owns the views of an expert slice as part of the whole ``[E, ...]`` tensor that checkpoints and
exports need: ``as_expert_dtensor`` (a DTensor sharded along E), ``gather_experts`` and ``local_experts``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from dsv4.model.moe import Experts

__all__ = ["ExpertParallel", "all_to_all_rows", "apply_expert_parallel", "as_expert_dtensor", "expert_global_shape",
           "expert_names", "expert_parallel", "gather_experts", "local_experts", "sync_expert_grads"]


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


@dataclass
class _Exchange:
    """What ``combine`` needs of the ``dispatch`` of the same call: the input, where its rows went, what came."""

    x: torch.Tensor
    token: torch.Tensor
    send: list[int]
    recv: list[int]
    x_recv: torch.Tensor
    g_recv: torch.Tensor


class ExpertParallel:
    """The token exchange of one expert-parallel ``Experts`` module holding experts
    ``[rank * E / size, (rank + 1) * E / size)`` of ``n_experts``: ``dispatch`` is its forward pre-hook, ``combine``
    its forward hook. Calls in flight (dispatched, not yet combined) are kept as a stack."""

    def __init__(self, group, rank: int, size: int, n_experts: int):
        self.group, self.rank, self.size, self.n_experts = group, rank, size, n_experts
        self.local = n_experts // size
        self._pending: list[_Exchange] = []

    def dispatch(self, module: Experts, args: tuple) -> tuple:
        """Send each (token, expert) row, with its gate value, to the rank holding the expert; the module then sees
        the rows it received, each with its gate value and its local expert index."""
        x, weights, indices = args
        n, k = indices.shape
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # by global expert id, so grouped by destination rank
        counts = torch.bincount(flat, minlength=self.n_experts)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [source rank, local expert]
        send = counts.view(self.size, self.local).sum(1).tolist()
        recv_counts = recv_counts.view(self.size, self.local)
        recv = recv_counts.sum(1).tolist()
        token = order // k
        x_recv = all_to_all_rows(x[token], send, recv, self.group)
        g_recv = all_to_all_rows(weights.reshape(-1)[order].unsqueeze(1), send, recv, self.group)
        local_idx = torch.repeat_interleave(torch.arange(self.local, device=flat.device).repeat(self.size),
                                            recv_counts.reshape(-1))
        self._pending.append(_Exchange(x, token, send, recv, x_recv, g_recv))
        return x_recv, g_recv, local_idx.unsqueeze(1)

    def combine(self, module: Experts, args: tuple, out_recv: torch.Tensor) -> torch.Tensor:
        """Bring each row's expert output back and sum them per token (in the local layer's order)."""
        ex = self._pending.pop()
        if out_recv.shape[0] == 0:
            # keep both exchanges in the graph on a rank that received nothing, so that every rank runs their backward
            out_recv = out_recv + 0.0 * (ex.x_recv.sum() + ex.g_recv.sum()).to(out_recv.dtype)
        back = all_to_all_rows(out_recv, ex.recv, ex.send, self.group)
        out = torch.zeros_like(ex.x)
        return out.index_add_(0, ex.token, back.to(ex.x.dtype))


# the ExpertParallel of every expert-parallel Experts module (weak: it goes with the module)
_INSTALLED: weakref.WeakKeyDictionary[Experts, ExpertParallel] = weakref.WeakKeyDictionary()


def expert_parallel(experts: Experts, group, rank: int, size: int) -> Experts:
    """Make ``experts`` hold experts ``[rank * E / size, (rank + 1) * E / size)`` and exchange tokens with the other
    ranks of ``group`` (see the module docstring). The module keeps its class and its parameter names; returns it."""
    if experts in _INSTALLED:
        raise ValueError("expert_parallel: this Experts module is already expert-parallel")
    n = experts.w1.shape[0]
    if n % size:
        raise ValueError(f"expert parallelism: {n} routed experts do not split over ep={size} ranks")
    lo, hi = rank * (n // size), (rank + 1) * (n // size)
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        experts.register_parameter(name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
    ep = ExpertParallel(group, rank, size, n)
    experts.register_forward_pre_hook(ep.dispatch)
    experts.register_forward_hook(ep.combine)
    _INSTALLED[experts] = ep
    return experts


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Expert parallelism over the ``ep`` dimension of ``mesh`` for every ``Experts`` module of ``model`` (nothing
    to install at ``ep`` 1); returns the expert parameters (slices), which FSDP leaves alone."""
    size = _ep_size(mesh)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if size > 1:
        for m in experts:
            expert_parallel(m, mesh.get_group("ep"), mesh.get_local_rank("ep"), size)
    return [p for m in experts for p in (m.w1, m.w2, m.w3)]


def sync_expert_grads(params: list[nn.Parameter], mesh: DeviceMesh, device: torch.device) -> None:
    """Give an expert slice a zero gradient where its rank received no tokens but the layer's other slices got
    gradients (one process has zeros there, and Muon steps them), then sum the gradients of replicated slices
    over the ``ep_replicate`` dimension of ``mesh`` (``ep < world``)."""
    if not params:
        return
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    for p, used in zip(params, flags.tolist()):
        if used and p.grad is None:
            p.grad = torch.zeros_like(p)
    if "ep_replicate" in (mesh.mesh_dim_names or ()):
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=mesh.get_group("ep_replicate"))
            for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(piece.view_as(g))


# -------------------------------------------------------------------- expert slices as parts of whole tensors

def expert_names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    """The names in ``model`` of the expert parameters ``params``."""
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _ep_size(mesh: DeviceMesh) -> int:
    return mesh.size(mesh.mesh_dim_names.index("ep"))


def expert_global_shape(t: torch.Tensor, mesh: DeviceMesh) -> tuple[int, ...]:
    """The shape ``[E, ...]`` of the whole tensor whose slice on this rank is ``t``."""
    return (t.shape[0] * _ep_size(mesh),) + tuple(t.shape[1:])


def as_expert_dtensor(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """An expert slice (or a tensor of its shape) as a DTensor ``[E, ...]`` sharded along E over the ``ep``
    dimension of ``mesh`` and replicated over ``ep_replicate``, sharing storage: what checkpoints store."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Replicate(), Shard(0)] if mesh.ndim == 2 else [Shard(0)]
    shape = expert_global_shape(t, mesh)
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def gather_experts(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The whole ``[E, ...]`` tensor of this rank's expert slice ``t`` (collective over the ``ep`` dimension)."""
    size = _ep_size(mesh)
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=mesh.get_group("ep"))
    return torch.cat(parts)


def local_experts(full: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's slice of the whole ``[E, ...]`` tensor ``full``."""
    n = full.shape[0] // _ep_size(mesh)
    rank = mesh.get_local_rank("ep")
    return full[rank * n:(rank + 1) * n]
