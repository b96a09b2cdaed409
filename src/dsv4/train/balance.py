"""Expert balancing of DeepSeek-V4 (spec 4): the aux-loss-free bias update, the sequence-wise balance loss, and the
expert-load statistics that show whether they work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv4.model.moe import RouterOutput


def expert_loads(route: RouterOutput, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert in this batch [E] (float32)."""
    return torch.bincount(route.indices.reshape(-1), minlength=n_experts).float()


def sequence_balance_loss(route: RouterOutput, batch: int, alpha: float = 1e-4) -> torch.Tensor:
    """L = alpha * sum_i f_i P_i per sequence, averaged over the batch's sequences (spec 4, V3 form).

    f_i = E / (k T) * #{t : i in K_t},  P_i = (1/T) sum_t s_{i,t} / sum_j s_{j,t}; T tokens of one sequence.
    """
    n_tok, k = route.indices.shape
    e = route.scores.shape[-1]
    t = n_tok // batch
    chosen = torch.zeros(batch, t, e, device=route.scores.device)
    chosen.scatter_(-1, route.indices.view(batch, t, k), 1.0)
    f = chosen.sum(1) * (e / (k * t))  # [B, E], no gradient (counts)
    probs = route.scores.view(batch, t, e)
    p = (probs / probs.sum(-1, keepdim=True)).mean(1)  # [B, E]
    return alpha * (f * p).sum(-1).mean()


@torch.no_grad()
def update_router_bias(routers: list, loads: list[torch.Tensor], speed: float = 1e-3) -> None:
    """b_i <- b_i + speed * sign(mean load - load_i) for every learned-routing layer (aux-loss-free balancing).

    Loads are summed over all ranks first when torch.distributed is running: the rule uses the global batch.
    """
    for router, load in zip(routers, loads):
        if dist.is_available() and dist.is_initialized():
            load = load.clone()
            dist.all_reduce(load)
        router.bias.add_(speed * torch.sign(load.mean() - load).to(router.bias.dtype))


def load_imbalance(load: torch.Tensor) -> float:
    """Busiest expert's load over the mean load (1.0 = perfectly balanced)."""
    mean = load.float().mean()
    return float(load.max() / mean) if mean > 0 else 0.0
