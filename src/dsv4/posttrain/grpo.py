"""GRPO with verifiable rewards (spec 7: each specialist's RL stage; hyper-parameters as V3.2 / R1, which the
report does not restate): a group of completions per prompt, each completion's advantage its reward standardized
within its group, a clipped policy-ratio objective per token, and a KL penalty to a frozen reference model
(the k3 estimator, DeepSeekMath's form)."""

from __future__ import annotations

import torch

from dsv4.posttrain.rollout import Rollout, masked_mean, rollout_logits


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N] with N = prompts * group (rows of one prompt adjacent) -> (r - group mean) / (group std + eps).
    A group whose rewards are all equal gets advantage 0: it carries no signal."""
    if rewards.dim() != 1 or rewards.numel() % group:
        raise ValueError(f"rewards must be [prompts * {group}], got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def token_logprobs(model, rollout: Rollout) -> torch.Tensor:
    """log pi(token) [N, L] of each completion token under ``model``."""
    logits = rollout_logits(model, rollout)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1)


def grpo_loss(policy, rollout: Rollout, advantages: torch.Tensor, old_logprobs: torch.Tensor | None = None,
              ref_logprobs: torch.Tensor | None = None, clip: float = 0.2, kl_coef: float = 0.04
              ) -> tuple[torch.Tensor, dict]:
    """The negated GRPO objective: per token min(ratio A, clip(ratio, 1 - clip, 1 + clip) A) with
    ratio = pi / pi_old, minus ``kl_coef`` times the k3 estimate of KL(pi || pi_ref); averaged over each
    completion's tokens, then over completions. ``old_logprobs`` [N, L]: the sampling policy's, or None when that
    is the policy itself (the first step after sampling: ratio 1, one forward fewer); ``ref_logprobs`` [N, L] or
    None (no KL term)."""
    logp = token_logprobs(policy, rollout)
    ratio = torch.exp(logp - (logp.detach() if old_logprobs is None else old_logprobs))
    a = advantages.view(-1, 1)
    per_token = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = None
    if ref_logprobs is not None:
        d = ref_logprobs - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, >= 0
        per_token = per_token - kl_coef * kl
    per_row = (per_token * rollout.mask).sum(1) / rollout.mask.sum(1).clamp_min(1.0)
    stats = {"clipped": float(masked_mean(((ratio.detach() - 1).abs() > clip).float(), rollout.mask))}
    if kl is not None:
        stats["kl"] = float(masked_mean(kl.detach(), rollout.mask))
    return -per_row.mean(), stats
