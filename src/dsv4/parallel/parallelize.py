"""``parallelize(model, par)``: the parallelisms of a run applied to a ``dsv4.model.Transformer``, in order.

The model knows nothing of them; each is one ``apply_*`` function of the module that owns it: the meshes
(``Parallel.build_meshes``), the move to this rank's device, expert parallelism on the routed experts
(``dsv4.parallel.expert.apply_expert_parallel``), then FSDP2 on every other parameter
(``dsv4.parallel.fsdp.apply_fsdp``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from dsv4.parallel.expert import apply_expert_parallel
from dsv4.parallel.fsdp import apply_fsdp

if TYPE_CHECKING:
    from dsv4.parallel.mesh import Parallel

__all__ = ["parallelize"]


def parallelize(model: nn.Module, par: Parallel) -> nn.Module:
    """Move ``model`` to ``par``'s device, apply expert parallelism and FSDP2 (in place; returns it). ``par``
    records the meshes, the expert slices and the model (a ``Parallel`` parallelizes one model)."""
    if par.model is not None:
        raise RuntimeError("Parallel.parallelize: already applied to a model")
    par.build_meshes(model.config.n_routed_experts)
    model.to(par.device)
    par.expert_params = apply_expert_parallel(model, par.ep_mesh)
    apply_fsdp(model, par.dp_mesh, ignored_params=set(par.expert_params))
    par.model = model
    return model
