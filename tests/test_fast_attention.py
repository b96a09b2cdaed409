"""The fast attention paths against the reference path: outputs and gradients, in float64 (a float64 model is
float64 end to end, ``dsv4.model.precision``), where two computation orders agree to about 1e-15 on any CPU or GPU:
held to 1e-9 relative to the largest magnitude (``numerics.assert_close_scaled``). In float32 the last bits depend on
the kernels (AVX2, AVX-512, ``ATEN_CPU_CAPABILITY=default``, GPUs), and even the indexer's top-k picks could."""

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from lively import lively
from numerics import assert_close_scaled
from dsv4.model.indexer import topk_lower_index

F64 = torch.float64


def model_for(seed=0, **changes):
    base = dict(vocab_size=211, num_hidden_layers=3, layer_types=["compressed_sparse_attention",
                "heavily_compressed_attention", "sliding_attention"], mlp_layer_types=["hash_moe", "moe", "moe"])
    base.update(changes)
    cfg = ModelConfig.preset("tiny").replace(**base)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    return lively(model).to(F64)


def run_both(model, ids, doc_ids=None, chunk=16, window_block=None):
    out = {}
    for impl in ("reference", "fast"):
        model.set_attention(impl, chunk, window_block)
        model.zero_grad(set_to_none=True)
        res = model.forward_train(ids, doc_ids=doc_ids)
        loss = (res.logits.square().mean() + res.mtp_logits[0].square().mean()) if res.mtp_logits \
            else res.logits.square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[impl] = (res.logits.detach(), grads)
    return out


def assert_same_grads(got: dict, want: dict) -> None:
    """The same parameters have gradients, each within 1e-9 of the largest gradient of that parameter."""
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert grad.dtype == F64, name
        torch.testing.assert_close(got[name], grad, atol=1e-9 * float(grad.abs().max()) + 1e-300, rtol=0,
                                   msg=name)


def assert_fast_equals_reference(res: dict) -> None:
    """run_both's result: the fast logits are the reference's (float64: within 1e-9 scaled), the same gradients."""
    assert res["fast"][0].dtype == F64
    assert_close_scaled(res["fast"][0], res["reference"][0])
    assert_same_grads(res["fast"][1], res["reference"][1])


CASES = {
    "shorter-than-window": dict(seq=11),
    "not-multiples": dict(seq=75),
    "topk-above-visible": dict(seq=40, changes=dict(index_topk=64)),
    "sparse": dict(seq=97, changes=dict(index_topk=3)),
    "batch-3": dict(seq=50, batch=3),
    "hca-rate-above-window": dict(seq=90, changes=dict(sliding_window=8)),
    "window-blocks-of-5": dict(seq=61, window_block=5),
    "window-blocks-above-window": dict(seq=70, window_block=40),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_equals_reference(case):
    spec = CASES[case]
    model = model_for(**spec.get("changes", {}))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 211, (spec.get("batch", 2), spec["seq"]), generator=g)
    assert_fast_equals_reference(run_both(model, ids, chunk=spec.get("chunk", 16),
                                          window_block=spec.get("window_block")))


def test_fast_equals_reference_with_documents():
    model = model_for(index_topk=4)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 211, (2, 83), generator=g)
    doc_ids = torch.stack([(torch.arange(83) >= 30).long() + (torch.arange(83) >= 34).long(),
                           (torch.arange(83) >= 61).long()])
    assert_fast_equals_reference(run_both(model, ids, doc_ids, chunk=16, window_block=7))


@pytest.mark.parametrize("chunk", [1, 7, 128])
def test_fast_cached_decoding_matches_reference_full(chunk):
    model = model_for(index_topk=5).eval()
    ids = torch.randint(0, 211, (2, 70))
    with torch.no_grad():
        model.set_attention("reference")
        ref = model(ids)
        model.set_attention("fast", chunk)
        cache = model.new_cache(2)
        parts = [model(ids[:, :33], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(33, 70)]
    assert_close_scaled(torch.cat(parts, dim=1), ref)


@pytest.mark.parametrize("sparse, batch", [(True, 2), (False, 2), (True, 1)])
def test_decode_step_token_by_token_matches_reference_full(sparse, batch):
    # from the first token on: a ring not yet full, no entries, fewer entries than top-k, then more; the ring wraps;
    # one row: mHC's one-row path too
    model = model_for(index_topk=3).eval().set_indexer_phase(sparse, False)
    ids = torch.randint(0, 211, (batch, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.set_attention("reference")(ids)
        model.set_attention("fast")
        cache = model.new_cache(batch)
        steps = [model(ids[:, i:i + 1], cache=cache) for i in range(60)]
    assert_close_scaled(torch.cat(steps, dim=1), ref)


@pytest.mark.parametrize("sparse", [True, False])
def test_decode_of_a_few_tokens_per_call_matches_reference_full(sparse, monkeypatch):
    # calls of 1 to 16 tokens, all on the decoding path (the general one is made to fail): entries emitted inside a
    # call are visible to its later queries only; the ring wraps within a call
    from dsv4.model import attention

    model = model_for(index_topk=3).eval().set_indexer_phase(sparse, False)
    ids = torch.randint(0, 211, (2, 60), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model.set_attention("reference")(ids)
        model.set_attention("fast")
        monkeypatch.setattr(attention, "fast", lambda *a, **k: pytest.fail("a short cached call took the block path"))
        cache, steps, i = model.new_cache(2), [], 0
        for n in (2, 3, 1, 5, 16, 4, 7, 2, 11, 9):
            steps.append(model(ids[:, i:i + n], cache=cache))
            i += n
    assert i == 60
    assert_close_scaled(torch.cat(steps, dim=1), ref)


def test_dense_phase_fast_equals_reference_over_every_visible_entry():
    model = model_for(index_topk=3).set_indexer_phase(False, False)
    ids = torch.randint(0, 211, (2, 70), generator=torch.Generator().manual_seed(6))
    res = run_both(model, ids)
    assert_fast_equals_reference(res)
    sparse = run_both(model.set_indexer_phase(True, False), ids)["reference"][0]
    assert (sparse - res["reference"][0]).abs().max() > 1e-3  # top-3 of up to 17 entries: the phases differ


@pytest.mark.parametrize("new", [1, 3])
def test_decode_step_is_differentiable_like_the_reference(new):
    model = model_for(index_topk=3)
    ids = torch.randint(0, 211, (1, 30), generator=torch.Generator().manual_seed(4))
    grads = {}
    for impl in ("reference", "fast"):
        model.set_attention(impl).zero_grad(set_to_none=True)
        cache = model.new_cache(1)
        with torch.no_grad():
            model(ids[:, :30 - new], cache=cache)
        model(ids[:, 30 - new:], cache=cache).square().mean().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_same_grads(grads["fast"], grads["reference"])


def test_topk_lower_index_breaks_ties_toward_lower_index():
    scores = torch.tensor([[0.0, 1.0, 0.0, 1.0, -0.0, 2.0, float("-inf"), 0.0]])
    assert sorted(topk_lower_index(scores + 0.0, 4)[0].tolist()) == [0, 1, 3, 5]
    assert sorted(topk_lower_index(scores + 0.0, 5)[0].tolist()) == [0, 1, 2, 3, 5]
    x = torch.randn(6, 50)
    x[:, ::3] = 0.25  # many exact ties
    for k in (1, 10, 50):
        ref = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
        assert torch.equal(topk_lower_index(x, k).sort(-1).values, ref)


@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_attend_and_merge_equal_one_softmax(spread):
    """Key sets joined by ``merge`` give the reference's single softmax, also when logits span far more than the
    exp floor (weights under e^-80 dropped), and a fully masked set weighs exactly 0."""
    from dsv4.model import kernels
    from dsv4.model.reference import reference_attention

    g = torch.Generator().manual_seed(3)
    b, nq, h, c, kw, kc = 2, 5, 3, 8, 7, 4
    q = torch.randn(b, nq, h, c, generator=g, dtype=F64) * spread
    wk, ck = torch.randn(b, kw, c, generator=g, dtype=F64), torch.randn(b, nq, kc, c, generator=g, dtype=F64)
    wmask = torch.rand(1, nq, kw, generator=g) < 0.7
    wmask[:, 0] = False  # a query with no window key
    cmask = torch.rand(b, nq, kc, generator=g) < 0.5
    sinks = torch.randn(h, generator=g, dtype=F64)
    out, _ = kernels.merge([kernels.attend(q, wk, wmask), kernels.attend(q, ck, cmask)], sinks)
    # the reference: one softmax over [window keys | each query's own entries | sink], per query
    for i in range(nq):
        keys = torch.cat([wk, ck[:, i]], dim=1)
        mask = torch.cat([wmask[:, i:i + 1].expand(b, 1, kw), cmask[:, i:i + 1]], dim=-1)
        ref = reference_attention(q[:, i:i + 1], keys, mask, sinks, 1.0)
        assert out.dtype == ref.dtype == F64
        assert_close_scaled(out[:, i:i + 1], ref)


def test_topk_lower_index_equals_the_exact_rule_on_tied_rows():
    """The float top-k with tie repair against the exact int64-key top-k, on rows with and without boundary ties
    (scores are - 0.0 free, as the indexer makes them)."""
    from dsv4.model.indexer import _topk_exact

    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 6, (64, 40), generator=g).float() + 0.0  # heavy ties
    x[::2] = torch.randn(32, 40, generator=g)  # tie-free rows
    x[5, 30:] = float("-inf")
    for k in (1, 7, 20, 40):
        got, want = topk_lower_index(x, k).sort(-1).values, _topk_exact(x, k).sort(-1).values
        assert torch.equal(got, want), k


def test_attend_without_mask_equals_an_all_visible_mask():
    """mask=None (every query sees every key, CSA past its first k entries) gives the masked path's values and
    gradients, for shared and per-query keys."""
    from dsv4.model import kernels

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 3, 8, generator=g, requires_grad=True)
    for keys in (torch.randn(2, 6, 8, generator=g), torch.randn(2, 4, 6, 8, generator=g)):
        keys.requires_grad_(True)
        results = []
        for mask in (None, torch.ones(2, 4, 6, dtype=torch.bool)):
            p = kernels.attend(q, keys, mask, keep=True)
            grads = torch.autograd.grad((p.out.sin().sum() + p.s.cos().sum()), (q, keys))
            results.append((p.out, p.m, p.s, p.e, *grads))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_chunk_scores_by_tiles_equal_the_einsum_scores():
    """For 64 queries or more, beyond 4 tiles of entries, chunk_scores scores tile by tile (a few queries in one
    product); values and gradients equal the reference's einsum (Indexer.scores), for batch 1 and 2."""
    from dsv4.model.indexer import _SCORE_TILE, chunk_scores

    g = torch.Generator().manual_seed(6)
    t = 4 * _SCORE_TILE + 37
    for b, nq in ((1, 64), (2, 64), (1, 3)):
        q = torch.randn(b, nq, 2, 4, generator=g, dtype=F64, requires_grad=True)
        w = torch.randn(b, nq, 2, generator=g, dtype=F64, requires_grad=True)
        keys = torch.randn(b, t, 4, generator=g, dtype=F64, requires_grad=True)
        got = chunk_scores(q, w, keys.transpose(1, 2))
        want = torch.einsum("bsht,bsh->bst", torch.relu(torch.einsum("bshc,btc->bsht", q, keys)), w)
        assert got.dtype == F64
        assert_close_scaled(got.detach(), want.detach())
        up = torch.randn(got.shape, generator=g, dtype=F64)
        for a, z in zip(torch.autograd.grad((got * up).sum(), (q, w, keys)),
                        torch.autograd.grad((want * up).sum(), (q, w, keys))):
            assert_close_scaled(a, z)


@pytest.mark.parametrize("threads", [2, 3])
def test_decoding_chunk_scores_split_across_threads_equal_the_einsum_scores(threads):
    """Without autograd, a decoding step's few queries against many entries are scored as one span of entries per
    thread in one bmm (entries not divisible by the threads: the rest in one product); the same scores."""
    from dsv4.model.indexer import _PARTS_MIN, chunk_scores

    g = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for nq, t in ((1, _PARTS_MIN), (1, _PARTS_MIN + 1), (3, _PARTS_MIN + 2)):
            q, w = torch.randn(1, nq, 4, 8, generator=g, dtype=F64), torch.randn(1, nq, 4, generator=g, dtype=F64)
            keys = torch.randn(1, t, 8, generator=g, dtype=F64)
            want = torch.einsum("bsht,bsh->bst", torch.relu(torch.einsum("bshc,btc->bsht", q, keys)), w)
            with torch.inference_mode():
                got = chunk_scores(q, w, keys.transpose(1, 2))
            assert got.dtype == F64
            assert_close_scaled(got, want)
    finally:
        torch.set_num_threads(before)


def test_a_topk_of_every_visible_entry_attends_them_in_place_as_the_gathered_form_does(monkeypatch):
    # prefill.ALL_PICKED_IN_PLACE: a CSA block whose top-k holds every visible entry attends the entries in place
    # (no top-k, no gather); its outputs, gradients and the indexer's KL loss are the gathered form's, with documents
    from dsv4.model import prefill

    model = model_for(index_topk=12).set_indexer_phase(sparse=True, train_indexer=True)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 211, (2, 70), generator=g)  # blocks of 16: up to 17 entries, some above the top-k
    doc_ids = torch.stack([(torch.arange(70) >= 21).long(), torch.zeros(70, dtype=torch.long)])
    model.set_attention("fast", 16)
    out = {}
    for in_place in (True, False):
        monkeypatch.setattr(prefill, "ALL_PICKED_IN_PLACE", in_place)
        model.zero_grad(set_to_none=True)
        res = model.forward_train(ids, doc_ids=doc_ids)
        (res.logits.square().mean() + res.indexer_kl).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[in_place] = res.logits.detach(), res.indexer_kl.detach(), grads
    assert_close_scaled(out[True][0], out[False][0])
    assert_close_scaled(out[True][1], out[False][1])
    assert_same_grads(out[True][2], out[False][2])
