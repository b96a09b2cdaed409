"""FSDP2 of the dense parameters, and the global gradient norm over their shards and the expert slices.

``apply_fsdp(model, mesh, ignored_params)`` shards every parameter but the expert slices with ``fully_shard`` over the
``dp_shard`` dimension of ``mesh``: one unit per block, per MTP block and the root; a ``dp_replicate`` dimension
(``world / dp_shard`` replicas) makes it HSDP. Gradients are *summed* (divide factor 1, plain SUM reductions, which
gloo has), because the trainer's losses on each rank are that rank's share of the global-batch mean
(``lm_losses(..., total=...)``). ``clip_grad_norm_`` is ``torch.nn.utils.clip_grad_norm_`` of one process over such a
model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["apply_fsdp", "clip_grad_norm_"]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, ignored_params: set[nn.Parameter] | None = None) -> nn.Module:
    """``fully_shard`` each block, each MTP block and then the root of ``model`` over ``mesh`` (in place; returns
    it). ``ignored_params`` (the expert slices) stay as they are. ``model.forward_train`` and the MTP blocks'
    ``predict`` are registered as FSDP forward methods, so that they gather the parameters as ``forward`` does."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    ignored = set(ignored_params or ())
    mtp = list(getattr(model, "mtp", []))
    units = list(model.layers) + mtp
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    for block in mtp:
        register_fsdp_forward_method(block, "predict")
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    register_fsdp_forward_method(model, "forward_train")
    for m in [model] + units:
        m.set_gradient_divide_factor(1.0)  # the losses are shares of the global mean: gradients add up
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM), no division after
    return model


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, expert_params: list[nn.Parameter], dp_mesh: DeviceMesh,
                    ep_mesh: DeviceMesh, device: torch.device) -> torch.Tensor:
    """The global gradient norm (as ``torch.nn.utils.clip_grad_norm_`` of one process computes it on the whole
    model) and the same clipping: squared norms of the FSDP shards summed over ``dp_shard``, of the expert slices
    over ``ep``; replicated parameters (and ``dp_replicate`` / ``ep_replicate`` copies) count once."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for p in expert_params}
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    local_experts = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
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
    dist.all_reduce(sharded, group=dp_mesh.get_group("dp_shard"))
    dist.all_reduce(local_experts, group=ep_mesh.get_group("ep"))
    total = (sharded + local_experts + replicated).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
