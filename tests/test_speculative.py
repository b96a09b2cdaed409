"""Speculative decoding with the MTP block: the draft test keeps the target distribution, greedy output is plain
greedy output, the cache snapshot undoes rejected drafts."""

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.generate import accept_draft, generate, speculative_stream, stream
from lively import lively


def tiny(**changes):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=257, **changes)
    torch.manual_seed(0)
    return lively(Transformer(cfg).eval())


def test_the_draft_test_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2])  # drafts where p is small, and where p is 0
    n, counts, kept = 20000, torch.zeros(5), 0
    for d in torch.multinomial(q, n, replacement=True, generator=g).tolist():
        ok, token = accept_draft(p, q, d, g)
        counts[token] += 1
        kept += ok
    assert (counts / n - p).abs().max() < 0.015  # the output follows p, not q
    assert abs(kept / n - torch.minimum(p, q).sum()) < 0.015  # kept with probability sum min(p, q)
    one_hot = torch.eye(5)
    assert accept_draft(one_hot[2], one_hot[2], 2) == (True, 2)  # greedy: kept iff it is the target's argmax
    assert accept_draft(one_hot[1], one_hot[2], 2) == (False, 1)


def test_greedy_speculative_decoding_is_greedy_decoding():
    model = tiny()
    with torch.no_grad():  # an LM head that reads one direction: the MTP block's drafts then agree now and then
        model.head.weight.zero_()
        model.head.weight[7].normal_(generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(0, 257, (1, 23), generator=torch.Generator().manual_seed(2))
    plain = generate(model, prompt, 40, temperature=0)[0, 23:].tolist()
    stats = {}
    spec = [int(t) for t in speculative_stream(model, prompt, 40, temperature=0, stats=stats)]
    assert spec == plain
    assert 0 < stats["accepted"] < stats["drafts"] <= stats["calls"]  # drafts kept and rejected both
    assert 40 <= 1 + stats["calls"] + stats["accepted"] <= 41  # one token per call, two for a kept draft
    stop = plain[9]
    ended = [int(t) for t in speculative_stream(model, prompt, 40, temperature=0, stop=lambda t: t == stop)]
    assert ended == plain[:plain.index(stop) + 1]


def test_random_drafts_are_undone_and_the_output_stays_the_models():
    model = tiny()  # untrained: its drafts are nearly always rejected, and calls without a draft take over
    prompt = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(3))
    plain = generate(model, prompt, 30, temperature=0, prefill_chunk=16)[0, 40:].tolist()
    stats = {}
    spec = [int(t) for t in speculative_stream(model, prompt, 30, temperature=0, prefill_chunk=16, stats=stats,
                                               max_pending=3)]
    assert spec == plain and stats["drafts"] < stats["calls"]
    sampled = [int(t) for t in speculative_stream(model, prompt, 30, temperature=1.0, seed=4)]
    again = [int(t) for t in speculative_stream(model, prompt, 30, temperature=1.0, seed=4)]
    assert sampled == again and len(sampled) == 30 and all(0 <= t < 257 for t in sampled)


def test_speculative_decoding_refuses_what_it_cannot_do():
    model = tiny()
    prompt = torch.randint(0, 257, (2, 5))
    with pytest.raises(ValueError, match="one prompt row"):
        list(speculative_stream(model, prompt, 3))
    with pytest.raises(ValueError, match="MTP"):
        list(speculative_stream(tiny(num_nextn_predict_layers=0), prompt[:1], 3))
    assert list(speculative_stream(model, prompt[:1], 0)) == [] == list(stream(model, prompt[:1], 0))


def test_the_benchmark_measures_both_ways():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from speculative import measure

    r = measure(tiny(), torch.randint(0, 257, (1, 12)), 6, 0.0, runs=1)
    assert r["greedy_identical"] and r["tokens"] == 6 and r["speedup"] > 0
    assert 0 <= r["acceptance"] <= 1 and 1 <= r["tokens_per_call"] <= 2


def test_the_benchmark_times_the_parts_of_a_call():
    """``--parts``: the plain step, the check and the draft timed on a row of the given length (eager here; the
    benchmark compiles them), and the break-even their ratio."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from speculative import parts

    r = parts(tiny(), 40, repeats=3, compile=False)
    assert r["context"] == 40 and min(r["plain_step_ms"], r["check_ms"], r["draft_ms"]) > 0
    assert r["break_even_tokens_per_call"] == pytest.approx((r["check_ms"] + r["draft_ms"]) / r["plain_step_ms"])
    assert r["direct"] == {"plain": False}
