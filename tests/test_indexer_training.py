"""Indexer training (spec 6.6): its KL loss, the isolation of its gradients, and the dense -> warm-up -> sparse
schedule."""

import math

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.data.packing import Batch
from dsv4.model.indexer import indexer_kl, indexer_recall
from dsv4.train.loop import Trainer, TrainConfig, lm_losses
from numerics import assert_close_scaled


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=200, num_hidden_layers=2,
                                             layer_types=["compressed_sparse_attention", "sliding_attention"],
                                             mlp_layer_types=["moe", "moe"], index_topk=4)
    return Transformer(cfg)


def batch(seed=0, n=2, t=96):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 200, (n, t + 1), generator=g)
    return Batch(tokens, torch.zeros_like(tokens), torch.arange(t + 1).expand(n, -1))


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}


@pytest.mark.parametrize("sparse", [True, False])
def test_kl_reaches_only_the_indexer_and_lm_loss_never_does(sparse):
    model = tiny_model()
    model.set_indexer_phase(sparse=sparse, train_indexer=True)
    losses = lm_losses(model, batch(), 1e-4)
    assert losses.indexer_kl is not None and losses.indexer_kl > 0
    from_kl = grads(model, losses.indexer_kl)
    assert from_kl and all(".indexer." in n for n in from_kl), sorted(from_kl)
    from_lm = grads(model, losses.lm + 0.3 * losses.mtp + losses.balance)
    assert not any(".indexer." in n for n in from_lm)
    assert "layers.0.attn.wq_a.weight" in from_lm


def test_unpacked_batch_trains_the_indexer_in_every_phase():
    """Rows without document ids (one document each: the visible entries shared across the batch) give each row
    its own KL, in the dense phase too: the batch's loss is the mean of the rows' losses."""
    model = tiny_model()
    ids = torch.randint(0, 200, (2, 96), generator=torch.Generator().manual_seed(3))
    for sparse in (False, True):
        model.set_indexer_phase(sparse=sparse, train_indexer=True)
        both = model.forward_train(ids).indexer_kl
        rows = [model.forward_train(ids[r:r + 1]).indexer_kl for r in range(2)]
        assert both is not None and float(both.detach()) > 0
        assert_close_scaled(both.detach().double(), (sum(rows) / 2).detach().double(), 1e-5)


def test_kl_is_zero_when_the_indexer_matches_the_target():
    p = torch.tensor([[[0.5, 0.25, 0.25, 0.0]]])
    cand = torch.tensor([[[True, True, True, False]]])
    scores = torch.log(torch.tensor([[[0.5, 0.25, 0.25, 1.0]]]))
    kl, n = indexer_kl(p, scores, cand)
    assert n == 1 and abs(float(kl)) < 1e-6
    kl2, _ = indexer_kl(p, torch.zeros(1, 1, 4), cand)
    assert float(kl2) > 0.01
    hits, rows = indexer_recall(torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]), torch.tensor([[[0.1, 0.9, 0.8, 0.0]]]),
                                torch.ones(1, 1, 4, dtype=torch.bool), 2)
    assert rows == 1 and hits == 0.5


def test_dense_attention_sees_every_visible_entry():
    """In the dense phase the CSA layer equals a CSA layer whose top-k covers every entry (two computation orders:
    float64, within 1e-9 scaled)."""
    model = tiny_model().double().eval()
    ids = batch().inputs
    with torch.no_grad():
        model.set_indexer_phase(sparse=False, train_indexer=False)
        dense = model(ids)
        for layer in model.layers:
            if layer.attn.indexer is not None:
                layer.attn.indexer.topk = 10 ** 6
        model.set_indexer_phase(sparse=True, train_indexer=False)
        everything = model(ids)
    assert dense.dtype == torch.float64
    assert_close_scaled(everything, dense)


class Source:
    def __init__(self):
        self.pos = 0

    def __next__(self):
        self.pos += 1
        return batch(self.pos)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_phases_switch_at_the_configured_steps(tmp_path):
    model = tiny_model()
    cfg = TrainConfig(steps=7, lr=1e-3, warmup_steps=1, dense_steps=2, indexer_warmup_steps=3, val_every=0,
                      ckpt_every=0)
    trainer = Trainer(model, Source(), cfg, tmp_path)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." not in n}
    phases, recalls = [], []
    for step in range(7):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        r = trainer.train_step()
        phases.append(r.phase)
        recalls.append(r.indexer_recall)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        if r.phase == "warmup":  # only the indexer moves
            assert changed and all(".indexer." in n for n in changed)
        else:
            assert any(".indexer." not in n for n in changed)
    assert phases == ["dense"] * 2 + ["warmup"] * 3 + ["sparse"] * 2
    assert all(not math.isnan(x) for x in recalls[:5]) and all(math.isnan(x) for x in recalls[5:])
    assert frozen  # (sanity: there are non-indexer parameters)
