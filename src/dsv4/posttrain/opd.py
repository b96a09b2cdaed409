"""On-policy distillation (spec 7), which merges the domain specialists into one model in V4's post-training:

    L_OPD(theta) = sum_i w_i KL(pi_theta || pi_E_i)

a reverse KL, on trajectories sampled from the student, computed over the full vocabulary at every completion
token (not estimated from the sampled token). Each prompt is distilled from the teacher of its domain; w_i weighs
teacher i. The student's samples are not differentiated: the gradient is that of the exact KL at the states the
student visits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv4.posttrain.rollout import Rollout, masked_mean, rollout_logits


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(student) || softmax(teacher)) over the last (vocabulary) axis, in float32: [..., V] -> [...]."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def opd_loss(student, teachers: Sequence, rollout: Rollout, teacher_of: torch.Tensor,
             weights: Sequence[float] | None = None) -> tuple[torch.Tensor, list[float]]:
    """sum_i w_i * (mean reverse KL over the completion tokens of the rows whose teacher is i).

    ``teacher_of`` [N]: the teacher index of each row of ``rollout``; ``weights``: one per teacher (default 1).
    Teachers run without autograd. Returns the loss and each teacher's mean KL (nan for a teacher without rows).
    """
    weights = [1.0] * len(teachers) if weights is None else list(weights)
    if len(weights) != len(teachers):
        raise ValueError(f"{len(teachers)} teachers but {len(weights)} weights")
    valid = (teacher_of >= 0) & (teacher_of < len(teachers))
    if teacher_of.shape != rollout.tokens.shape[:1] or not bool(valid.all()):
        raise ValueError(f"teacher_of must give each of the {rollout.tokens.shape[0]} rows a teacher index in "
                         f"[0, {len(teachers)})")
    logits = rollout_logits(student, rollout)
    loss = logits.new_zeros(())
    per_teacher = []
    for i, (teacher, w) in enumerate(zip(teachers, weights)):
        rows = (teacher_of == i).nonzero().squeeze(1)
        if rows.numel() == 0:
            per_teacher.append(float("nan"))
            continue
        with torch.no_grad():
            target = rollout_logits(teacher, rollout.rows(rows))
        kl = masked_mean(reverse_kl(logits[rows], target), rollout.mask[rows])
        loss = loss + w * kl
        per_teacher.append(float(kl.detach()))
    return loss, per_teacher
