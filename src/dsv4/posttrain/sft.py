"""Supervised fine-tuning (spec 7: each specialist starts from the base by SFT on its domain): next-token
cross-entropy on the answer tokens only; the prompt conditions but is not learned."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.posttrain.rollout import completion_logits, masked_mean


def sft_loss(model, prompts: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor | None = None,
             prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood (nats) of the answer tokens [N, L] after their prompts [N, P] (right-padded, of
    lengths ``prompt_lens``, when they differ), over the tokens where ``mask`` [N, L] is 1 (all when None)."""
    logits = completion_logits(model, prompts, answers, prompt_lens)
    nll = F.cross_entropy(logits.flatten(0, 1), answers.flatten(), reduction="none").view(answers.shape)
    return masked_mean(nll, torch.ones_like(nll) if mask is None else mask)
