"""Tests for dsv4.train.optim (Muon + AdamW, spec 6.1) and dsv4.train.schedule (spec 6.2)."""

import copy
import dataclasses
import io
import math

import pytest
import torch
from torch import nn

import dsv4
from dsv4.train.optim import (
    ADAMW,
    HYBRID_STEPS,
    MUON,
    POLISH,
    QUINTIC,
    Muon,
    build_optimizer,
    matrix_view,
    orthogonalize,
    param_groups,
    rule_for,
)
from dsv4.train.schedule import WSDSchedule, mtp_weight


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny"))


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ grouping

EXPECTED_ADAMW = [
    "embed.weight", "head.weight", "norm.weight",
    "hc_head.base", "hc_head.scale",
    "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight",
    "layers.0.hc_attn.base", "layers.0.hc_attn.scale", "layers.2.hc_ffn.base", "layers.2.hc_ffn.scale",
    "layers.0.attn.q_norm.weight", "layers.0.attn.kv_norm.weight", "layers.0.attn.attn_sink",
    "layers.1.attn.compressor.ape", "layers.1.attn.compressor.norm.weight",
    "layers.1.attn.indexer.compressor.ape", "layers.1.attn.indexer.compressor.norm.weight",
    "layers.2.attn.compressor.ape",
    "mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.norm.weight", "mtp.0.attn_norm.weight",
    "mtp.0.hc_head.base", "mtp.0.hc_head.scale", "mtp.0.attn.attn_sink",
]
EXPECTED_MUON = [
    "layers.0.attn.wq_a.weight", "layers.0.attn.wq_b.weight", "layers.0.attn.wkv.weight",
    "layers.0.attn.wo_a.weight", "layers.0.attn.wo_b.weight",
    "layers.1.attn.compressor.wkv.weight", "layers.1.attn.compressor.wgate.weight",
    "layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.weights_proj.weight",
    "layers.1.attn.indexer.compressor.wkv.weight", "layers.1.attn.indexer.compressor.wgate.weight",
    "layers.0.ffn.gate.weight", "layers.3.ffn.gate.weight",
    "layers.0.ffn.experts.w1", "layers.0.ffn.experts.w2", "layers.0.ffn.experts.w3",
    "layers.0.ffn.shared_experts.w1.weight", "layers.0.ffn.shared_experts.w2.weight",
    "layers.0.hc_attn.fn", "layers.0.hc_ffn.fn", "hc_head.fn",
    "mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.hc_head.fn", "mtp.0.attn.wo_a.weight",
    "mtp.0.ffn.experts.w2", "mtp.0.ffn.gate.weight",
]


def test_grouping_of_tiny_model(tiny):
    groups = param_groups(tiny)
    names = {k: [n for n, _ in v] for k, v in groups.items()}
    assert set(names) == {MUON, ADAMW}
    for n in EXPECTED_ADAMW:
        assert n in names[ADAMW], n
    for n in EXPECTED_MUON:
        assert n in names[MUON], n
    # everything covered exactly once, in model order
    all_names = [n for n, _ in tiny.named_parameters()]
    assert sorted(names[MUON] + names[ADAMW]) == sorted(all_names)
    assert not set(names[MUON]) & set(names[ADAMW])
    # every Muon param is a matrix or a stack of them, every 2-D AdamW param is one of the three named kinds
    for n, p in groups[MUON]:
        assert p.dim() in (2, 3), n
    for n, p in groups[ADAMW]:
        assert p.dim() == 1 or n.endswith(("embed.weight", "head.weight", "compressor.ape")), n
    # buffers are not parameters and are not grouped
    assert "layers.1.ffn.gate.bias" not in names[MUON] + names[ADAMW]


def test_matrix_views(tiny):
    cfg = tiny.config
    e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    g, r = cfg.o_groups, cfg.o_lora_rank
    shapes = dict(tiny.named_parameters())
    view = lambda n: matrix_view(n, shapes[n].shape, g)  # noqa: E731
    assert view("layers.1.ffn.experts.w1") == (e, i, d)
    assert view("layers.1.ffn.experts.w2") == (e, d, i)
    wo_a = shapes["layers.0.attn.wo_a.weight"]
    assert view("layers.0.attn.wo_a.weight") == (g, r, wo_a.shape[1]) and g * r == wo_a.shape[0] and g > 1
    assert view("layers.0.attn.wq_b.weight") == (1, *shapes["layers.0.attn.wq_b.weight"].shape)
    assert view("hc_head.fn") == (1, *shapes["hc_head.fn"].shape)
    with pytest.raises(ValueError, match="AdamW"):
        matrix_view("embed.weight", shapes["embed.weight"].shape, g)
    with pytest.raises(ValueError, match="o_groups"):
        matrix_view("layers.0.attn.wo_a.weight", (10, 8), 3)
    # wrapper prefixes do not change the rule
    assert rule_for("module._orig_mod.layers.0.attn.wo_a.weight") == rule_for("layers.0.attn.wo_a.weight")


def test_unknown_parameter_raises(tiny):
    model = copy.deepcopy(tiny)
    model.layers[0].attn.new_thing = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(KeyError, match="new_thing"):
        param_groups(model)
    with pytest.raises(KeyError, match="new_thing"):
        build_optimizer(model)
    # a bias added to a Muon-ruled Linear is not silently taken either
    model = copy.deepcopy(tiny)
    model.layers[0].attn.wkv.bias = nn.Parameter(torch.zeros(model.layers[0].attn.wkv.out_features))
    with pytest.raises(KeyError, match="wkv.bias"):
        param_groups(model)
    # a name that matches a rule with a shape it does not expect
    with pytest.raises(ValueError, match="dims"):
        matrix_view("layers.0.ffn.experts.w1", (4, 4), 1)


# -------------------------------------------------------------------------------------------- Newton-Schulz

@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 200), (6, 48, 96), (3, 80, 24)])
def test_orthogonalize_drives_singular_values_to_one(shape):
    M = _rand(*shape, seed=sum(shape))
    out = orthogonalize(M)
    assert out.shape == M.shape and out.dtype == M.dtype
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.7 and s.max() < 1.3
    err10 = (s - 1).abs().max()
    err8 = (torch.linalg.svdvals(orthogonalize(M, HYBRID_STEPS[:8])) - 1).abs().max()
    # the quintic alone leaves them spread over about [0.68, 1.17]; the two polishing steps pull them to 1
    assert err8 > 0.1
    assert err10 < 5e-3
    # bf16 matmuls: still close to 1
    s16 = torch.linalg.svdvals(orthogonalize(M, dtype=torch.bfloat16))
    assert (s16 - 1).abs().max() < 0.03
    # same singular vectors as M (the polar factor U V^T)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    torch.testing.assert_close(out, U @ Vh, atol=2e-3, rtol=0)


def test_hybrid_schedule_constants():
    assert HYBRID_STEPS == (QUINTIC,) * 8 + (POLISH,) * 2
    assert QUINTIC == (3.4445, -4.7750, 2.0315) and POLISH == (2.0, -1.5, 0.5)


def test_orthogonalize_batched_equals_per_matrix():
    M = _rand(5, 40, 24, seed=3)
    batched = orthogonalize(M)
    for k in range(5):
        torch.testing.assert_close(batched[k], orthogonalize(M[k]), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------- Muon

def _reference_muon_matrix(W, grads, lr, mu=0.95, wd=0.1, gamma=0.18):
    """Spec 6.1 written out for one matrix: Nesterov momentum, hybrid NS on the Frobenius-normalized matrix,
    transposing tall ones, rescale by gamma sqrt(max(n, m)), decoupled weight decay."""
    W = W.clone()
    M = torch.zeros_like(W)
    n, m = W.shape
    for G in grads:
        M = mu * M + G
        U = mu * M + G
        X = U.T if n > m else U
        X = X / (torch.sqrt((X * X).sum()) + 1e-7)
        for step in range(10):
            a, b, c = (3.4445, -4.7750, 2.0315) if step < 8 else (2.0, -1.5, 0.5)
            A = X @ X.T
            X = a * X + b * (A @ X) + c * (A @ (A @ X))
        O = (X.T if n > m else X) * math.sqrt(max(n, m)) * gamma
        W = W * (1 - lr * wd) - lr * O
    return W


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_muon_matches_reference(shape):
    W0 = _rand(*shape, seed=1)
    grads = [_rand(*shape, seed=10 + k) for k in range(3)]
    p = nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.02)
    for G in grads:
        p.grad = G.clone()
        opt.step()
    torch.testing.assert_close(p.data, _reference_muon_matrix(W0, grads, lr=0.02), atol=1e-5, rtol=1e-4)


def test_muon_update_rms_is_018():
    p = nn.Parameter(torch.zeros(64, 256))
    opt = Muon([p], lr=1.0, weight_decay=0.0)
    p.grad = _rand(64, 256, seed=2)
    opt.step()
    rms = p.data.pow(2).mean().sqrt().item()
    assert abs(rms - 0.18) < 1e-3


def test_experts_orthogonalized_each_on_its_own():
    E, I, d = 4, 24, 16
    W0, G = _rand(E, I, d, seed=4), _rand(E, I, d, seed=5)
    G[1] *= 100.0  # a big expert must not shrink the others' updates (no joint normalization)
    p = nn.Parameter(W0.clone())
    p.grad = G.clone()
    Muon([{"params": [p], "views": [matrix_view("layers.1.ffn.experts.w1", p.shape)]}], lr=0.01).step()
    for e in range(E):
        q = nn.Parameter(W0[e].clone())
        q.grad = G[e].clone()
        Muon([q], lr=0.01).step()
        torch.testing.assert_close(p.data[e], q.data, atol=1e-6, rtol=1e-5)


def test_wo_a_orthogonalized_per_group(tiny):
    g, r = tiny.config.o_groups, tiny.config.o_lora_rank
    name = "layers.0.attn.wo_a.weight"
    shape = dict(tiny.named_parameters())[name].shape
    W0, G = _rand(*shape, seed=6), _rand(*shape, seed=7)
    p = nn.Parameter(W0.clone())
    p.grad = G.clone()
    Muon([{"params": [p], "views": [matrix_view(name, shape, g)]}], lr=0.01).step()
    delta = (W0 * (1 - 0.01 * 0.1) - p.data) / 0.01  # the update O
    for j in range(g):
        block = slice(j * r, (j + 1) * r)
        q = nn.Parameter(W0[block].clone())
        q.grad = G[block].clone()
        Muon([q], lr=0.01).step()
        torch.testing.assert_close(p.data[block], q.data, atol=1e-6, rtol=1e-5)
        s = torch.linalg.svdvals(delta[block] / (0.18 * math.sqrt(max(r, shape[1]))))
        assert (s - 1).abs().max() < 1e-2
    # whole-matrix orthogonalization would differ
    s_whole = torch.linalg.svdvals(delta / (0.18 * math.sqrt(max(r, shape[1]))))
    assert (s_whole - 1).abs().max() > 0.05


def test_weight_decay_is_decoupled():
    W0 = _rand(16, 24, seed=8)
    p = nn.Parameter(W0.clone())
    p.grad = torch.zeros_like(W0)  # zero gradient -> zero orthogonalized update: only the decay acts
    Muon([p], lr=0.5, weight_decay=0.1).step()
    torch.testing.assert_close(p.data, W0 * (1 - 0.5 * 0.1), atol=0, rtol=0)
    # with a gradient: decay does not go through the momentum / orthogonalization
    G = _rand(16, 24, seed=9)
    a, b = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    a.grad, b.grad = G.clone(), G.clone()
    Muon([a], lr=0.1, weight_decay=0.1).step()
    Muon([b], lr=0.1, weight_decay=0.0).step()
    torch.testing.assert_close(a.data - b.data, -0.1 * 0.1 * W0, atol=1e-6, rtol=0)


def test_muon_skips_params_without_grad():
    p = nn.Parameter(_rand(8, 8, seed=1))
    before = p.data.clone()
    opt = Muon([p], lr=0.1)
    opt.step()
    assert torch.equal(p.data, before) and not opt.state


# ---------------------------------------------------------------------------------------- the optimizer pair

def test_build_optimizer_hyperparameters(tiny):
    opt = build_optimizer(tiny, lr=1e-3)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adam_groups = opt.adamw.param_groups
    adam_ids = {id(p) for g in adam_groups for p in g["params"]}
    assert muon_ids | adam_ids == {id(p) for p in tiny.parameters()} and not muon_ids & adam_ids
    mg = opt.muon.param_groups[0]
    assert mg["momentum"] == 0.95 and mg["weight_decay"] == 0.1 and mg["rms_scale"] == 0.18 and mg["nesterov"]
    for g in adam_groups:
        assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-20
    wd = {id(p): g["weight_decay"] for g in adam_groups for p in g["params"]}
    named = dict(tiny.named_parameters())
    assert wd[id(named["embed.weight"])] == 0.1 and wd[id(named["head.weight"])] == 0.1
    assert wd[id(named["layers.0.attn_norm.weight"])] == 0.0 and wd[id(named["hc_head.scale"])] == 0.0
    literal = build_optimizer(tiny, decay_vectors=True)
    assert all(g["weight_decay"] == 0.1 for g in literal.adamw.param_groups)
    # one LR for both
    opt.set_lr(3e-5)
    assert opt.lr == 3e-5 and all(g["lr"] == 3e-5 for g in opt.param_groups)


def _train(model, opt, steps, start=0, schedule=None):
    for s in range(start, start + steps):
        ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(100 + s))
        if schedule is not None:
            opt.set_lr(schedule.lr(s))
        opt.zero_grad()
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()


def _two_layer_config():
    cfg = dsv4.ModelConfig.preset("tiny")
    return dataclasses.replace(cfg, num_hidden_layers=2, layer_types=cfg.layer_types[:2],
                               mlp_layer_types=cfg.mlp_layer_types[:2])


def test_optimizer_fits_one_batch():
    torch.manual_seed(0)
    model = dsv4.Transformer(_two_layer_config())
    opt = build_optimizer(model, lr=3e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1.0


def test_state_dict_resume_is_bit_identical():
    torch.manual_seed(0)
    cfg = _two_layer_config()
    base = dsv4.Transformer(cfg)
    sched = WSDSchedule(peak_lr=1e-3, warmup_steps=2, total_steps=6, decay_steps=2)

    straight = copy.deepcopy(base)
    opt = build_optimizer(straight, lr=1e-3)
    _train(straight, opt, 4, schedule=sched)

    first = copy.deepcopy(base)
    opt1 = build_optimizer(first, lr=1e-3)
    _train(first, opt1, 2, schedule=sched)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = dsv4.Transformer(cfg)
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, lr=123.0)  # lr is overwritten by the state dict / schedule
    opt2.load_state_dict(saved["optim"])
    _train(resumed, opt2, 2, start=2, schedule=sched)

    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    # the run did move the parameters, and both optimizers had state
    assert not torch.equal(straight.embed.weight, base.embed.weight)
    assert opt2.muon.state and opt2.adamw.state


# ------------------------------------------------------------------------------------------------ schedule

def test_wsd_schedule_shape():
    s = WSDSchedule(peak_lr=2.7e-4, warmup_steps=100, total_steps=1000, decay_steps=200, final_ratio=0.1)
    assert s.decay_start == 800
    lrs = [s.lr(t) for t in range(1100)]
    # linear warmup, reaching the peak at its last step
    assert lrs[0] == pytest.approx(2.7e-6)
    assert lrs[49] == pytest.approx(2.7e-4 * 0.5)
    assert lrs[99] == pytest.approx(2.7e-4)
    assert all(b > a for a, b in zip(lrs[:99], lrs[1:100]))
    # plateau
    assert all(v == 2.7e-4 for v in lrs[99:801])
    # cosine decay, monotone, half-way at the midpoint, to 2.7e-5 at the end and held there
    assert all(b < a for a, b in zip(lrs[800:1000], lrs[801:1001]))
    assert lrs[900] == pytest.approx((2.7e-4 + 2.7e-5) / 2)
    assert lrs[1000] == pytest.approx(2.7e-5) and lrs[1099] == pytest.approx(2.7e-5)
    # decay flag and MTP weight
    assert not s.decay_started(799) and s.decay_started(800) and s.decay_started(5000)
    assert mtp_weight(0, s) == 0.3 and mtp_weight(799, s) == 0.3 and mtp_weight(800, s) == 0.1
    assert s(123) == s.lr(123)


def test_wsd_schedule_validation():
    with pytest.raises(ValueError, match="total_steps"):
        WSDSchedule(warmup_steps=10, total_steps=15, decay_steps=10)
    with pytest.raises(ValueError, match="final_ratio"):
        WSDSchedule(final_ratio=2.0)
    with pytest.raises(ValueError, match="step"):
        WSDSchedule().lr(-1)
    assert WSDSchedule(warmup_steps=0, total_steps=10, decay_steps=0).lr(0) == 2.7e-4
