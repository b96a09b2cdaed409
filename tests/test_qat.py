"""FP4 quantization-aware training of the routed experts (spec 6.4): the QAT forward uses exactly the weights of an
official FP4 checkpoint, its gradient reaches the float32 masters straight through, `dsv4 convert` exports them
bit-exactly and `dsv4 eval --fp4 --json` reports both figures."""

import argparse
import copy
import json
import random

import pytest
import torch

import dsv4
from dsv4 import ModelConfig, quant
from dsv4.config import CSA, HASH_MOE, HCA, MOE, SLIDING
from dsv4.convert import convert
from dsv4.evaluate import write_training_meta
from dsv4.train.qat import (enable_fp4_qat, expert_modules, fp4_expert_weights, fp4_qat_enabled,
                            real_fp4_experts)


def small_config(**changes) -> ModelConfig:
    base = dict(vocab_size=256, num_hidden_layers=3, layer_types=[SLIDING, CSA, HCA],
                mlp_layer_types=[HASH_MOE, MOE, MOE], n_routed_experts=4, num_experts_per_tok=2,
                num_nextn_predict_layers=1, hidden_size=64, moe_intermediate_size=96)
    base.update(changes)
    return ModelConfig.preset("tiny").replace(**base)


def make_model(seed: int = 0, **changes) -> dsv4.Transformer:
    torch.manual_seed(seed)
    model = dsv4.Transformer(small_config(**changes))
    with torch.no_grad():  # experts at a scale where FP4 rounding changes the logits visibly, with spread-out blocks
        g = torch.Generator().manual_seed(seed + 1)
        for m in expert_modules(model):
            for w in (m.w1, m.w2, m.w3):
                w.copy_(torch.randn(w.shape, generator=g) * w.shape[-1] ** -0.5
                        * torch.exp(torch.randn(w.shape[:-1] + (w.shape[-1] // 32,), generator=g))
                        .repeat_interleave(32, -1))
    return model


def ids(batch=2, seq=40, seed=3):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def with_fake_quant_experts(model: dsv4.Transformer) -> dsv4.Transformer:
    """A copy whose experts' masters are replaced by fake_quant_fp4 of the original's, QAT off."""
    other = copy.deepcopy(model)
    enable_fp4_qat(other, False)
    with torch.no_grad():
        for m in expert_modules(other):
            for w in (m.w1, m.w2, m.w3):
                w.copy_(quant.fake_quant_fp4(w))
    return other


# ------------------------------------------------------------------------------------------------------ the switch
def test_switch_covers_every_expert_module_and_is_off_by_default():
    model = make_model()
    experts = expert_modules(model)
    assert len(experts) == 3 + 1  # main layers + the MTP block
    assert not fp4_qat_enabled(model) and not any(m.fp4_qat for m in experts)
    assert enable_fp4_qat(model) == 4 and fp4_qat_enabled(model)
    assert "fp4_qat" not in json.dumps(list(model.state_dict()))  # not a tensor of the checkpoint
    enable_fp4_qat(model, on=False)
    assert not fp4_qat_enabled(model)


def test_qat_needs_input_dims_multiple_of_32():
    torch.manual_seed(0)
    model = dsv4.Transformer(small_config(moe_intermediate_size=48))  # w2's input dim
    with pytest.raises(ValueError, match=r"w2 has input dim 48 \(moe_intermediate_size\)"):
        enable_fp4_qat(model)
    assert not fp4_qat_enabled(model)  # nothing switched
    with pytest.raises(ValueError, match="no routed experts"):
        enable_fp4_qat(torch.nn.Linear(4, 4))


def test_qat_weights_are_e2m1_times_per_block_powers_of_two():
    model = make_model()
    enable_fp4_qat(model)
    grid = torch.tensor(quant.E2M1_VALUES)
    for m in expert_modules(model):
        used = m.expert_weights()
        for master, w, shape in zip((m.w1, m.w2, m.w3), used, ((4, 96, 64), (4, 64, 96), (4, 96, 64))):
            assert w.shape == master.shape == shape and w.requires_grad
            blocks = master.detach().unflatten(-1, (-1, 32))  # 1x32 tiles along the input (last) dim
            scale = 2.0 ** torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True) / 6))
            codes = w.detach().unflatten(-1, (-1, 32)) / scale
            assert torch.isin(codes.abs(), grid).all()
            assert (codes.abs().amax(-1) >= 3).all()  # the scale is the smallest that does not clip
            assert ((w.detach() - master.detach()).abs().unflatten(-1, (-1, 32)) <= scale).all()
            assert not torch.equal(w.detach(), master.detach())
            assert torch.equal(w.detach(), quant.mxfp4_dequant(*quant.mxfp4_quant(master.detach())))


def test_fp4_to_fp8_cast_is_exact_for_scales_within_2_to_14_of_the_block_max():
    """The claim of dsv4.train.qat's docstring: E2M1 value x 1x32 scale, divided by the FP8 block scale (the largest
    1x32 scale / 2^6), is an E4M3 number while the 1x32 scale is at least 2^-14 times the largest."""
    grid = torch.tensor(quant.E2M1_VALUES[1:])
    for k in range(20):
        x = grid * 2.0 ** (6 - k)
        assert torch.equal(x.to(torch.float8_e4m3fn).float(), x) == (k <= 14), k


def test_qat_forward_equals_a_model_with_fake_quantized_experts():
    model = make_model()
    reference = with_fake_quant_experts(model)
    enable_fp4_qat(model)
    x = ids()
    with torch.no_grad():
        qat, ref = model(x), reference(x)
        enable_fp4_qat(model, False)
        plain = model(x)
    assert torch.equal(qat, ref)
    assert not torch.allclose(qat, plain, atol=1e-3)  # quantization matters at this scale


def test_gradients_go_straight_through_to_the_masters():
    model = make_model()
    reference = with_fake_quant_experts(model)  # QAT off, evaluated at the fake-quantized weights
    enable_fp4_qat(model)
    x = ids()
    for m in (model, reference):
        m.train()
        out = m.forward_train(x)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) \
            + sum(torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), x[:, 2:].flatten())
                  for lg in out.mtp_logits)
        loss.backward()
    got = dict(model.named_parameters())
    n_experts = 0
    for name, p in reference.named_parameters():
        assert (got[name].grad is None) == (p.grad is None), name
        if p.grad is None:  # the indexer learns from its own loss, not through the top-k
            continue
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
        n_experts += name.endswith(("experts.w1", "experts.w2", "experts.w3"))
    assert n_experts == 12
    assert all(m.w1.grad.abs().sum() > 0 for m in expert_modules(model))


def test_real_fp4_experts_context_restores_the_masters():
    model = make_model()
    enable_fp4_qat(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids()
    with torch.no_grad():
        qat = model(x)
        with real_fp4_experts(model):
            assert not fp4_qat_enabled(model)
            m = expert_modules(model)[0]
            assert torch.equal(m.w1, quant.fake_quant_fp4(before["layers.0.ffn.experts.w1"]))
            fp4 = model(x)
    assert torch.equal(qat, fp4)
    assert fp4_qat_enabled(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------------ convert
def run_cli(module: str, argv: list[str]) -> int:
    """Through `dsv4 <command>` when it is registered, else the module's own add_arguments / run."""
    import importlib

    from dsv4.cli import COMMANDS, main

    name = {"dsv4.convert": "convert", "dsv4.evaluate": "eval"}[module]
    if name in COMMANDS:
        return main([name, *argv])
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    return mod.run(parser.parse_args(argv))


def test_convert_to_official_and_back_reproduces_the_qat_weights(tmp_path, capsys):
    model = make_model()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"stand-in": true}')
    assert run_cli("dsv4.convert", ["--to", "official", "--model", str(tmp_path / "hf"),
                                    "--out", str(tmp_path / "official"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["experts"] == "fp4" and "tokenizer.json" in record["files"]
    stored = dsv4.weights.read_tensors(tmp_path / "official")
    assert stored["layers.1.ffn.experts.0.w2.weight"].dtype == torch.int8
    assert tuple(stored["layers.1.ffn.experts.0.w2.scale"].shape) == (64, 96 // 32)
    assert (tmp_path / "official" / "tokenizer.json").read_text() == '{"stand-in": true}'
    loaded = dsv4.from_pretrained(tmp_path / "official", dtype=torch.float32)  # materialized
    for want, got in zip(expert_modules(model), expert_modules(loaded)):
        for w, g in zip(fp4_expert_weights(want), (got.w1, got.w2, got.w3)):
            assert torch.equal(w, g)
    # back to HF (plain floats), in place: the FP4 values survive exactly, and so does the tokenizer
    convert(tmp_path / "official", tmp_path / "official", to="hf")
    back = dsv4.from_pretrained(tmp_path / "official")
    assert "quantization_config" not in json.loads((tmp_path / "official" / "config.json").read_text())
    assert (tmp_path / "official" / "tokenizer.json").exists()
    for a, b in zip(loaded.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_fp4_only_export_gives_the_qat_logits(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "fp4", to="official", fp8=False, fp4_experts=True)
    loaded = dsv4.from_pretrained(tmp_path / "fp4", dtype=torch.float32, numerics="plain")
    enable_fp4_qat(model)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_convert_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "nowhere", tmp_path / "out")
    make_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a model directory"):
        convert(tmp_path / "hf", tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"
    # through the `dsv4` command a ValueError is a clear message on stderr and exit status 2
    assert run_cli("dsv4.convert", ["--to", "official", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                                    "--experts", "fp8", "--no-fp8"]) == 2
    assert "--no-fp8" in capsys.readouterr().err
    assert run_cli("dsv4.convert", ["--to", "hf", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                                    "--experts", "fp8"]) == 2
    assert "official only" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- eval
WORDS = "the of a to in and is was for on that with as by at it from this be are or an which".split()


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny corpus, its tokenizer and a small model saved as `dsv4 train` leaves it (marked as QAT-trained)."""
    from dsv4.data import train_bpe

    root = tmp_path_factory.mktemp("qat_eval")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.choice([40, 120, 300])))
                                                + "\n", encoding="utf-8")
    tok = train_bpe(corpus, 300)
    model = make_model(vocab_size=tok.vocab_size)
    model.save_pretrained(root / "model")
    tok.save(root / "model")
    write_training_meta(root / "model", fp4_qat=True, seq_len=32, batch_size=8, val_fraction=0.1, seed=0)
    return root


def test_eval_json_reports_both_figures(trained_dir, capsys):
    argv = ["--model", str(trained_dir / "model"), "--data", str(trained_dir / "corpus"), "--fp4", "--json",
            "--cache", str(trained_dir / "cache")]
    assert run_cli("dsv4.evaluate", argv) == 0
    out = capsys.readouterr().out
    record = json.loads(out)  # exactly one JSON object on stdout
    assert out.strip().count("\n") == 0
    assert record["fp4_qat"] is True and record["seq_len"] == 32 and record["batch_size"] == 8
    assert record["tokens"] > 0 and record["batches"] >= 1
    for k in ("val_loss", "val_bits_per_byte", "fp4_val_loss", "fp4_val_bits_per_byte", "float_val_loss"):
        assert 0 < record[k] < 20, k
    # trained with QAT: the real FP4 experts are the weights the QAT forward used, every prediction stays
    assert abs(record["fp4_rel_diff"]) < 1e-6
    assert record["fp4_kl"] == pytest.approx(0, abs=1e-9) and record["fp4_top1_agreement"] == 1.0
    # the same model taken as a float model and quantized afterwards: FP4 changes its loss
    assert run_cli("dsv4.evaluate", argv + ["--qat", "off"]) == 0
    post = json.loads(capsys.readouterr().out)
    assert post["fp4_qat"] is False and abs(post["fp4_rel_diff"]) > 1e-4
    assert post["fp4_kl"] > 1e-6 and post["fp4_top1_agreement"] <= 1.0  # the predictions moved
    assert post["val_loss"] == pytest.approx(record["float_val_loss"], rel=1e-6)
    assert post["fp4_val_loss"] == pytest.approx(record["fp4_val_loss"], rel=1e-6)
    assert post["tokens"] == record["tokens"]


def test_eval_without_data_or_tokenizer_is_a_clear_error(trained_dir, tmp_path, capsys):
    model = make_model()
    model.save_pretrained(tmp_path / "m")
    assert run_cli("dsv4.evaluate", ["--model", str(tmp_path / "m"), "--data", str(trained_dir / "corpus")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert run_cli("dsv4.evaluate", ["--model", str(tmp_path / "m")]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_indexer_fp4_path_quantizes_rotated_queries_and_keys_with_straight_through_gradient():
    import torch

    from dsv4 import ModelConfig, Transformer
    from dsv4.quant import E2M1_VALUES, hadamard
    from dsv4.train.qat import enable_indexer_fp4

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=100))
    att = model.layers[1].attn
    x = torch.randn(1, 40, model.config.hidden_size)
    latent = att.q_norm(att.wq_a(x))
    positions = torch.arange(40)
    q_plain, _ = att.indexer.queries(x, latent, positions, att.rotary)
    keys_plain = att.indexer.keys(x, att.rotary, None)
    assert enable_indexer_fp4(model) == 2
    q, _ = att.indexer.queries(x, latent, positions, att.rotary)
    keys = att.indexer.keys(x, att.rotary, None)
    grid = torch.tensor(E2M1_VALUES)
    for t in (q.reshape(-1, 32), keys.reshape(-1, 32)):  # each 1x32 block: E2M1 values times a power of two
        scale = t.abs().amax(-1, keepdim=True) / 6
        scale = torch.where(scale > 0, 2 ** torch.ceil(torch.log2(scale)), torch.ones_like(scale))
        v = (t / scale).abs().unsqueeze(-1)
        assert torch.isclose(v, grid).any(-1).all()
    # both are rotated, then quantized: q . k keeps its meaning only if queries and keys get the same rotation
    assert torch.equal(q, quant.fake_quant_fp4(hadamard(q_plain)))
    assert torch.equal(keys, quant.fake_quant_fp4(hadamard(keys_plain)))
    # the rotation is orthogonal: quantization is the only change to the dot products
    assert (hadamard(q_plain) - q).abs().max() < 0.5 * q_plain.abs().max()
    assert torch.allclose((hadamard(q_plain) * hadamard(q_plain)).sum(-1), (q_plain * q_plain).sum(-1), atol=1e-4)
    q.sum().backward()
    assert att.indexer.wq_b.weight.grad is not None and att.indexer.wq_b.weight.grad.abs().max() > 0


@pytest.mark.parametrize("field, value, message", [("seq_len", True, "--seq-len must be a positive integer"),
                                                   ("batch_size", 0, "--batch-size must be a positive integer"),
                                                   ("val_fraction", None, "--val-fraction must be in (0, 1)"),
                                                   ("val_fraction", True, "--val-fraction must be in (0, 1)")])
def test_eval_rejects_bad_training_meta_clearly(trained_dir, tmp_path, capsys, field, value, message):
    """A hand-edited training.json with a boolean size or a null fraction is a clear error, not a TypeError."""
    model = make_model()
    model.save_pretrained(tmp_path / "m")
    meta = dict(seq_len=32, batch_size=8, val_fraction=0.1, seed=0)
    meta[field] = value
    write_training_meta(tmp_path / "m", **meta)
    assert run_cli("dsv4.evaluate", ["--model", str(tmp_path / "m"), "--data", str(trained_dir / "corpus")]) == 2
    assert message in capsys.readouterr().err
