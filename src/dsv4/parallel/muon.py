"""Distributed Muon: ``DistributedMuon`` (Muon over FSDP2 shards and expert slices, equal to ``Muon`` in one process)
and ``build_optimizer``, the V4 optimizer pair of a parallel model.

Momentum and the Nesterov direction are elementwise and stay sharded; each sharded matrix is then gathered whole onto
one owner rank (round robin over the shard group, one all-to-all per round of ``dp_shard`` matrices), orthogonalized
there exactly as in one process, and its rows sent back (a second all-to-all). Expert slices are whole matrices
already and are orthogonalized where they live. AdamW works on the DTensor shards as it is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv4.train.optim import HybridOptimizer, Muon, build_optimizer as build_local_optimizer, closure_loss

__all__ = ["DistributedMuon", "build_optimizer"]


def _chunk_rows(n: int, parts: int) -> list[int]:
    """Rows per part when ``n`` rows are split as DTensor / FSDP2 ``Shard(0)`` split them (``torch.chunk``)."""
    size = -(-n // parts) if n else 0
    return [max(0, min(size, n - i * size)) for i in range(parts)]


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


def build_optimizer(model: nn.Module, **kwargs) -> HybridOptimizer:
    """``dsv4.train.optim.build_optimizer`` of the parallel ``model`` (same groups, views and hyper-parameters, the
    same keyword arguments) with a ``DistributedMuon`` for the matrices."""
    local = build_local_optimizer(model, **kwargs)
    muon = local.muon
    hyper = {k: muon.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay", "rms_scale", "ns_steps",
                                           "ns_dtype")}
    return HybridOptimizer(DistributedMuon([dict(g) for g in muon.param_groups], **hyper), local.adamw)
