"""From-scratch initialization (dsv4.model.init): each rule, the mHC starting mix, determinism, meta-device builds."""

import copy
import math

import pytest
import torch
from torch import nn

from dsv4 import ModelConfig, Transformer
from dsv4.model.attention import Attention
from dsv4.model.compressor import Compressor
from dsv4.model.hyper import HyperConnection, HyperHead
from dsv4.model.init import init_weights
from dsv4.model.moe import Experts, Router, balanced_tid2eid
from dsv4.model.norm import RMSNorm


# spec 3's suggested from-scratch choice (experimental): gating factors 0.01, +4 on comb's static diagonal
HC_SCALE, HC_COMB_DIAGONAL = 0.01, 4.0


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=512, **changes)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny_config())


def modules_of(model, kind):
    found = [m for m in model.modules() if isinstance(m, kind)]
    assert found, kind
    return found


def everything(model) -> dict[str, torch.Tensor]:
    """Parameters and every buffer (the RoPE tables are not in the state dict)."""
    return {**dict(model.named_parameters()), **{"buffer " + k: b for k, b in model.named_buffers()}}


def test_norms_one_sinks_and_position_biases_zero(model):
    for norm in modules_of(model, RMSNorm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    for attn in modules_of(model, Attention):
        assert torch.equal(attn.attn_sink, torch.zeros_like(attn.attn_sink))
    for comp in modules_of(model, Compressor):  # CSA's, HCA's and the indexers' compressors
        assert torch.equal(comp.ape, torch.zeros_like(comp.ape))


def test_router_bias_starts_at_zero_and_hash_tables_are_the_balanced_ones():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = Transformer(cfg)
    learned = [r for r in modules_of(model, Router) if not r.hashed]
    hashed = [(i, layer.ffn.gate) for i, layer in enumerate(model.layers) if layer.ffn.gate.hashed]
    assert learned and hashed
    with torch.no_grad():  # what training does to them
        for r in learned:
            r.bias.normal_()
        for _, r in hashed:
            r.tid2eid.zero_()
    init_weights(model)
    for r in learned:
        assert torch.equal(r.bias, torch.zeros_like(r.bias))
    for i, r in hashed:
        assert torch.equal(r.tid2eid, balanced_tid2eid(cfg.vocab_size, cfg.n_routed_experts,
                                                       cfg.num_experts_per_tok, seed=i))


@pytest.mark.parametrize("std", [None, 0.1])
def test_matrices_are_normal_with_the_configured_std(std):
    cfg = tiny_config()
    torch.manual_seed(1)
    model = init_weights(Transformer(cfg), std=std)
    want = cfg.initializer_range if std is None else std
    drawn = [m.weight for m in modules_of(model, nn.Linear)] + [model.embed.weight]
    drawn += [w for e in modules_of(model, Experts) for w in (e.w1, e.w2, e.w3)]
    drawn += [r.weight for r in modules_of(model, Router)]
    drawn += [h.fn for h in modules_of(model, HyperConnection) + modules_of(model, HyperHead)]
    for w in drawn:
        n, w = w.numel(), w.detach()
        assert n >= 512, w.shape
        # sample mean and std of n normal draws: within 6 standard errors
        assert abs(float(w.mean())) < 6 * want / math.sqrt(n)
        assert abs(float(w.std()) / want - 1) < 6 / math.sqrt(2 * n)
    ape = {id(c.ape) for c in modules_of(model, Compressor)}  # zero
    matrices = {id(p) for p in model.parameters() if p.dim() >= 2 and id(p) not in ape}
    assert {id(w) for w in drawn} == matrices  # every matrix is one of the drawn ones


def test_mhc_starts_at_its_static_mix(model):
    """Gating factors 0.01 and static logits 0 except +4 on comb's diagonal: pre = 1/2 + eps, post = 1, comb =
    Sinkhorn(4 I) = (e^4 I + (J - I)) / (e^4 + n - 1), the streams nearly unmixed; the head's pre = 1/2 + eps."""
    cfg = model.config
    n, eps = cfg.hc_mult, cfg.hc_eps
    e4 = math.exp(HC_COMB_DIAGONAL)
    comb_static = (torch.full((n, n), 1.0, dtype=torch.float64) + (e4 - 1) * torch.eye(n, dtype=torch.float64)) \
        / (e4 + n - 1)
    units = modules_of(model, HyperConnection)
    assert len(units) == 2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    g = torch.Generator().manual_seed(0)
    streams = torch.randn(2, 3, n, cfg.hidden_size, generator=g, dtype=torch.float64)
    for unit in units:
        assert torch.equal(unit.scale, torch.full_like(unit.scale, HC_SCALE))
        static = unit.base.detach()
        assert torch.equal(static[:2 * n], torch.zeros(2 * n))
        assert torch.equal(static[2 * n:].view(n, n), HC_COMB_DIAGONAL * torch.eye(n))
        u = copy.deepcopy(unit).double()
        basis = torch.eye(n, cfg.hidden_size, dtype=torch.float64).view(1, 1, n, cfg.hidden_size)  # X_k = e_k
        with torch.no_grad():
            _, post, comb = u(streams)
            pre_basis = u(basis)[0]  # sum_k pre_k e_k: pre in the first n entries
        # as initialized: the dynamic part 0.01 v.fn (|v.fn| ~ 0.02 sqrt(n d) = 0.45 here) moves them by < 0.01
        torch.testing.assert_close(post, torch.ones_like(post), atol=0.01, rtol=0)
        torch.testing.assert_close(comb, comb_static.expand_as(comb), atol=0.01, rtol=0)
        torch.testing.assert_close(pre_basis[..., :n], torch.full((1, 1, n), 0.5 + eps, dtype=torch.float64),
                                   atol=0.01, rtol=0)
        # the static part exactly: without fn's contribution
        with torch.no_grad():
            fn = u.fn.clone()
            u.fn.zero_()
            col, post0, comb0 = u(streams)
            u.fn.copy_(fn)
        assert torch.equal(post0, torch.ones_like(post0))
        torch.testing.assert_close(col, (0.5 + eps) * streams.sum(-2), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(comb0, comb_static.expand_as(comb0), atol=1e-5, rtol=0)  # hc_eps terms
        torch.testing.assert_close(comb0.sum(-1), torch.ones(2, 3, n, dtype=torch.float64), atol=1e-5, rtol=0)
    for head in modules_of(model, HyperHead):
        assert torch.equal(head.scale, torch.full_like(head.scale, HC_SCALE))
        assert torch.equal(head.base, torch.zeros_like(head.base))


def test_same_seed_same_model_other_seed_other_model():
    cfg = tiny_config()
    torch.manual_seed(5)
    a = everything(Transformer(cfg))
    torch.manual_seed(5)
    b = everything(Transformer(cfg))
    torch.manual_seed(6)
    c = everything(Transformer(cfg))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_meta_build_then_init_equals_a_direct_build():
    """A model built on the meta device, made real with ``to_empty`` (uninitialized memory) and initialized, equals
    a directly built one initialized under the same seed: ``init_weights`` sets every parameter and buffer."""
    cfg = tiny_config(num_nextn_predict_layers=2)
    torch.manual_seed(0)
    direct = Transformer(cfg)
    torch.manual_seed(7)
    init_weights(direct)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for t in everything(meta).values():
            if t.is_floating_point():
                t.fill_(float("nan"))  # whatever to_empty left: nothing of it may survive
    torch.manual_seed(7)
    init_weights(meta)
    a, b = everything(direct), everything(meta)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(direct(ids), meta(ids))


def test_a_parameter_without_a_rule_is_an_error():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    model.layers[1].mystery = nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="layers.1.mystery"):
        init_weights(model)


def test_a_float64_model_initializes_in_float64():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).double()
    torch.manual_seed(3)
    a = {k: v.clone() for k, v in everything(init_weights(model)).items()}
    torch.manual_seed(3)
    b = everything(init_weights(model))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
