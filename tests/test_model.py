"""The model on its own: packed documents, cache splits, MTP, gradients, bad input."""

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from lively import lively
from numerics import assert_close_scaled, logits_in_calls


def tiny(dtype=torch.float32, **changes):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=257, **changes)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    return lively(model).to(dtype)


DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32])


@DTYPES
def test_packed_documents_equal_separate_forwards(dtype):
    model = tiny(dtype)
    g = torch.Generator().manual_seed(0)
    lengths = [37, 5, 50]  # not multiples of the rates; one shorter than a block
    docs = [torch.randint(0, 257, (1, n), generator=g) for n in lengths]
    ids = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        alone = torch.cat([model(d) for d in docs], dim=1)
        train = model.forward_train(ids, doc_ids=doc_ids)
    assert packed.dtype == dtype
    assert_close_scaled(packed, alone)
    assert_close_scaled(train.logits, alone)
    # a batch of two rows packed differently
    ids2 = torch.cat([ids, ids.flip(1)])
    doc2 = torch.cat([doc_ids, doc_ids.flip(1)])
    with torch.no_grad():
        both = model(ids2, doc_ids=doc2)
        row1 = torch.cat([model(d.flip(1)) for d in reversed(docs)], dim=1)
    assert_close_scaled(both[0], alone[0])
    assert_close_scaled(both[1], row1[0])


def test_no_gradient_crosses_documents():
    model = tiny()
    ids = torch.randint(0, 257, (1, 60))
    doc_ids = (torch.arange(60) >= 29).long().unsqueeze(0)
    emb = model.embed(ids).detach().requires_grad_(True)
    model.embed.forward = lambda _ids: emb  # feed the embeddings we watch
    logits = model(ids, doc_ids=doc_ids)
    logits[0, 29:].sum().backward()
    assert emb.grad[0, :29].abs().max() == 0
    assert emb.grad[0, 29:].abs().max() > 0


@DTYPES
@pytest.mark.parametrize("splits", [(1,) * 6, (16, 1, 1), (33, 7), (64,), (3, 29, 2, 1)])
def test_any_split_matches_one_call(splits, dtype):
    model = tiny(dtype)
    ids = torch.randint(0, 257, (2, 90))
    with torch.no_grad():
        full = model(ids)
    cache = model.new_cache(2)
    assert_close_scaled(logits_in_calls(model, ids, splits, cache), full)
    assert cache.seen == 90


@DTYPES
@pytest.mark.parametrize("prompt", [9, 70])  # ring not yet full, no entries; ring wrapped, entries emitted
def test_a_repeated_cache_continues_each_row_like_its_own_sequence(prompt, dtype):
    """One prefilled prompt, repeated into three rows that then decode different tokens: each row gives the logits
    of one call on its own sequence, and the prompt's cache is left as it was."""
    model = tiny(dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 257, (1, prompt), generator=g)
    tails = torch.randint(0, 257, (3, 12), generator=g)
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids, cache=cache)
        before = cache.nbytes()
        rows = cache.repeat_rows(3)
        assert rows.batch_size == 3 and rows.seen == prompt and rows.nbytes() == 3 * before
        steps = [model(tails[:, i:i + 1], cache=rows) for i in range(tails.shape[1])]
        full = model(torch.cat([ids.expand(3, -1), tails], dim=1))
        assert cache.seen == prompt and cache.nbytes() == before  # the prompt's cache is untouched
        again = model(tails[:1, :1], cache=cache)
    assert_close_scaled(torch.cat(steps, dim=1), full[:, prompt:])
    assert_close_scaled(again, steps[0][:1])
    with pytest.raises(ValueError, match="n >= 1"):
        cache.repeat_rows(0)


@DTYPES
@pytest.mark.parametrize("prompt", [0, 3, 30])  # nothing yet; ring partly filled; ring wrapped, entries emitted
def test_restoring_a_snapshot_undoes_the_calls_since(prompt, dtype):
    """Calls after a snapshot (ring wrapped again, entries emitted, partial blocks changed) leave no trace once it
    is restored: the cache then continues like one call on the prompt and the new tokens."""
    model = tiny(dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 257, (2, prompt), generator=g)
    dropped = torch.randint(0, 257, (2, 37), generator=g)
    tail = torch.randint(0, 257, (2, 21), generator=g)
    with torch.no_grad():
        cache = model.new_cache(2)
        if prompt:
            model(ids, cache=cache)
        snap = cache.snapshot()
        model(dropped[:, :30], cache=cache)
        for i in range(30, 37):
            model(dropped[:, i:i + 1], cache=cache)
        cache.restore(snap)
        assert cache.seen == prompt
        steps = [model(tail[:, :5], cache=cache)] + [model(tail[:, i:i + 1], cache=cache) for i in range(5, 21)]
        full = model(torch.cat([ids, tail], dim=1))
    assert_close_scaled(torch.cat(steps, dim=1), full[:, prompt:])
    with pytest.raises(ValueError, match="snapshot of this cache"):
        model.new_cache(2).restore(cache.snapshot())


def test_cache_is_bounded_by_window_and_entries():
    model = tiny()
    cfg = model.config
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 257, (1, 200)), cache=cache)
    for layer, lc in zip(model.layers, cache.layers):
        assert lc.kv.shape[1] == cfg.sliding_window
        if lc.compressor is not None:
            assert lc.compressor.entries.shape[1] == 200 // layer.attn.rate
            assert lc.compressor.kv.shape[1] == 200 % layer.attn.rate


def test_mtp_and_router_outputs():
    model = tiny()
    ids = torch.randint(0, 257, (2, 40))
    out = model.forward_train(ids)
    assert out.logits.shape == (2, 40, 257)
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (2, 39, 257)
    assert len(out.routes) == model.config.num_hidden_layers + 1
    assert out.routes[0].indices.shape == (80, model.config.num_experts_per_tok)
    # hash layer 0 routes by the token id alone
    assert torch.equal(out.routes[0].indices, model.layers[0].ffn.gate.tid2eid[ids.reshape(-1)])


def test_lm_loss_gives_indexer_no_gradient_but_everything_else_one():
    model = tiny()
    model.train()
    ids = torch.randint(0, 257, (1, 80))
    out = model.forward_train(ids)
    loss = out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is None or p.grad.abs().max() == 0, name
        elif ".experts." not in name:  # an expert may receive no token
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_bad_input_is_a_clear_error():
    model = tiny(max_position_embeddings=64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), 257))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(4, dtype=torch.long))
    cache = model.new_cache(1)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="decode cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache, doc_ids=torch.zeros(1, 3, dtype=torch.long))
    cache = model.new_cache(1)
    model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_generate_is_deterministic_with_a_seed():
    from dsv4.generate import generate

    model = tiny()
    prompt = torch.randint(0, 257, (1, 10))
    a = generate(model, prompt, 8, temperature=0.9, top_p=0.9, seed=3)
    b = generate(model, prompt, 8, temperature=0.9, top_p=0.9, seed=3)
    assert torch.equal(a, b) and a.shape == (1, 18)
    greedy = generate(model, prompt, 4, temperature=0)
    with torch.no_grad():
        assert greedy[0, 10] == model(prompt)[0, -1].argmax()


def test_samples_continue_one_prefill_and_stop_when_every_row_has():
    from dsv4.generate import generate, stream

    model = tiny()
    prompt = torch.randint(0, 257, (1, 10))
    greedy = generate(model, prompt, 6, temperature=0)
    assert torch.equal(generate(model, prompt, 6, temperature=0, samples=3), greedy.expand(3, -1))
    many = generate(model, prompt, 6, temperature=1.0, seed=0, samples=4)
    assert many.shape == (4, 16) and torch.equal(many, generate(model, prompt, 6, temperature=1.0, seed=0, samples=4))
    # stop: the stream ends once every row has met it (row 0 at step 2, row 1 at step 4), not at the first row's
    verdicts = iter([False, False, True, False, False, True])  # asked per row still going, row 0 first
    steps = list(stream(model, prompt, 20, temperature=1.0, seed=0, samples=2, stop=lambda t: next(verdicts)))
    assert len(steps) == 4 and all(s.shape == (2,) for s in steps)
    with pytest.raises(ValueError, match="samples"):
        list(stream(model, prompt, 2, samples=0))


def test_apply_rope_rotates_interleaved_trailing_pairs():
    """apply_rope against the rotation written out pair by pair: the leading channels untouched, each trailing
    pair (a, b) -> (a cos - b sin, a sin + b cos), the inverse undoing it; gradients flow, bf16 stays bf16."""
    from dsv4.model.rope import apply_rope

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, 10, generator=g, requires_grad=True)
    ang = torch.randn(5, 1, 3, generator=g)
    cos, sin = ang.cos(), ang.sin()
    y = apply_rope(x, cos, sin)
    a, b = x[..., 4::2], x[..., 5::2]
    want = torch.cat([x[..., :4], torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)], -1)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(apply_rope(y, cos, sin, inverse=True), x, atol=1e-6, rtol=1e-6)
    up = torch.randn(y.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad((y * up).sum(), x)[0],
                               torch.autograd.grad((want * up).sum(), x)[0], atol=1e-6, rtol=1e-6)
    assert apply_rope(x.detach().bfloat16(), cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("rows", [1, 2, 5, 64, 65])
def test_linear_of_a_few_rows_equals_f_linear(rows):
    from torch.nn import functional as F

    from dsv4.model.linear import Linear, linear

    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(1, rows, 48, generator=g), torch.randn(33, 48, generator=g), torch.randn(33, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    layer = Linear(48, 33, bias=False)
    assert set(layer.state_dict()) == {"weight"}
    with torch.inference_mode():
        assert layer(x).shape == (1, rows, 33) and layer(x).is_contiguous()
    # with autograd: F.linear itself (training's numerics unchanged)
    wr = w.clone().requires_grad_(True)
    assert torch.equal(linear(x, wr, b), F.linear(x, wr, b))


@pytest.mark.parametrize("out, parts", [(64, 2), (64, 3), (36, 4), (35, 2), (1, 2), (96, 16)])
def test_one_row_split_across_threads_equals_f_linear(out, parts):
    """One row against a large weight is computed as slices of the weight's rows in one bmm (one slice per thread;
    the largest divisor of the rows that fits when they do not divide), held to F.linear."""
    from torch.nn import functional as F

    from dsv4.model.linear import row_parts

    g = torch.Generator().manual_seed(out)
    x, w = torch.randn(1, 40, generator=g), torch.randn(out, 40, generator=g)
    torch.testing.assert_close(row_parts(x, w, parts), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert row_parts(x, w, parts).shape == (1, out)
    torch.testing.assert_close(row_parts(x, w.t().contiguous().t(), parts), F.linear(x, w), atol=1e-5, rtol=1e-5)
