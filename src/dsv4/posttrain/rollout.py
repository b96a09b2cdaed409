"""What every post-training stage shares: sampling completions from the policy through the decode cache, and the
logits a model gives to the tokens of completions (the positions that post-training's losses read).

Prompts of a batch may differ in length: they are held right-padded, with their lengths. A causal model's logits at
a position do not depend on what follows it, so a prompt, its completion and then padding give the same logits for
the completion as the two alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.generate import sample_next


@dataclass
class Rollout:
    """Completions of a batch of prompts: prompts [N, P] (right-padded when ``prompt_lens`` [N] says they are
    shorter), tokens [N, L] and the mask [N, L] of the tokens that count (up to and including the first ``eos``;
    all of them when there is none)."""

    prompts: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    prompt_lens: torch.Tensor | None = None  # None: every prompt is P tokens long

    def rows(self, index: torch.Tensor) -> Rollout:
        """The rollout of some of the rows."""
        lens = None if self.prompt_lens is None else self.prompt_lens[index]
        return Rollout(self.prompts[index], self.tokens[index], self.mask[index], lens)


def pad_prompts(prompts: Sequence[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-d prompts of any lengths >= 1 -> right-padded [N, max length] and the lengths [N]."""
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of 1-d token tensors, each of at least one token")
    lens = torch.tensor([p.numel() for p in prompts], device=prompts[0].device)
    out = prompts[0].new_full((len(prompts), int(lens.max())), pad)
    for i, p in enumerate(prompts):
        out[i, :p.numel()] = p
    return out, lens


def completion_mask(tokens: torch.Tensor, eos: int | None) -> torch.Tensor:
    """float32 [N, L]: 1 up to and including each row's first ``eos``, 0 after it."""
    if eos is None:
        return torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)
    after = (tokens == eos).long().cumsum(1) - (tokens == eos).long()  # EOS tokens strictly before this one
    return (after == 0).float()


@torch.no_grad()  # not inference_mode: the sampled ids are the inputs of later forwards with autograd
def sample(model, prompts: torch.Tensor | Sequence[torch.Tensor], max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, eos: int | None = None, generator: torch.Generator | None = None) -> Rollout:
    """Sample ``max_new_tokens`` tokens after each prompt: [N, P], or a list of 1-d prompts of any lengths (the
    rows of one length are decoded together through one cache). The model runs in eval mode and gets its mode
    back. Rows that have emitted ``eos`` keep being decoded (their later tokens are masked out) until every row of
    their length has, or ``max_new_tokens``; a row that ends early is padded with ``eos``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if torch.is_tensor(prompts):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompts must be [N, P] with P >= 1, got shape {tuple(prompts.shape)}")
        padded, lens = prompts, None
        groups = {prompts.shape[1]: torch.arange(prompts.shape[0], device=prompts.device)}
    else:
        padded, lens = pad_prompts(prompts)
        groups = {n: (lens == n).nonzero().squeeze(1) for n in sorted(set(lens.tolist()))}
    was_training = model.training
    model.eval()
    try:
        tokens = padded.new_empty((padded.shape[0], max_new_tokens))
        for n, rows in groups.items():
            tokens[rows] = _decode(model, padded[rows, :n], max_new_tokens, temperature, top_p, eos, generator)
    finally:
        model.train(was_training)
    return Rollout(padded, tokens, completion_mask(tokens, eos), lens)


def _decode(model, prompts, max_new_tokens, temperature, top_p, eos, generator) -> torch.Tensor:
    """``sample`` for prompts of one length [n, P]: the tokens [n, max_new_tokens]."""
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
    tokens = torch.stack(out, dim=1)
    if tokens.shape[1] < max_new_tokens:  # every row ended early: pad to the asked length
        tokens = torch.cat([tokens, tokens.new_full((tokens.shape[0], max_new_tokens - tokens.shape[1]),
                                                    eos)], dim=1)
    return tokens


def completion_logits(model, prompts: torch.Tensor, tokens: torch.Tensor, prompt_lens: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """float32 [N, L, V]: the logits from which each completion token is predicted, from one forward over prompt
    and completion. With ``prompt_lens`` (prompts right-padded): each row's completion goes right after its own
    prompt, padding after both."""
    p, n = prompts.shape[1], tokens.shape[1]
    if prompt_lens is None:
        return model(torch.cat([prompts, tokens], dim=1))[:, p - 1:p - 1 + n]
    where = prompt_lens.view(-1, 1) + torch.arange(n, device=tokens.device)  # [N, L]: each completion token's place
    # what stays of a shorter prompt's padding lands after its completion, where it changes nothing
    seq = torch.cat([prompts, prompts.new_zeros(prompts.shape[0], n)], dim=1).scatter(1, where, tokens)
    logits = model(seq)
    return logits.gather(1, (where - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def rollout_logits(model, rollout: Rollout) -> torch.Tensor:
    """``completion_logits`` of a rollout's completions after its prompts."""
    return completion_logits(model, rollout.prompts, rollout.tokens, rollout.prompt_lens)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the tokens where ``mask`` is 1 (0 when there is none)."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
