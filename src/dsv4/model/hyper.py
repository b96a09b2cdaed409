"""mHC: manifold-constrained hyper-connections (spec 3).

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.

The residual is ``hc_mult`` streams [B, S, n, d], kept in float32. Each block has two units, one around attention and
one around the MoE. A unit reads all streams (flattened, weightless RMSNorm), projects them to 2n + n^2 mixing
logits split [pre | post | comb], and
  - collapses the streams into the sublayer input with ``pre = sigmoid(.) + eps``,
  - writes the sublayer output back with ``post = 2 sigmoid(.)`` and mixes the residual with ``comb^T``, where comb is
    made doubly stochastic by Sinkhorn-Knopp: softmax over each row, then column / (row, column) normalizations.

Two variants for experiments (``ModelConfig.hc_mode``, ``dsv4 lab mhc``): "hc", unconstrained hyper-connections,
the same streams, parameters and mixing without the Sinkhorn projection and the sigmoid bounds (pre, post and comb
are the affine logits themselves; ``dsv4.model.init`` starts them at mHC's initial values), and "residual", a plain
residual (pre = 1/n, post = 1, comb = I: streams that start equal stay equal, each one x + F(x); the unit's
parameters are unused).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model import decode, fused
from dsv4.model.linear import linear
from dsv4.model.precision import compute_dtype, upcast


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] logits (row = source stream, column = destination) to a doubly-stochastic matrix. Without
    autograd on the CPU, ``fused.hc_sinkhorn`` (one pass a matrix; these operators are its reference), in a compiled
    graph too (a decoding step: inductor's code for these operators synchronizes its threads once an iteration)."""
    if fused.inference_serves(logits):
        return fused.hc_sinkhorn(logits, iters, eps)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def normed_linear(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.linear(rms_normalize(x), weight)`` without the normalized copy of x: a row's scale factors out of the
    linear map, so the few outputs are scaled instead of the n d inputs."""
    inv_rms = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)
    return linear(x, weight) * inv_rms


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_k pre_k X_k: streams [B, S, n, d], pre [B, S, n] -> [B, S, d] float32, as a batched [1, n] x [n, d]
    product, faster on CPU than building the [B, S, n, d] product and summing it."""
    return torch.matmul(pre.unsqueeze(-2), upcast(streams)).squeeze(-2)


class HyperConnection(nn.Module):
    """One mHC unit: ``fn`` [(2+n)n, n d], ``base`` [(2+n)n], ``scale`` [3] (pre, post, comb gating factors)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.n = n
        self.mode = config.hc_mode
        self.iters = config.hc_sinkhorn_iters
        self.hc_eps = config.hc_eps
        self.norm_eps = config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, S, n, d] -> (collapsed [B, S, d] float32, post [B, S, n], comb [B, S, n, n])."""
        n = self.n
        if self.mode == "residual":
            lead, dtype = streams.shape[:-2], compute_dtype(streams.dtype)
            one = torch.ones((), dtype=dtype, device=streams.device)
            pre = (one / n).expand(*lead, n)
            comb = torch.eye(n, dtype=dtype, device=streams.device).expand(*lead, n, n)
            return collapse(streams, pre), one.expand(*lead, n), comb
        if self.mode == "mhc" and decode.eager_step():  # dsv4.model.decode: a decoding step's Python floats
            return decode.mix_rows(self, streams)
        mix = normed_linear(upcast(streams.flatten(-2)), upcast(self.fn), self.norm_eps)
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = upcast(self.base).split([n, n, n * n])
        s = upcast(self.scale)
        if self.mode == "hc":  # unconstrained: the affine logits are the mixing
            comb = (comb_w * s[2] + comb_b).unflatten(-1, (n, n))
            return collapse(streams, pre_w * s[0] + pre_b), post_w * s[1] + post_b, comb
        pre = torch.sigmoid(pre_w * s[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s[1] + post_b)
        comb = sinkhorn((comb_w * s[2] + comb_b).unflatten(-1, (n, n)), self.iters, self.hc_eps)
        return collapse(streams, pre), post, comb

    @staticmethod
    def expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k F + sum_j comb[j, k] X_j  (the residual mixed by comb transposed), float32. Without autograd
        on the CPU, ``fused.hc_expand`` (one pass a token; these operators are its reference)."""
        if fused.serves(streams, out, post, comb):
            return fused.hc_expand(streams, out, post, comb)
        mixed = torch.matmul(comb.transpose(-1, -2), upcast(streams))
        # in place: the matmul's backward needs its inputs, not its output; no [B, S, n, d] product is built
        return mixed.addcmul_(post.unsqueeze(-1), upcast(out).unsqueeze(-2))


class HyperHead(nn.Module):
    """The final collapse of the streams before the last RMSNorm: pre weights only, no Sinkhorn, no post."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.mode = config.hc_mode
        self.hc_eps = config.hc_eps
        self.norm_eps = config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty(n))
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        if self.mode == "residual":  # the mean of the streams
            n = streams.shape[-2]
            return collapse(streams, torch.full(streams.shape[:-1], 1 / n, dtype=compute_dtype(streams.dtype),
                                                device=streams.device))
        mix = normed_linear(upcast(streams.flatten(-2)), upcast(self.fn), self.norm_eps)
        logits = mix * upcast(self.scale) + upcast(self.base)
        pre = logits if self.mode == "hc" else torch.sigmoid(logits) + self.hc_eps
        return collapse(streams, pre)
