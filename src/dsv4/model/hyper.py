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

import math
import operator

import numpy as np
import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.linear import linear
from dsv4.model.precision import compute_dtype, upcast


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] logits (row = source stream, column = destination) to a doubly-stochastic matrix."""
    if logits.device.type == "cpu" and logits[..., 0, 0].numel() <= _SMALL and not torch.compiler.is_compiling() \
            and not (torch.is_grad_enabled() and logits.requires_grad):
        return _sinkhorn_small(logits, iters, eps)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


_SMALL = 64  # matrices: a decoding step of up to 64 rows


def _sinkhorn_small(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``sinkhorn`` for a few matrices without autograd: decoding runs it once per token and mHC unit, and there
    the 2 * iters * 3 tensor dispatches cost far more than the arithmetic. Up to 8 matrices of the residual's four
    streams (n = 4, written out), or one matrix: each by ``_sinkhorn_one`` in Python floats; else (a decoding step
    of many rows) in numpy float64, batched. Out in the logits' dtype."""
    n, count = logits.shape[-1], logits[..., 0, 0].numel()
    if (n == 4 and count <= 8) or count == 1:
        rows = logits.detach().double().reshape(-1, n, n).tolist()
        return torch.tensor([_sinkhorn_one(m, iters, eps) for m in rows], dtype=logits.dtype).view(logits.shape)
    x = logits.detach().double().numpy()
    comb = np.exp(x - x.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + eps
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + eps)
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
    out = np.float64 if logits.dtype == torch.float64 else np.float32
    return torch.from_numpy(np.ascontiguousarray(comb, dtype=out))


def _sinkhorn_one(logits: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    """``sinkhorn`` of one matrix as Python floats, kept as diag(r) K diag(c) with K = softmax + eps: a row
    normalization divides row i by r_i (K c)_i + eps, which is r_i <- r_i / (r_i (K c)_i + eps); columns alike."""
    k = []
    for row in logits:
        top = max(row)
        e = [math.exp(v - top) for v in row]
        total = sum(e)
        k.append([v / total + eps for v in e])
    c = [1.0 / (sum(col) + eps) for col in zip(*k)]  # the first column normalization (r = 1)
    return (_balance_4 if len(k) == 4 else _balance)(k, c, iters, eps)


def _balance(k: list[list[float]], c: list[float], iters: int, eps: float) -> list[list[float]]:
    """``_sinkhorn_one``'s remaining iters - 1 row and column normalizations of diag(r) K diag(c), then the matrix."""
    kt = [list(col) for col in zip(*k)]
    r = [1.0] * len(k)
    for _ in range(iters - 1):
        r = [ri / (ri * sum(map(operator.mul, row, c)) + eps) for ri, row in zip(r, k)]
        c = [cj / (cj * sum(map(operator.mul, col, r)) + eps) for cj, col in zip(c, kt)]
    return [[ri * kij * cj for kij, cj in zip(row, c)] for ri, row in zip(r, k)]


def _balance_4(k: list[list[float]], c: list[float], iters: int, eps: float) -> list[list[float]]:
    """``_balance`` for 4 x 4 (the residual's four streams, spec 3) written out: the same operations in the same
    order, so the same floats, faster than the loops over lists (decoding runs one per mHC unit)."""
    (k00, k01, k02, k03), (k10, k11, k12, k13), (k20, k21, k22, k23), (k30, k31, k32, k33) = k
    c0, c1, c2, c3 = c
    r0 = r1 = r2 = r3 = 1.0
    for _ in range(iters - 1):
        r0 = r0 / (r0 * (k00 * c0 + k01 * c1 + k02 * c2 + k03 * c3) + eps)
        r1 = r1 / (r1 * (k10 * c0 + k11 * c1 + k12 * c2 + k13 * c3) + eps)
        r2 = r2 / (r2 * (k20 * c0 + k21 * c1 + k22 * c2 + k23 * c3) + eps)
        r3 = r3 / (r3 * (k30 * c0 + k31 * c1 + k32 * c2 + k33 * c3) + eps)
        c0 = c0 / (c0 * (k00 * r0 + k10 * r1 + k20 * r2 + k30 * r3) + eps)
        c1 = c1 / (c1 * (k01 * r0 + k11 * r1 + k21 * r2 + k31 * r3) + eps)
        c2 = c2 / (c2 * (k02 * r0 + k12 * r1 + k22 * r2 + k32 * r3) + eps)
        c3 = c3 / (c3 * (k03 * r0 + k13 * r1 + k23 * r2 + k33 * r3) + eps)
    return [[r0 * k00 * c0, r0 * k01 * c1, r0 * k02 * c2, r0 * k03 * c3],
            [r1 * k10 * c0, r1 * k11 * c1, r1 * k12 * c2, r1 * k13 * c3],
            [r2 * k20 * c0, r2 * k21 * c1, r2 * k22 * c2, r2 * k23 * c3],
            [r3 * k30 * c0, r3 * k31 * c1, r3 * k32 * c2, r3 * k33 * c3]]


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
        if self.mode == "mhc" and streams.device.type == "cpu" and streams.shape[:-2].numel() == 1 \
                and not torch.compiler.is_compiling() \
                and not (torch.is_grad_enabled() and (streams.requires_grad or self.fn.requires_grad)):
            return self._forward_one(streams)
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

    def _forward_one(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` for one position without autograd (a decoding row): the 2n + n^2 mixing values and the norm
        of the streams come to Python floats (float64) in one list, where the tensor path spends some forty small
        ops on them; the three results are one tensor's views."""
        n, lead, d = self.n, streams.shape[:-2], streams.shape[-1]
        x = upcast(streams.reshape(1, n * d))
        vals = torch.cat([linear(x, upcast(self.fn)).view(-1), torch.linalg.vector_norm(x).view(1)]).tolist()
        inv_rms = 1.0 / math.sqrt(vals[-1] ** 2 / (n * d) + self.norm_eps)  # normed_linear's scale, factored out
        mix = [v * inv_rms for v in vals[:-1]]
        base, (s_pre, s_post, s_comb) = self.base.tolist(), self.scale.tolist()
        pre = [_sigmoid(m * s_pre + b) + self.hc_eps for m, b in zip(mix[:n], base[:n])]
        post = [2 * _sigmoid(m * s_post + b) for m, b in zip(mix[n:2 * n], base[n:2 * n])]
        logits = [m * s_comb + b for m, b in zip(mix[2 * n:], base[2 * n:])]
        comb = _sinkhorn_one([logits[i * n:(i + 1) * n] for i in range(n)], self.iters, self.hc_eps)
        mixing = torch.tensor(pre + post + [v for row in comb for v in row], device=streams.device, dtype=x.dtype)
        collapsed = torch.mm(mixing[:n].view(1, n), upcast(streams.reshape(n, d)))
        return (collapsed.view(*lead, d), mixing[n:2 * n].view(*lead, n), mixing[2 * n:].view(*lead, n, n))

    @staticmethod
    def expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k F + sum_j comb[j, k] X_j  (the residual mixed by comb transposed), float32."""
        if streams.shape[:-2].numel() == 1 and not (torch.is_grad_enabled() and any(
                t.requires_grad for t in (streams, out, post, comb))):  # one row: 2-d products, a third of the ops
            n, d = streams.shape[-2:]
            mixed = torch.mm(comb.reshape(n, n).t(), upcast(streams.reshape(n, d)))
            return mixed.addcmul_(post.reshape(n, 1), upcast(out.reshape(1, d))).view(streams.shape)
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
