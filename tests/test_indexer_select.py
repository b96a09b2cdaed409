"""The long prefill's fused score-and-select (``dsv4.model.indexer.select_topk``: index scores tile by tile into a
running top-k) against the reference (``chunk_scores`` -> mask -> ``topk_lower_index``): the same picks, exactly,
ties included (on integer-valued inputs every sum is exact in float32 whatever its order, and ties abound); and a
model's prefill through it against the reference path in float64."""

import pytest
import torch

from dsv4.model import prefill
from dsv4.model.indexer import chunk_scores, select_topk, topk_lower_index, visible_entries
from numerics import assert_close_scaled
from test_fast_attention import model_for


def reference_picks(q, w, keys_t, k, tail_from=0, tail=None, round_fn=None):
    scores = chunk_scores(q, w, keys_t)
    if round_fn is not None:
        scores = round_fn(scores)
    if tail is not None:
        scores[..., tail_from:].masked_fill_(~tail, float("-inf"))
    idx = topk_lower_index(scores, k)
    return scores.gather(-1, idx), idx


def integer_inputs(b, nq, h, c, t, seed, spread=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-spread, spread + 1, (b, nq, h, c), generator=g).float()
    w = torch.randint(-2, 3, (b, nq, h), generator=g).float()
    keys_t = torch.randint(-spread, spread + 1, (b, c, t), generator=g).float()
    return q, w, keys_t


def assert_same_picks(got, want):
    (gv, gi), (wv, wi) = got, want
    finite = wv > float("-inf")
    # the picks of visible entries are the same entries (-inf picks, fewer than k visible, are arbitrary)
    assert torch.equal(finite, gv > float("-inf"))
    key = lambda v, i: torch.where(v > float("-inf"), i, -1).sort(-1).values  # noqa: E731
    assert torch.equal(key(gv, gi), key(wv, wi))
    order_g, order_w = gi.argsort(-1), wi.argsort(-1)
    assert torch.equal(torch.where(finite, gv, 0).gather(-1, order_g).sort(-1).values,
                       torch.where(finite, wv, 0).gather(-1, order_w).sort(-1).values)


@pytest.mark.parametrize("b, h, c, t, k, tile", [(1, 4, 8, 3000, 64, 256), (2, 2, 16, 1500, 100, 128),
                                                 (1, 1, 4, 700, 512, 128), (1, 3, 2, 5000, 37, 512)])
def test_select_topk_equals_the_reference_picks_ties_included(b, h, c, t, k, tile):
    q, w, keys_t = integer_inputs(b, 24, h, c, t, seed=t)
    got = select_topk(q, w, keys_t, k, tile=tile)
    want = reference_picks(q, w, keys_t, k)
    assert_same_picks(got, want)
    # ties are what the rule decides: integer scores repeat, so many rows tie at their k-th
    vals = chunk_scores(q, w, keys_t)
    kth = want[0].amin(-1, keepdim=True)
    assert bool(((vals >= kth).sum(-1) > k).any())


def test_select_topk_with_a_causal_tail_and_rounding():
    # a prefill block: entries past ``first`` visible to the later queries only; bf16-rounded scores tie more
    from dsv4.model.numerics import round_scores

    rate, nq, t = 4, 32, 1200
    positions = torch.arange(4800 - nq, 4800)
    first = int(positions[0] + 1) // rate
    tail = visible_entries(positions, torch.arange(first, t), rate).unsqueeze(0)
    q, w, keys_t = integer_inputs(1, nq, 2, 8, t, seed=5, spread=20)
    for round_fn in (None, round_scores):
        got = select_topk(q, w, keys_t, 50, round_fn, first, tail, tile=128)
        assert_same_picks(got, reference_picks(q, w, keys_t, 50, first, tail, round_fn))


@pytest.mark.parametrize("t", [300, 3001])
def test_select_topk_when_fewer_entries_are_visible_than_it_picks(t):
    # 300 entries: fewer groups of 16 than picks (one top-k over all); 3001: the groups' path, the last one padded
    q, w, keys_t = integer_inputs(1, 8, 2, 4, t, seed=2)
    tail = torch.zeros(1, 8, t, dtype=torch.bool)
    tail[..., :20] = True  # 20 visible, 64 picked: the rest are -inf
    got = select_topk(q, w, keys_t, 64, None, 0, tail, tile=64)
    assert_same_picks(got, reference_picks(q, w, keys_t, 64, 0, tail))
    assert int((got[0] > float("-inf")).sum(-1).max()) <= 20
    assert 0 <= int(got[1].min()) and int(got[1].max()) < t  # -inf picks too index real entries (gathered)


def test_select_topk_groups_path_without_tied_groups(monkeypatch):
    # integers spread wide: exact sums, few rows tied at their k-th group maximum, so most rows take the groups'
    # path (the rows over every score are counted: some, not all)
    import dsv4.model.indexer as indexer

    q, w, keys_t = integer_inputs(1, 64, 2, 8, 4000, seed=9, spread=300)
    calls = []
    original = indexer.topk_lower_index
    monkeypatch.setattr(indexer, "topk_lower_index", lambda x, k: calls.append(x.shape[0]) or original(x, k))
    got = select_topk(q, w, keys_t, 200)
    assert_same_picks(got, reference_picks(q, w, keys_t, 200))
    assert len(calls) == 1 or calls[1] < 64  # the candidates' top-k, then the tied rows (if any): fewer than all


def test_select_topk_on_float_scores_in_float64():
    g = torch.Generator().manual_seed(0)
    q, w, keys_t = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((1, 40, 4, 16), (1, 40, 4),
                                                                                 (1, 16, 4000)))
    gv, gi = select_topk(q, w, keys_t, 300, tile=512)
    wv, wi = reference_picks(q, w, keys_t, 300)
    assert torch.equal(gi.sort(-1).values, wi.sort(-1).values)
    assert_close_scaled(gv.sort(-1).values, wv.sort(-1).values)


@pytest.mark.parametrize("h, t, k", [(4, 3000, 64), (3, 5000, 37), (8, 2100, 512)])
def test_the_fused_scores_pick_what_the_operators_pick(monkeypatch, h, t, k):
    # without autograd (fused.serves) chunk_scores' tiled case (64 queries or more, over 2048 entries) and
    # select_topk make their scores with fused.index_scores; on integer inputs every sum is exact in either order,
    # so the picks are the operators', ties included
    from dsv4.model import fused

    if not fused.available():
        pytest.skip("the fused kernel could not be built here")
    q, w, keys_t = integer_inputs(1, 64, h, 16, t, seed=h + t)
    want_scores, want = chunk_scores(q, w, keys_t), reference_picks(q, w, keys_t, k)  # autograd on: the operators
    calls = []
    original = fused.index_scores
    monkeypatch.setattr(fused, "index_scores", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with torch.no_grad():
        assert torch.equal(chunk_scores(q, w, keys_t), want_scores)
        assert_same_picks(select_topk(q, w, keys_t, k), want)
        assert_same_picks(reference_picks(q, w, keys_t, k), want)
    assert len(calls) == 3


def test_select_topk_refuses_bad_input():
    q, w, keys_t = integer_inputs(1, 4, 2, 4, 100, seed=0)
    with pytest.raises(ValueError, match="k must be in"):
        select_topk(q, w, keys_t, 101)
    with pytest.raises(ValueError, match="without autograd"):
        select_topk(q.requires_grad_(), w, keys_t, 10)


def test_prefill_through_select_topk_equals_the_reference(monkeypatch):
    # float64: the two score orders agree to ~1e-16, far from any pick's margin; chunks of 64 queries, the fused
    # path from the first block with entries on (SELECT_MIN_ENTRIES 1), the reference path full
    model = model_for(index_topk=5).eval()
    ids = torch.randint(0, 211, (1, 200), generator=torch.Generator().manual_seed(4))
    calls = []
    original = prefill.select_topk
    monkeypatch.setattr(prefill, "select_topk", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    monkeypatch.setattr(prefill, "SELECT_MIN_ENTRIES", 1)
    with torch.no_grad():
        ref = model.set_attention("reference")(ids)
        model.set_attention("fast", 16)
        cache = model.new_cache(1)
        got = torch.cat([model(ids[:, a:a + 64], cache=cache) for a in range(0, 200, 64)], dim=1)
        full = model(ids)
    assert calls
    assert_close_scaled(got, ref)
    assert_close_scaled(full, ref)
