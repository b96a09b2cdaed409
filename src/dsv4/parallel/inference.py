"""Expert parallelism for inference: ``torchrun --nproc_per_node N -m dsv4 generate ...`` spreads each layer's routed
experts over the N ranks, for a model whose experts do not fit in one process's (or one machine's) memory.

Every rank computes the same tokens: the embedding, attention, the shared experts, the routers and the head are
replicated (each rank maps them), and each rank holds only its slice ``[r E / N, (r + 1) E / N)`` of every layer's
routed experts: for an official-layout checkpoint kept packed (``dsv4.weights.packed.load_packed(experts=(r, N))``)
it maps only those experts' tensors, so that its resident expert bytes are at most its share; a materialized model
(HF layout, or ``dtype=``) is loaded whole and then keeps only its slice (``split_experts``).

The exchange is training's (``dsv4.parallel.expert.ExpertParallel``: the (token, expert) rows go to the rank holding
the expert by ``all_to_all``, and the expert outputs come back the same way, summed per token in the order one
process sums them), applied to a share of the rows: as every rank holds every token, rank r dispatches only its
contiguous share of the rows (``token_shares``), so that each (token, expert) product is computed once, on the
expert's rank; an ``all_gather`` of the shares then gives every rank the whole output, the same bytes on each. The
output of a layer equals one process's up to nothing (the same products, summed in the same order).

``share_logits`` makes rank 0's logits everyone's (a broadcast after each forward), so that sampling, stop tokens
and the cache's length agree on every rank even where two kinds of CPU round the replicated attention differently.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv4.model.moe import Experts
from dsv4.parallel.expert import ExpertParallel
from dsv4.weights.packed import expert_slice

__all__ = ["Ranks", "ReplicatedTokensExpertParallel", "expert_ranks", "from_pretrained", "share_logits",
           "split_experts", "token_shares"]


def token_shares(n: int, size: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of ``n`` that each of ``size`` ranks dispatches: contiguous, the first ``n % size`` one longer."""
    base, extra = divmod(n, size)
    out, lo = [], 0
    for r in range(size):
        hi = lo + base + (r < extra)
        out.append((lo, hi))
        lo = hi
    return out


class ReplicatedTokensExpertParallel(ExpertParallel):
    """``ExpertParallel`` for ranks that all hold the same rows: ``dispatch`` sends only this rank's share of them
    (``token_shares``), ``combine`` gathers every rank's combined share so that each rank gets every row."""

    def __init__(self, group, rank: int, size: int, n_experts: int):
        super().__init__(group, rank, size, n_experts)
        self._rows: list[int] = []

    def dispatch(self, module: Experts, args: tuple) -> tuple:
        x, weights, indices = args
        lo, hi = token_shares(x.shape[0], self.size)[self.rank]
        self._rows.append(x.shape[0])
        return super().dispatch(module, (x[lo:hi], weights[lo:hi], indices[lo:hi]))

    def combine(self, module: Experts, args: tuple, out_recv: torch.Tensor) -> torch.Tensor:
        part = super().combine(module, args, out_recv)
        shares = token_shares(self._rows.pop(), self.size)
        longest = max(hi - lo for lo, hi in shares)
        padded = part.new_zeros((longest,) + tuple(part.shape[1:]))
        padded[:part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:hi - lo] for p, (lo, hi) in zip(parts, shares)])


# the exchange of every Experts module split by split_experts (weak: it goes with the module)
_SPLIT: weakref.WeakKeyDictionary[Experts, ReplicatedTokensExpertParallel] = weakref.WeakKeyDictionary()


def split_experts(model: nn.Module, rank: int, size: int, group=None) -> nn.Module:
    """Make every ``Experts`` module of ``model`` (in place) hold only rank ``rank``'s slice of its routed experts
    (of ``size`` ranks; ``expert_slice``) and exchange rows with the other ranks of ``group`` (default: all) in each
    forward. A materialized module's stacked weights are cut to the slice (the rest freed); a packed one must have
    been loaded with that slice (``load_packed(experts=(rank, size))``). Returns ``model``."""
    from dsv4.model.packed import PackedExperts

    n = model.config.n_routed_experts
    lo, hi = expert_slice(n, (rank, size))
    for name, m in model.named_modules():
        if not isinstance(m, Experts):
            continue
        if m in _SPLIT:
            raise ValueError(f"split_experts: {name} is already split over ranks")
        if isinstance(m, PackedExperts):
            if (m.first, m.first + m.num_experts) != (lo, hi):
                raise ValueError(f"split_experts: {name} holds experts [{m.first}, {m.first + m.num_experts}), rank "
                                 f"{rank} of {size} needs [{lo}, {hi}): load it with load_packed(experts=(rank, "
                                 "size))")
        else:
            if m.num_experts != n:
                raise ValueError(f"split_experts: {name} holds {m.num_experts} experts, the config {n}")
            for w in ("w1", "w2", "w3"):
                full = getattr(m, w)
                m.register_parameter(w, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=False))
        ep = ReplicatedTokensExpertParallel(group, rank, size, n)
        m.register_forward_pre_hook(ep.dispatch)
        m.register_forward_hook(ep.combine)
        _SPLIT[m] = ep
    return model


def share_logits(model: nn.Module, group=None) -> nn.Module:
    """After each ``model(...)`` call, every rank's logits are rank 0's (a broadcast of [B, S, vocab]; ``generate``
    asks for the last position only). Returns ``model``."""
    src = dist.get_global_rank(group, 0) if group is not None else 0

    def hook(module, args, out):
        dist.broadcast(out, src=src, group=group)
        return out

    model.register_forward_hook(hook)
    return model


def from_pretrained(path: str | Path, rank: int, size: int, group=None, dtype: torch.dtype | None = None,
                    numerics: str | None = None, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """``dsv4.from_pretrained`` for rank ``rank`` of ``size`` processes that share the routed experts (``group``:
    the process group of those ranks, default all). An official-layout checkpoint kept packed (``dtype`` None) maps
    only this rank's experts and computes in ``compute_dtype``; any other loads whole, then keeps only its slice.
    The ranks must run the model together: each forward exchanges rows with the others. A ``size`` that does not
    divide the routed experts is refused before anything is read."""
    from dsv4.weights import from_pretrained as load

    model = load(path, dtype=dtype, numerics=numerics, compute_dtype=compute_dtype, experts=(rank, size))
    return split_experts(model, rank, size, group)


@dataclass
class Ranks:
    """This process's place among the ranks of an expert-parallel launch (``expert_ranks``)."""

    rank: int
    size: int
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def from_pretrained(self, path: str | Path, **kwargs) -> nn.Module:
        """``from_pretrained`` for this rank, its logits shared from rank 0 (``share_logits``)."""
        return share_logits(from_pretrained(path, self.rank, self.size, self.group, **kwargs), self.group)


@contextmanager
def expert_ranks(timeout_s: float | None = None) -> Iterator[Ranks | None]:
    """Under ``torchrun`` (its environment), the process group of the launch (joined here with gloo unless
    ``DSV4_DIST_BACKEND`` says otherwise, and ended on leaving if joined here) as ``Ranks``; None in a plain
    process."""
    from dsv4.parallel.mesh import DEFAULT_TIMEOUT_S, launched

    if not launched():
        yield None
        return
    joined = not dist.is_initialized()
    if joined:
        from datetime import timedelta

        backend = os.environ.get("DSV4_DIST_BACKEND") or "gloo"  # packed weights compute on the CPU
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S))
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
