"""mHC: manifold-constrained hyper-connections (spec 3).

The residual is ``hc_mult`` streams [B, S, n, d], kept in float32. Each block has two units, one around attention and
one around the MoE. A unit reads all streams (flattened, weightless RMSNorm), projects them to 2n + n^2 mixing
logits split [pre | post | comb], and
  - collapses the streams into the sublayer input with ``pre = sigmoid(.) + eps``,
  - writes the sublayer output back with ``post = 2 sigmoid(.)`` and mixes the residual with ``comb^T``, where comb is
    made doubly stochastic by Sinkhorn-Knopp: softmax over each row, then column / (row, column) normalizations.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.linear import linear


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] logits (row = source stream, column = destination) to a doubly-stochastic matrix."""
    if logits.device.type == "cpu" and logits[..., 0, 0].numel() <= _SMALL and \
            not (torch.is_grad_enabled() and logits.requires_grad):
        return _sinkhorn_small(logits, iters, eps)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


_SMALL = 8  # matrices: decoding a few tokens


def _sinkhorn_small(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``sinkhorn`` for a few matrices without autograd, in numpy float64 (then float32): decoding runs it once per
    token and mHC unit, and there 2 * iters * 3 tensor dispatches cost some thirty times the arithmetic. (One
    decoding row's unit does all its mixing in Python floats: ``HyperConnection._forward_one``.)"""
    x = logits.detach().double().numpy()
    comb = np.exp(x - x.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + eps
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + eps)
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
    return torch.from_numpy(np.ascontiguousarray(comb, dtype=np.float32))


def _sinkhorn_one(logits: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    """``sinkhorn`` of one matrix as Python floats, kept as diag(r) K diag(c) with K = softmax + eps: a row
    normalization divides row i by r_i (K c)_i + eps, which is r_i <- r_i / (r_i (K c)_i + eps); columns alike."""
    k = []
    for row in logits:
        top = max(row)
        e = [math.exp(v - top) for v in row]
        total = sum(e)
        k.append([v / total + eps for v in e])
    kt = [list(col) for col in zip(*k)]
    c = [1.0 / (sum(col) + eps) for col in kt]  # the first column normalization (r = 1)
    r = [1.0] * len(k)
    for _ in range(iters - 1):
        r = [ri / (ri * sum(map(operator.mul, row, c)) + eps) for ri, row in zip(r, k)]
        c = [cj / (cj * sum(map(operator.mul, col, r)) + eps) for cj, col in zip(c, kt)]
    return [[ri * kij * cj for kij, cj in zip(row, c)] for ri, row in zip(r, k)]


def _sigmoid(v: float) -> float:
    """1 / (1 + e^-v) for a Python float, without overflow for large |v|."""
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def normed_linear(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.linear(rms_normalize(x), weight)`` without the normalized copy of x: a row's scale factors out of the
    linear map, so the few outputs are scaled instead of the n d inputs."""
    inv_rms = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)
    return linear(x, weight) * inv_rms


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_k pre_k X_k: streams [B, S, n, d], pre [B, S, n] -> [B, S, d] float32, as a batched [1, n] x [n, d]
    product (2x faster on CPU than building the [B, S, n, d] product and summing it)."""
    return torch.matmul(pre.unsqueeze(-2), streams.float()).squeeze(-2)


class HyperConnection(nn.Module):
    """One mHC unit: ``fn`` [(2+n)n, n d], ``base`` [(2+n)n], ``scale`` [3] (pre, post, comb gating factors)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.n = n
        self.iters = config.hc_sinkhorn_iters
        self.hc_eps = config.hc_eps
        self.norm_eps = config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, S, n, d] -> (collapsed [B, S, d] float32, post [B, S, n], comb [B, S, n, n])."""
        n = self.n
        if streams.device.type == "cpu" and streams.shape[:-2].numel() == 1 and \
                not (torch.is_grad_enabled() and (streams.requires_grad or self.fn.requires_grad)):
            return self._forward_one(streams)
        mix = normed_linear(streams.flatten(-2).float(), self.fn.float(), self.norm_eps)
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s = self.scale.float()
        pre = torch.sigmoid(pre_w * s[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s[1] + post_b)
        comb = sinkhorn((comb_w * s[2] + comb_b).unflatten(-1, (n, n)), self.iters, self.hc_eps)
        return collapse(streams, pre), post, comb

    def _forward_one(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` for one position without autograd (a decoding row): the 2n + n^2 mixing values in Python
        floats (float64), where the tensor path spends some forty small ops on them; about 1.6x faster per unit."""
        n, lead = self.n, streams.shape[:-2]
        mix = normed_linear(streams.flatten(-2).float(), self.fn.float(), self.norm_eps).view(-1).tolist()
        base, (s_pre, s_post, s_comb) = self.base.tolist(), self.scale.tolist()
        pre = [_sigmoid(m * s_pre + b) + self.hc_eps for m, b in zip(mix[:n], base[:n])]
        post = [2 * _sigmoid(m * s_post + b) for m, b in zip(mix[n:2 * n], base[n:2 * n])]
        logits = [m * s_comb + b for m, b in zip(mix[2 * n:], base[2 * n:])]
        comb = _sinkhorn_one([logits[i * n:(i + 1) * n] for i in range(n)], self.iters, self.hc_eps)
        return (collapse(streams, torch.tensor(pre).view(*lead, n)), torch.tensor(post).view(*lead, n),
                torch.tensor(comb).view(*lead, n, n))

    @staticmethod
    def expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k F + sum_j comb[j, k] X_j  (the residual mixed by comb transposed), float32."""
        mixed = torch.matmul(comb.transpose(-1, -2), streams.float())
        # in place: the matmul's backward needs its inputs, not its output; no [B, S, n, d] product is built
        return mixed.addcmul_(post.unsqueeze(-1), out.float().unsqueeze(-2))


class HyperHead(nn.Module):
    """The final collapse of the streams before the last RMSNorm: pre weights only, no Sinkhorn, no post."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.hc_eps = config.hc_eps
        self.norm_eps = config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros(n))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mix = normed_linear(streams.flatten(-2).float(), self.fn.float(), self.norm_eps)
        pre = torch.sigmoid(mix * self.scale.float() + self.base.float()) + self.hc_eps
        return collapse(streams, pre)
