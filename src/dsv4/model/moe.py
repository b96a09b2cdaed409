"""DeepSeekMoE of V4 (spec 4): sqrt-softplus affinities, a selection-only bias, hash routing in the first layers,
clamped SwiGLU experts and one shared expert.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also I the experts' hidden size (moe_intermediate_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import HASH_MOE, ModelConfig
from dsv4.model import decode, fused
from dsv4.model.linear import Linear, linear
from dsv4.model.numerics import round_activations
from dsv4.model.precision import upcast


def balanced_tid2eid(vocab_size: int, n_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """A deterministic hash-routing table [vocab, k]: distinct experts per token, every expert equally loaded.

    Token t (after a seeded shuffle of the vocabulary) takes experts pi[(t k + j) mod E], j < k, of a seeded
    permutation pi: k consecutive slots of a cycle are distinct whenever k <= E, and the cycle visits every expert
    equally often (exactly so when vocab * k is a multiple of E).
    """
    if k > n_experts:
        raise ValueError(f"hash routing needs k <= n_experts, got k={k}, n_experts={n_experts}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_experts, generator=g)
    order = torch.randperm(vocab_size, generator=g)
    slots = order.unsqueeze(1) * k + torch.arange(k).unsqueeze(0)
    return perm[slots % n_experts]


@dataclass
class RouterOutput:
    weights: torch.Tensor  # [N, k] gate values (normalized, times the routed scaling factor), float32
    indices: torch.Tensor  # [N, k] selected experts
    scores: torch.Tensor  # [N, E] affinities (sqrt-softplus), float32 (for balance losses and statistics)


class Router(nn.Module):
    """Learned routing (top-k of score + bias) or hash routing (``tid2eid[token]``); gate values from unbiased
    scores."""

    def __init__(self, config: ModelConfig, layer_idx: int | None, hashed: bool):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.scaling = config.routed_scaling_factor
        self.normalize = config.norm_topk_prob
        self.hashed = hashed
        self.scoring_func = config.scoring_func
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if hashed:
            table = balanced_tid2eid(config.vocab_size, self.n_experts, self.top_k, seed=layer_idx or 0)
            self.register_buffer("tid2eid", table)
        else:
            # aux-loss-free balancing bias: used for selection only, updated outside the gradient (spec 4)
            self.register_buffer("bias", torch.zeros(config.n_routed_experts))
        # anticipatory routing (spec 6.5): (weight, bias) of a few steps ago that choose the experts while set;
        # the gate values still come from the current weight (dsv4.train.anticipatory)
        self.routing_params: tuple[torch.Tensor, torch.Tensor] | None = None

    def affinity(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E] -> affinities: V4's sqrt(softplus(.)) (spec 4), or for experiments
        (``ModelConfig.scoring_func``) V3's sigmoid or a softmax over the experts."""
        if self.scoring_func == "sigmoid":
            return torch.sigmoid(logits)
        if self.scoring_func == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sqrt(F.softplus(logits))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> RouterOutput:
        logits = linear(upcast(x), upcast(self.weight))
        scores = self.affinity(logits)
        if self.hashed:
            if input_ids is None:
                raise ValueError("hash-routed MoE layers need the token ids (input_ids)")
            indices = self.tid2eid[input_ids.reshape(-1)].long()
        elif self.routing_params is not None:
            old_w, old_b = self.routing_params
            with torch.no_grad():
                old = self.affinity(linear(upcast(x), upcast(old_w)))
                indices = torch.topk(old + upcast(old_b), self.top_k, dim=-1).indices
        else:
            indices = torch.topk(scores + upcast(self.bias), self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(weights * self.scaling, indices, scores)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """SiLU(min(gate, limit)) * clamp(up, -limit, limit) (spec 4; limit 0 or None disables the clamp)."""
    if limit:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class Experts(nn.Module):
    """The routed experts, stacked: w1 / w3 [E, I, d] (gate / up), w2 [E, d, I] (down).

    ``fp4_qat`` (off by default; ``dsv4.train.qat.enable_fp4_qat`` sets it) switches the forward to FP4
    quantization-aware training (spec 6.4): the float32 masters are MXFP4 quantize-dequantized on every call (E2M1
    values, one power-of-two scale ``2^ceil(log2(amax/6))`` per 1x32 tile along each matrix's input dim: d for
    w1 / w3, I for w2) and the gradient goes straight through to the masters. The flag is not part of the state dict.
    """

    fp4_block = 32  # MXFP4 tile along the input dim
    # official numerics (dsv4.model.numerics, rule 4): the inputs of w1 / w3 and of w2 rounded to FP8 in 1 x
    # act_quant_block tiles; 0: off
    act_quant_block = 0

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, i, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.limit = config.swiglu_limit
        self.fp4_qat = False
        self.w1 = nn.Parameter(torch.empty(e, i, d))
        self.w2 = nn.Parameter(torch.empty(e, d, i))
        self.w3 = nn.Parameter(torch.empty(e, i, d))

    stacked = True  # the weights are [E, ...] tensors (a packed model's experts are not: dsv4.model.packed)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights the forward uses: the masters, or with ``fp4_qat`` their MXFP4 fake quantization (what an
        official FP4 checkpoint of these masters holds), with a straight-through gradient."""
        if self.fp4_qat:
            from dsv4.quant import fake_quant_fp4

            return tuple(fake_quant_fp4(w, self.fp4_block) for w in (self.w1, self.w2, self.w3))
        return self.w1, self.w2, self.w3

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def weights_getter(self):
        """e -> expert e's (w1, w2, w3) as the forward uses them (one ``expert_weights`` call per forward)."""
        w1, w2, w3 = self.expert_weights()
        return lambda e: (w1[e], w2[e], w3[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, per_token: bool = False
                ) -> torch.Tensor:
        """x [N, d]; weights / indices [N, k] -> [N, d]. Tokens are grouped by expert, one matmul per expert; with
        ``per_token`` (and no autograd) a token's output does not depend on which other tokens share its experts
        (batch-invariant decoding): each expert that some token uses runs on all N tokens (the same shapes whatever
        the routing), its routing weight 0 on the tokens that did not pick it, and each token sums its experts in
        expert order, the others adding exact zeros; with N k >= E (most experts in use) every expert runs, in three
        batched products. Inside a compiled step with N k < E (a decoding step of few rows) each token's k experts'
        weights are gathered by tensor indexing instead and run in three batched products of N k: the step reads k of
        E experts' weights, its shapes fixed by (N, k), and a token's sum still in expert order. An eager decoding
        step of few tokens (``dsv4.model.decode.eager_step``) runs them token by token (``decode.expert_rows``)."""
        if self.act_quant_block:
            x = round_activations(x, self.act_quant_block)
        n, k = indices.shape
        e_count = self.num_experts
        if decode.eager_step():  # dsv4.model.decode: a decoding step's tokens one by one
            return decode.expert_rows(self, x, weights, indices)
        if self.stacked and per_token and not torch.is_grad_enabled() and torch.compiler.is_compiling() \
                and n * k < e_count:
            return self._gathered(x, weights, indices)
        if self.stacked and per_token and not torch.is_grad_enabled() \
                and (n * k >= e_count or torch.compiler.is_compiling()):
            w1, w2, w3 = self.expert_weights()
            gate = torch.zeros(n, e_count, dtype=weights.dtype, device=x.device).scatter_(1, indices, weights)
            xt = x.t().unsqueeze(0).expand(e_count, -1, -1)  # [E, d, N]
            h = swiglu(torch.bmm(w1, xt), torch.bmm(w3, xt), self.limit) * gate.t().unsqueeze(1).to(x.dtype)
            if self.act_quant_block:  # [E, I, N]: tiles along I
                h = round_activations(h.transpose(1, 2), self.act_quant_block).transpose(1, 2)
            return torch.bmm(w2, h).sum(0).t().to(x.dtype)  # [E, d, N] summed over the experts
        of = self.weights_getter()
        if per_token and not torch.is_grad_enabled():
            out = torch.zeros_like(x)
            for e in sorted(set(indices.view(-1).tolist())):
                gate = (weights * (indices == e)).sum(-1, keepdim=True).to(x.dtype)  # a token picks an expert once
                out += self._expert(x, *of(e), gate)
            return out
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=e_count).tolist()
        xs = x[token]
        gate_w = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            y = self._expert(xs[start:start + c], *of(e), gate_w[start:start + c, None].to(x.dtype))
            out.index_add_(0, token[start:start + c], y)  # no concatenation
            start += c
        return out

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``forward``'s compiled form for few tokens: token t's experts, in expert order, each product with the
        picked expert's matrix of the stacked weights (``gathered_products``); [N, d]."""
        n, k = indices.shape
        w1, w2, w3 = self.expert_weights()
        indices, order = indices.sort(dim=-1)
        flat = indices.reshape(-1)
        xs = x.repeat_interleave(k, dim=0)  # [N k, d]
        gate = weights.gather(-1, order).reshape(-1, 1).to(x.dtype)
        h = swiglu(gathered_products(xs, w1, flat), gathered_products(xs, w3, flat), self.limit) * gate  # [N k, I]
        if self.act_quant_block:
            h = round_activations(h, self.act_quant_block)
        return gathered_products(h, w2, flat).view(n, k, -1).sum(1).to(x.dtype)

    def _expert(self, x, w1, w2, w3, gate) -> torch.Tensor:
        """One expert on its tokens x, the routing weight ``gate`` multiplied in before w2 (spec 4)."""
        h = swiglu(linear(x, w1), linear(x, w3), self.limit) * gate
        if self.act_quant_block:
            h = round_activations(h, self.act_quant_block)
        return linear(h, w2).to(x.dtype)


def gathered_products(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[experts[m]]^T per row -> [M, N] for stacked weights w [E, N, K]: on the CPU in float32 the fused
    kernel's ``expert_matvec``, which reads each picked weight row once in place; otherwise (and as its reference)
    the picked matrices gathered by indexing and one batched product."""
    if fused.operators_serve(x, w):
        return fused.expert_matvec(x, w, experts)
    return torch.bmm(w[experts], x.unsqueeze(-1)).squeeze(-1)


class SharedExpert(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, i = config.hidden_size, config.moe_intermediate_size
        self.limit = config.swiglu_limit
        self.w1 = Linear(d, i, bias=False)
        self.w2 = Linear(i, d, bias=False)
        self.w3 = Linear(d, i, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int | None, hashed: bool | None = None):
        super().__init__()
        if hashed is None:
            hashed = config.mlp_layer_types[layer_idx] == HASH_MOE
        self.gate = Router(config, layer_idx, hashed)
        self.experts = Experts(config)
        self.shared_experts = SharedExpert(config) if config.n_shared_experts else None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None, per_token: bool = False
                ) -> tuple[torch.Tensor, RouterOutput]:
        """x [..., d] -> ([..., d], the router's output); ``per_token``: see ``Experts.forward``."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route = self.gate(flat, input_ids)
        out = self.experts(flat, route.weights, route.indices, per_token=per_token)  # args: what EP's hooks read
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape), route
