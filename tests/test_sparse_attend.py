"""CSA's one-pass sparse attention (``fused.sparse_attend``) against its reference, ``kernels.attend`` of the gathered
picks computed in float64: heads in and out of its groups of 8, head dims on and off the vector width, picks repeated,
masked, and a query with none visible; and a float32 prefill through it (and the other inference kernels) against
the operators."""

import pytest
import torch

from dsv4.model import fused, indexer, kernels
from numerics import assert_close_scaled
from test_fast_attention import model_for

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused kernel could not be built here")


def _inputs(n, h, c, r, k, seed, masked=True, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, c, generator=g) * c ** -0.5 * spread
    entries = torch.randn(r, c, generator=g)
    rows = torch.randint(0, r, (n, k), generator=g)
    mask = torch.rand(n, k, generator=g) > 0.3 if masked else None
    if masked:
        mask[0] = False  # a query with no visible pick: m is -1e30, out and s are 0
    return q, entries, rows, mask


def _reference(q, entries, rows, mask):
    p = kernels.attend(q.double(), kernels.gather_rows(entries.double(), rows), mask)
    return p.out, p.m, p.s


@pytest.mark.parametrize("n, h, c, r, k, spread", [(7, 8, 128, 300, 512, 3.0), (5, 3, 64, 50, 40, 3.0),
                                                   (4, 12, 16, 90, 33, 3.0), (3, 2, 12, 20, 5, 3.0),
                                                   (2, 1, 8, 10, 64, 3.0), (6, 8, 64, 200, 300, 40.0),
                                                   (3, 5, 24, 40, 37, 3.0)])
def test_sparse_attend_equals_attend_of_the_gathered_picks(n, h, c, r, k, spread):
    # spread 40: logits some 40 apart, so that the exponentials (eight at a time in the kernel) span e^0 to the
    # e^-80 floor
    q, entries, rows, mask = _inputs(n, h, c, r, k, seed=n * 100 + k, spread=spread)
    for m_ in (mask, None):
        out, m, s = fused.sparse_attend(q, entries, rows, m_)
        ref_out, ref_m, ref_s = _reference(q, entries, rows, m_)
        assert out.shape == (n, h, c) and m.shape == s.shape == (n, h)
        assert_close_scaled(m.double(), ref_m, 1e-5)
        # the sums at the kernel's own maximum (the two maxima may differ in the last bit)
        shift = torch.exp(ref_m - m.double()).nan_to_num(1.0)
        assert_close_scaled(s.double() * shift, ref_s, 1e-5)
        assert_close_scaled(out.double() * shift.unsqueeze(-1), ref_out, 1e-5)
        if m_ is not None:  # nothing visible: the reference's empty set
            assert bool((m[0] == kernels._MASKED).all()) and not s[0].any() and not out[0].any()


def test_sparse_attend_keeps_leading_dims_and_broadcasts_the_mask():
    q, entries, rows, _ = _inputs(6, 4, 32, 40, 16, seed=1, masked=False)
    q4, rows4 = q.view(2, 3, 4, 32), rows.view(2, 3, 16)
    mask = torch.ones(2, 1, 16, dtype=torch.bool)
    mask[..., 3] = False
    out, m, s = fused.sparse_attend(q4, entries, rows4, mask)
    ref_out, ref_m, ref_s = _reference(q4, entries, rows4, mask)
    assert out.shape == (2, 3, 4, 32) and m.shape == (2, 3, 4)
    shift = torch.exp(ref_m - m.double())
    assert_close_scaled(out.double() * shift.unsqueeze(-1), ref_out, 1e-5)
    assert_close_scaled(s.double() * shift, ref_s, 1e-5)


def test_sparse_attend_names_bad_input():
    q, entries, rows, mask = _inputs(3, 2, 16, 10, 4, seed=2)
    with pytest.raises(RuntimeError, match="is not a row of the 10 entries"):
        fused.sparse_attend(q, entries, rows + 10, mask)
    with pytest.raises(RuntimeError, match="q must be a float32"):
        fused.sparse_attend(q.double(), entries, rows, mask)
    with pytest.raises(RuntimeError, match="entries must be"):
        fused.sparse_attend(q, entries[:, :8], rows, mask)
    with pytest.raises(ValueError, match="do not match the queries"):
        fused.sparse_attend(q, entries, rows[:2], mask)


def test_prefill_through_the_kernels_equals_the_operators(monkeypatch):
    # float32 (the kernels' dtype): a sparse CSA layer whose queries see more entries than they pick, prefilled in
    # chunks through a cache and in one call, against the same model with every inference kernel turned off
    # (fused.serves: sparse_attend for CSA's picks and the window, hc_expand / hc_sinkhorn, topk_lower, index_scores)
    model = model_for(index_topk=5).float().eval()
    ids = torch.randint(0, 211, (2, 200), generator=torch.Generator().manual_seed(4))
    calls = []
    original = fused.sparse_attend
    monkeypatch.setattr(fused, "sparse_attend", lambda *a: calls.append(1) or original(*a))

    def run():
        model.set_attention("fast", 16)
        cache = model.new_cache(2)
        with torch.no_grad():
            chunked = torch.cat([model(ids[:, a:a + 64], cache=cache) for a in range(0, 200, 64)], dim=1)
            return chunked, model(ids)

    monkeypatch.setattr(indexer, "FUSED_TOPK_MIN", 1)
    got = run()
    assert calls
    monkeypatch.setattr(fused, "serves", lambda *tensors: False)
    calls.clear()
    want = run()
    assert not calls
    for g, w in zip(got, want):
        assert_close_scaled(g, w)


def _picks_inputs(n, h, c, w, t, k, seed, spread=3.0):
    """Queries, each row's window [n, w, c] and entries [n, t, c] as views of one buffer with room between rows (as
    the decode state lays them out), picks [n, k] among a row's w + t keys, a mask with a row that sees none."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, c, generator=g) * c ** -0.5 * spread
    buffer = torch.randn(n, w + t + 3, c, generator=g)
    rows = torch.randint(0, w + t, (n, k), generator=g)
    mask = torch.rand(n, k, generator=g) > 0.3
    mask[0] = False
    return q, buffer[:, :w], buffer[:, w:w + t], rows, mask


def _picks_reference(q, window, entries, rows, mask, sink):
    """The decoding step's attention as the reference writes it (``decode.attend_rows`` without the kernel), in
    float64: the gathered picks' logits, masked, beside the sink in one softmax, applied to the picks."""
    keys = torch.cat([window, entries], dim=1).double()
    keys = keys.gather(1, rows.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # [n, k, c]
    logits = torch.einsum("nhc,nkc->nhk", q.double(), keys)
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    sink = sink.double().view(1, -1, 1).expand(q.shape[0], -1, 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("nhk,nkc->nhc", probs, keys)


@pytest.mark.parametrize("n, h, c, w, t, k, spread, threads", [(1, 8, 128, 128, 1025, 1153, 3.0, 2),
                                                               (1, 8, 128, 128, 700, 640, 40.0, 2),
                                                               (2, 8, 128, 128, 0, 128, 3.0, 2),
                                                               (3, 5, 24, 16, 40, 300, 3.0, 4),
                                                               (2, 3, 12, 4, 30, 37, 3.0, 1)])
def test_attend_picks_equals_the_softmax_with_the_sink(n, h, c, w, t, k, spread, threads):
    # a query's picks of its row's window and entries (read in place) split over the threads (spans of at least
    # 128) and merged with the sink: the float64 reference within 1e-5 of the output's magnitude, with and without
    # a mask, with a sink above every logit and below
    q, window, entries, rows, mask = _picks_inputs(n, h, c, w, t, k, seed=n * 10 + k, spread=spread)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for sink in (torch.randn(h, generator=torch.Generator().manual_seed(k)), torch.full((h,), 60.0),
                     torch.full((h,), -60.0)):
            for m_ in (mask, None):
                out = fused.attend_picks(q, window, entries, rows, m_, sink)
                ref = _picks_reference(q, window, entries, rows, m_, sink)
                assert out.shape == (n, h, c)
                assert_close_scaled(out.double(), ref, 1e-5)
                if m_ is not None:  # nothing visible: every weight goes to the sink, which has no value
                    assert not out[0].any()
    finally:
        torch.set_num_threads(before)


def test_attend_picks_names_bad_input():
    q, window, entries, rows, _ = _picks_inputs(2, 4, 16, 4, 6, 8, seed=3)
    rows[1, 2] = 10
    with pytest.raises(RuntimeError, match="pick 10 is not one of the 4 \\+ 6 keys of a row"):
        fused.attend_picks(q, window, entries, rows, None, torch.zeros(4))
    rows[1, 2] = 9
    with pytest.raises(RuntimeError, match="sink must be float32"):
        fused.attend_picks(q, window, entries, rows, None, torch.zeros(3))
    with pytest.raises(RuntimeError, match="each row's keys contiguous"):
        fused.attend_picks(q, window.transpose(1, 2)[:, :4], entries, rows, None, torch.zeros(4))
