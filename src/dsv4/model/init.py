"""From-scratch initialization of a ``Transformer``, every parameter and buffer set here, module type by module type.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.

Constructors only allocate; ``Transformer.__init__`` ends with ``init_weights(self)``, and a model built on the meta
device is made real by ``to_empty`` then ``init_weights``. ``std`` is ``config.initializer_range`` unless given.

module            what is set
nn.Embedding      weight ~ N(0, std)
nn.Linear         weight ~ N(0, std): every projection (attention, compressor, indexer, shared expert, MTP, lm
                  head); a bias 0 (none has one)
RMSNorm           weight = 1
Attention         attn_sink = 0 (each head's sink starts as one more key of logit 0)
Compressor        ape = 0 (no position bias within a block at first)
HyperConnection   fn ~ N(0, std); scale = 0.01 (pre, post, comb gating); base = 0 but +4 on comb's diagonal
HyperHead         fn ~ N(0, std); scale = 0.01; base = 0
Router            weight ~ N(0, std); bias = 0 (aux-loss-free balancing starts neutral); tid2eid = the balanced
                  hash table of its layer (``balanced_tid2eid``, seeded by the layer index)
Experts           w1, w2, w3 ~ N(0, std), in that order
RotaryEmbedding   the inverse-frequency tables, recomputed from the config

mHC (spec 3 leaves its initialization open; our choice, experimental, after the spec's suggestion): with the gating
factors at 0.01 the mixing starts at its static part, pre = sigmoid(0) + hc_eps = 1/2 + hc_eps, post = 2 sigmoid(0)
= 1, comb = Sinkhorn(4 I) = (e^4 I + (J - I)) / (e^4 + n - 1) up to hc_eps (about 0.95 on the diagonal for n = 4:
the residual streams start nearly unmixed); the head's collapse starts at pre = 1/2 + hc_eps. Unconstrained
hyper-connections (``hc_mode="hc"``, no sigmoid or Sinkhorn) start at the same mixing: their static logits ``base``
are those initial values themselves (pre 1/2 + hc_eps, post 1, comb = Sinkhorn(4 I); the head's pre 1/2 + hc_eps).

Random draws happen in the order of ``model.named_parameters()`` (modules in ``named_modules`` order, each
module's own parameters in the order it registers them), one ``normal_`` per drawn tensor, from torch's global
generator: the same seed gives the same model. A parameter or buffer that no rule covers is an error, so a new
module type must come with its rule here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dsv4.model.attention import Attention
from dsv4.model.compressor import Compressor
from dsv4.model.hyper import HyperConnection, HyperHead
from dsv4.model.moe import Experts, Router, balanced_tid2eid
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import RotaryEmbedding

if TYPE_CHECKING:
    from dsv4.model.transformer import Transformer

HC_SCALE = 0.01  # mHC gating factors: small, so the mixing starts at its static part (spec 3: "small values")
HC_COMB_DIAGONAL = 4.0  # comb's static logits on the diagonal: B ~ I at first


@torch.no_grad()
def init_weights(model: "Transformer", std: float | None = None) -> "Transformer":
    """Initialize every parameter and buffer of ``model`` in place (see the module's table); returns ``model``."""
    config = model.config
    std = config.initializer_range if std is None else std
    hash_seed = {id(layer.ffn.gate): i for i, layer in enumerate(model.layers)}  # the layer index seeds its table
    done: set[int] = set()

    def normal(t: torch.Tensor) -> None:
        nn.init.normal_(t, mean=0.0, std=std)
        done.add(id(t))

    def fill(t: torch.Tensor, value: float) -> None:
        t.fill_(value)
        done.add(id(t))

    for module in model.modules():
        if isinstance(module, nn.Embedding):
            normal(module.weight)
        elif isinstance(module, nn.Linear):
            normal(module.weight)
            if module.bias is not None:
                fill(module.bias, 0.0)
        elif isinstance(module, RMSNorm):
            fill(module.weight, 1.0)
        elif isinstance(module, Attention):
            fill(module.attn_sink, 0.0)
        elif isinstance(module, Compressor):
            fill(module.ape, 0.0)
        elif isinstance(module, HyperConnection):
            normal(module.fn)
            init_hyper_base(module.base, module.n, unconstrained=module.mode == "hc", eps=module.hc_eps,
                            iters=module.iters)
            done.add(id(module.base))
            fill(module.scale, HC_SCALE)
        elif isinstance(module, HyperHead):
            normal(module.fn)
            fill(module.base, 0.5 + config.hc_eps if module.mode == "hc" else 0.0)
            fill(module.scale, HC_SCALE)
        elif isinstance(module, Router):
            normal(module.weight)
            if module.hashed:
                table = balanced_tid2eid(config.vocab_size, module.n_experts, module.top_k,
                                         seed=hash_seed.get(id(module)) or 0)
                module.tid2eid.copy_(table)
                done.add(id(module.tid2eid))
            else:
                fill(module.bias, 0.0)
        elif isinstance(module, Experts):
            for w in (module.w1, module.w2, module.w3):
                normal(w)
        elif isinstance(module, RotaryEmbedding):
            module.reset_buffers()
            done.update(id(b) for b in module.buffers(recurse=False))
    missed = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in done]
    if missed:
        raise TypeError(f"init_weights has no rule for {', '.join(missed[:8])}"
                        f"{f' and {len(missed) - 8} more' if len(missed) > 8 else ''}")
    return model


def init_hyper_base(base: torch.Tensor, n: int, unconstrained: bool = False, eps: float = 1e-6,
                    iters: int = 20) -> None:
    """An mHC unit's static logits [(2 + n) n] = [pre n | post n | comb n n]: 0, but HC_COMB_DIAGONAL on comb's
    diagonal (pre = 1/2 + eps, post = 1, comb near the identity while the gating factors are small). With
    ``unconstrained`` (hyper-connections without sigmoid or Sinkhorn, whose logits are the mixing): those values."""
    base.zero_()
    base[2 * n:].view(n, n).diagonal().fill_(HC_COMB_DIAGONAL)
    if unconstrained:
        from dsv4.model.hyper import sinkhorn

        comb = sinkhorn(base[2 * n:].view(n, n).double(), iters, eps)
        base[:n].fill_(0.5 + eps)
        base[n:2 * n].fill_(1.0)
        base[2 * n:].copy_(comb.flatten())
