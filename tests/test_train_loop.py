"""The training loop: exact resume, balancing, skipped steps, checkpoint safety."""

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.data.packing import Batch
from dsv4.train.balance import expert_loads, sequence_balance_loss, update_router_bias
from dsv4.train.checkpoint import list_checkpoints, load_checkpoint
from dsv4.train.loop import Trainer, TrainConfig
from dsv4.model.moe import Router, balanced_tid2eid


class Source:
    """Deterministic synthetic batches with a resumable position."""

    def __init__(self, vocab, batch=2, seq=48, seed=0):
        self.vocab, self.batch, self.seq, self.seed, self.pos = vocab, batch, seq, seed, 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.pos)
        self.pos += 1
        tokens = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=g)
        doc_ids = (torch.arange(self.seq + 1) >= (self.seq // 3)).long().expand(self.batch, -1)
        return Batch(tokens, doc_ids, torch.zeros_like(tokens))

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def small_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny").replace(vocab_size=128))


def make_trainer(tmp_path, steps=6):
    model = small_model()
    cfg = TrainConfig(steps=steps, lr=1e-3, warmup_steps=2, val_every=0, ckpt_every=3)
    return Trainer(model, Source(128), cfg, tmp_path, val_batches=[next(Source(128, seed=9))])


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    a = make_trainer(tmp_path / "a")
    a.run(tokens_per_step=96, progress=False)
    b = make_trainer(tmp_path / "b")
    b.cfg.steps = 3
    b.run(tokens_per_step=96, progress=False)
    c = make_trainer(tmp_path / "b")  # a new process: fresh model, optimizer and data
    assert c.resume() == 3
    c.run(tokens_per_step=96, progress=False)
    for (k, x), (_, y) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(x, y), k
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000003", "step-00000006"]


def test_truncated_checkpoint_is_an_error_and_the_previous_survives(tmp_path):
    t = make_trainer(tmp_path, steps=6)
    t.run(tokens_per_step=96, progress=False)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    newest = ckpts[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        make_trainer(tmp_path).resume()
    assert load_checkpoint(ckpts[0], small_model())[1]["step"] == 3
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path / "empty").resume()


def test_non_finite_step_is_skipped(tmp_path):
    t = make_trainer(tmp_path, steps=1)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with torch.no_grad():
        t.model.head.weight[0, 0] = float("nan")
    before["head.weight"][0, 0] = float("nan")
    r = t.train_step()
    assert r.skipped and t.skipped == 1
    for k, v in t.model.state_dict().items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k


def test_bias_update_moves_load_toward_uniform():
    cfg = ModelConfig.preset("tiny").replace(n_routed_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    router = Router(cfg, 1, hashed=False)
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
        router.weight[0] += 0.02  # expert 0 is everyone's favourite
    x = torch.randn(512, cfg.hidden_size).abs()
    def imbalance():
        load = expert_loads(router(x, None), 8)
        return float(load.max() / load.mean())
    start = imbalance()
    for _ in range(300):
        update_router_bias([router], [expert_loads(router(x, None), 8)], speed=1e-2)
    assert start > 2.0 and imbalance() < 1.3


def test_sequence_balance_loss_is_minimal_when_uniform():
    from dsv4.model.moe import RouterOutput

    e, k, t = 4, 2, 8
    uniform = RouterOutput(torch.ones(t, k), torch.tensor([[0, 1], [2, 3]] * 4), torch.ones(t, e))
    skewed = RouterOutput(torch.ones(t, k), torch.tensor([[0, 1]] * 8), torch.tensor([[4.0, 4, 1, 1]] * 8))
    assert sequence_balance_loss(uniform, 1, alpha=1.0) == pytest.approx(1.0)
    assert sequence_balance_loss(skewed, 1, alpha=1.0) > 1.5


def test_tid2eid_is_balanced_and_distinct():
    table = balanced_tid2eid(1000, 16, 6, seed=1)
    assert all(len(set(row.tolist())) == 6 for row in table)
    counts = torch.bincount(table.flatten(), minlength=16)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(table, balanced_tid2eid(1000, 16, 6, seed=1))
