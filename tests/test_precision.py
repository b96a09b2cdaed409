"""The model in bfloat16 (forward and cached decoding), the bf16 autocast training path with float32 masters, and
the indexer statistics of a call belonging to that call alone (#17: tests for what was untested)."""

import torch

from dsv4 import ModelConfig, Transformer
from dsv4.data.packing import Batch
from dsv4.train.loop import Trainer, TrainConfig

VOCAB = 128


def tiny(dtype=torch.float32, seed=0, **changes):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB, **changes)).eval().to(dtype)


def ids_of(b, s, seed=0):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_bf16_forward_tracks_float32_and_decoding_tracks_the_bf16_forward():
    f32, b16 = tiny(torch.float32), tiny(torch.bfloat16)
    ids = ids_of(2, 60)
    with torch.no_grad():
        want, got = f32(ids), b16(ids)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()  # logits come back in float32
        # bf16 weights and activations: the same function up to bf16 rounding (~2^-8 relative per step); a few
        # positions move more where rounding flips a near-tie of CSA's top-k, which picks other entries
        cos = torch.nn.functional.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1)
        assert cos.median() > 0.999 and cos.min() > 0.95, cos
        cache = b16.new_cache(2)  # prefill then one token at a time, in bf16
        parts = [b16(ids[:, :40], cache=cache)] + [b16(ids[:, t:t + 1], cache=cache) for t in range(40, 60)]
        steps = torch.cat(parts, dim=1)
        cos = torch.nn.functional.cosine_similarity(steps.flatten(0, 1), got.flatten(0, 1), dim=-1)
        assert cos.median() > 0.999 and cos.min() > 0.95, cos
        assert (steps.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


class Source:
    def __init__(self, seed=0):
        self.seed, self.pos = seed, 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.pos)
        self.pos += 1
        tokens = torch.randint(0, VOCAB, (2, 33), generator=g)
        return Batch(tokens, torch.zeros_like(tokens), torch.zeros_like(tokens))

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_autocast_training_keeps_float32_masters_and_learns(tmp_path):
    model = tiny(torch.float32).train()
    records = []
    cfg = TrainConfig(steps=4, lr=3e-3, warmup_steps=1, val_every=0, ckpt_every=0, autocast_bf16=True)
    trainer = Trainer(model, Source(), cfg, tmp_path, log=records.append)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.run(tokens_per_step=64, progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # masters stay float32 under autocast
    assert len(records) == 4 and all(r["loss"] is not None and r["loss"] > 0 for r in records)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("experts" in k for k in changed) and any("attn.wq_a" in k for k in changed)


def test_indexer_statistics_belong_to_their_call():
    """forward_train returns the statistics of that very call: a second call's are its own (not accumulated, not
    left over), and inference calls produce none."""
    model = tiny(torch.float64, index_topk=4).train().set_indexer_phase(sparse=False, train_indexer=True)
    csa = sum(1 for layer in model.layers if layer.attn.indexer is not None)
    a, b = model.forward_train(ids_of(1, 64, seed=1)), model.forward_train(ids_of(1, 64, seed=2))
    assert len(a.indexer_stats) == len(b.indexer_stats) == csa > 0
    assert not torch.equal(a.indexer_kl, b.indexer_kl)
    again = model.forward_train(ids_of(1, 64, seed=1))
    torch.testing.assert_close(again.indexer_kl, a.indexer_kl, rtol=1e-12, atol=0)  # nothing carried over
    with torch.no_grad():
        model.eval()
        assert model.forward_train(ids_of(1, 64, seed=1)).indexer_stats == []  # eval mode reports none
