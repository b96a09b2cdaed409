"""What every post-training stage shares: sampling completions from the policy through the decode cache, and the
logits a model gives to the tokens of completions (the positions that post-training's losses read)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.generate import sample_next


@dataclass
class Rollout:
    """Completions of a batch of prompts: tokens [N, L] and the mask [N, L] of the tokens that count (up to and
    including the first ``eos``; all of them when there is none)."""

    prompts: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


def completion_mask(tokens: torch.Tensor, eos: int | None) -> torch.Tensor:
    """float32 [N, L]: 1 up to and including each row's first ``eos``, 0 after it."""
    if eos is None:
        return torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)
    after = (tokens == eos).long().cumsum(1) - (tokens == eos).long()  # EOS tokens strictly before this one
    return (after == 0).float()


@torch.no_grad()  # not inference_mode: the sampled ids are the inputs of later forwards with autograd
def sample(model, prompts: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           eos: int | None = None, generator: torch.Generator | None = None) -> Rollout:
    """Sample ``max_new_tokens`` tokens after each prompt [N, P] (all prompts of one length), the rows decoded
    together through one cache; the model runs in eval mode and gets its mode back. Rows that have emitted ``eos``
    keep being decoded (their later tokens are masked out) until every row has, or ``max_new_tokens``."""
    if prompts.dim() != 2 or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be [N, P] with P >= 1, got shape {tuple(prompts.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(prompts.shape[0])
        logits = model(prompts, cache=cache, last_only=True)[:, -1]
        out = []
        done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)
            out.append(nxt)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = model(nxt.unsqueeze(1), cache=cache)[:, -1]
    finally:
        model.train(was_training)
    tokens = torch.stack(out, dim=1)
    if tokens.shape[1] < max_new_tokens:  # every row ended early: pad to the asked length
        tokens = torch.cat([tokens, tokens.new_full((tokens.shape[0], max_new_tokens - tokens.shape[1]),
                                                    eos)], dim=1)
    return Rollout(prompts, tokens, completion_mask(tokens, eos))


def completion_logits(model, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float32 [N, L, V]: the logits from which each completion token is predicted (positions P - 1 .. P + L - 2
    of one forward over prompt and completion)."""
    p = prompts.shape[1]
    logits = model(torch.cat([prompts, tokens], dim=1))
    return logits[:, p - 1:p - 1 + tokens.shape[1]]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the tokens where ``mask`` is 1 (0 when there is none)."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
