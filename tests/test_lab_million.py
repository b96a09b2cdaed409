"""The ``million`` lab (dsv4.lab.million) in its --quick mode end to end, its saved model reused, its top-k probe
held to the model's own choice, and the retrieval data it trains on (dsv4.data.retrieval)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsv4.data.retrieval import RetrievalLoader, RetrievalVocab, needle_context, question
from dsv4.lab import million
from dsv4.lab.common import DOES_NOT_HOLD, LabOptions, json_safe


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("million")
    options = LabOptions(quick=True, out=out, log=lambda msg: None)
    return out, million.run(options)


def test_quick_run_reports_every_figure(quick):
    _, r = quick
    assert set(r["accuracy"]) == {"1024", "2048"}
    assert all(0 <= a <= 1 for a in r["accuracy"].values())
    assert r["longest"] == 2048 and r["prefill_seconds"] > 0 and r["decode_ms_per_token"] > 0
    assert 0 < r["peak_rss_gib"] < 4
    # the cache holds what the cost model counts (float32), plus the compressors' incomplete blocks
    assert r["cost_model_cache_bytes"] <= r["cache_bytes"] <= 1.1 * r["cost_model_cache_bytes"]
    assert r["dense_cache_bytes"] == 3 * 2048 * 32 * 4 and r["cache_bytes"] < r["dense_cache_bytes"]
    # 1024 tokens hold 256 CSA entries, more than the quick top-k of 16: every question probes the indexer
    assert r["per_length"]["1024"]["topk_probes"] == 4 and 0 <= r["topk_hit_rate"] <= 1
    # values at +2 .. +8 of a needle: entries (p + 2) // 4 .. (p + 8) // 4 + 1, three or four a needle
    assert 3 * 4 <= r["needle_entries_by_length"]["1024"] <= 4 * 4
    assert len(r["per_length"]["2048"]["questions"]) == r["questions_per_length"] == 4
    assert r["train_steps"] == million.QUICK.steps and len(r["training"]["accuracy"]) == million.QUICK.steps
    assert r["training"]["seq_len"][0] == 64 and r["training"]["seq_len"][-1] == 128  # the stages
    assert r["verdict"] == DOES_NOT_HOLD and "1,048,576 tokens were not evaluated" in r["reason"]
    assert not r["model_reused"]


def test_plot_and_figures_read_the_saved_json(quick):
    out, r = quick
    saved = json.loads(json.dumps(json_safe(r)))  # what run_lab writes and the docs read back
    (path,) = million.plot(saved, out / "million")
    assert path.exists() and path.stat().st_size > 1000
    rows = dict(million.figures(saved))
    assert rows["accuracy at 2048 tokens"] == r["accuracy"]["2048"] and "dense_cache_bytes" in rows


def test_the_saved_model_is_reused(quick):
    out, first = quick
    options = LabOptions(quick=True, out=out, log=lambda msg: None)
    options.lengths = "1K"
    again = million.run(options)
    assert again["model_reused"] and list(again["accuracy"]) == ["1024"]
    assert again["command"] == "python -m dsv4.lab.million --quick --lengths 1K"
    assert again["per_length"]["1024"]["questions"] == first["per_length"]["1024"]["questions"]


def test_bad_options_are_refused_by_name(tmp_path, capsys):
    def settings(**kw):
        options = LabOptions(quick=True, out=tmp_path)
        for k, v in kw.items():
            setattr(options, k, v)
        return million.settings_of(options)

    assert settings(lengths="1K,2K").lengths == [1024, 2048]
    assert million.settings_of(LabOptions()).lengths == [16384, 131072, 1 << 20]
    with pytest.raises(ValueError, match="--lengths"):
        settings(lengths="12Q")
    with pytest.raises(ValueError, match="context length 9000"):
        settings(lengths="9000")  # beyond the quick model's max_position_embeddings
    with pytest.raises(ValueError, match="--questions"):
        settings(questions=40)
    with pytest.raises(ValueError, match="--prefill-chunk"):
        settings(prefill_chunk=0)
    assert million.main(["--quick", "--lengths", "1M", "--out", str(tmp_path)]) == 2
    assert "context length 1048576" in capsys.readouterr().err


def test_the_probe_sees_the_indexers_own_choice(monkeypatch):
    import dsv4.model.decode as decode

    torch.manual_seed(0)
    model = __import__("dsv4").Transformer(million.lab_config(million.QUICK)).eval()
    chosen = []
    original = decode.topk_lower_index
    monkeypatch.setattr(decode, "topk_lower_index", lambda s, k: chosen.append(original(s, k)) or chosen[-1])
    vocab = RetrievalVocab()
    tokens, needles = needle_context(400, 4, vocab, np.random.default_rng(0))
    probe = million.TopkProbe(model)
    with torch.inference_mode():
        cache = model.new_cache(1)
        model(torch.from_numpy(tokens)[None], cache=cache)
        for token in question(needles[0], vocab):
            probe.armed = True
            model(torch.tensor([[token]]), cache=cache)
    probe.armed = False
    v = needles[0].value_positions[0]
    hits = probe.hits([v // 4, v // 4 + 1])
    assert len(hits) == 1 and probe.picks[0] == set(chosen[-1].flatten().tolist())
    assert hits[0] == (v // 4 in probe.picks[0] or v // 4 + 1 in probe.picks[0])
    probe.close()


def test_retrieval_rows_hold_their_answers():
    vocab = RetrievalVocab(keys=16, values=8, repeats=2)
    loader = RetrievalLoader(vocab, batch_size=3, seq_len=256, seed=1, tokens_per_needle=32, asked=0.5)
    batch = next(loader)
    assert batch.tokens.shape == (3, 257) and loader.n_needles == 8 and loader.n_questions == 4
    for row, mask in zip(batch.tokens.tolist(), batch.answer_mask.tolist()):
        answers = [i for i, m in enumerate(mask) if m]
        assert len(answers) == 4
        for i in answers:  # QUERY key value, and the needle NEEDLE key value earlier in the row
            assert row[i - 2] == vocab.query and vocab.is_value(row[i])
            needle = [j for j in range(i - 2) if row[j] == vocab.needle and row[j + 1] == row[i - 1]]
            assert len(needle) == 1 and row[needle[0] + 2] == row[i]
        context = row[:answers[0] - 2]
        keys = [context[j + 1] for j in range(len(context)) if context[j] == vocab.needle]
        assert len(keys) == len(set(keys)) == 8 and max(context) < vocab.size
        assert sum(t < 256 for t in context) == len(context) - vocab.needle_tokens * 8  # the rest is filler
    assert batch.answer_targets.shape == batch.inputs.shape
    state = loader.state_dict()
    after = next(loader)
    loader.load_state_dict(state)
    assert torch.equal(next(loader).tokens, after.tokens) and not torch.equal(after.tokens, batch.tokens)


def test_needle_contexts_and_their_errors():
    vocab = RetrievalVocab()
    tokens, needles = needle_context(1000, 5, vocab, np.random.default_rng(3))
    assert len(tokens) == 1000 and [n.position // 200 for n in needles] == list(range(5))
    for n in needles:
        pair = [vocab.key(n.key), vocab.value(n.value)]
        assert list(tokens[n.position:n.position + 9]) == [vocab.needle] + pair * 4 and n.length == 9
        assert n.value_positions == [n.position + 2, n.position + 4, n.position + 6, n.position + 8]
    with pytest.raises(ValueError, match="needles per context"):
        needle_context(1000, 33, vocab, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no room"):
        needle_context(10, 5, vocab, np.random.default_rng(0))
    with pytest.raises(ValueError, match="RetrievalVocab.keys"):
        RetrievalVocab(keys=1)
    with pytest.raises(ValueError, match="RetrievalVocab.repeats"):
        RetrievalVocab(repeats=0)


def test_retrieval_rows_keep_their_needles_out_of_the_gap():
    # the lab's rows: needles only before the last ``gap`` context tokens, so that the sliding window (no wider
    # than the gap) cannot reach them from the questions
    vocab = RetrievalVocab()
    loader = RetrievalLoader(vocab, batch_size=4, seq_len=256, seed=2, tokens_per_needle=16, gap=128)
    assert loader.n_needles == 8
    batch = next(loader)
    for row, mask in zip(batch.tokens.tolist(), batch.answer_mask.tolist()):
        first_question = min(i for i, m in enumerate(mask) if m) - 2
        last_needle_token = max(i for i, t in enumerate(row[:first_question]) if t >= 256)
        assert first_question - last_needle_token > 128
    with pytest.raises(ValueError, match="gap"):
        RetrievalLoader(vocab, batch_size=1, seq_len=256, gap=200)
    with pytest.raises(ValueError, match="no room"):
        RetrievalLoader(vocab, batch_size=1, seq_len=64, tokens_per_needle=1, gap=32).__next__()


def test_prefill_extrapolation_adds_the_fitted_line_to_the_measured_chunks():
    # the first chunk (no past) left out of the fit; chunks growing 0.5 s a chunk: measured, then the line onward
    seconds = [9.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    got = million.extrapolate_prefill(seconds, 100, 1200)
    assert got == pytest.approx(sum(seconds) + 5.0 + 5.5 + 6.0 + 6.5)
    assert million.extrapolate_prefill(seconds, 100, 800) == pytest.approx(sum(seconds))
    assert million.extrapolate_prefill(seconds[:3], 100, 1200) is None
