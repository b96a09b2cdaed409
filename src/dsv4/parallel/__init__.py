"""Training across processes, torchtitan style: the model knows nothing of it; small ``apply_*`` functions apply
each parallelism from outside (docs/distributed.md has the command lines).

- ``mesh``: ``Parallel``, the process group and the device meshes of a run (from ``torchrun``'s environment), their
  timeouts, and the process-level helpers (rank 0, world size, rank 0 first, the end of the process group);
- ``parallelize``: ``parallelize(model, par)``, the ``apply_*`` functions below in order;
- ``expert``: ``apply_expert_parallel``, the routed experts sharded over the ``ep`` ranks, tokens exchanged with
  all-to-all by an ``ExpertParallel`` installed as the experts' forward pre-hook and hook;
- ``fsdp``: ``apply_fsdp``, FSDP2 / HSDP of every other parameter, and the global gradient norm;
- ``muon``: ``DistributedMuon``, whole-matrix orthogonalization of sharded matrices, and the optimizer pair;
- ``checkpoint``: distributed checkpoints (DCP, written atomically), whole weights and the HF export;
- ``trainer``: ``DistributedTrainer``, the training loop's hooks on the parallel model, and the error of a lost rank;
- ``launch``: what ``dsv4 train`` calls, in one process and under ``torchrun``.
"""

from __future__ import annotations

from dsv4.parallel.expert import ExpertParallel, apply_expert_parallel, expert_parallel
from dsv4.parallel.fsdp import apply_fsdp
from dsv4.parallel.mesh import DistributedError, Parallel
from dsv4.parallel.muon import DistributedMuon
from dsv4.parallel.parallelize import parallelize
from dsv4.parallel.trainer import DistributedTrainer

__all__ = ["DistributedError", "DistributedMuon", "DistributedTrainer", "ExpertParallel", "Parallel",
           "apply_expert_parallel", "apply_fsdp", "expert_parallel", "parallelize"]
