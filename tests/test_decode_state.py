"""DecodeState: rows at their own lengths equal one full call per row; a row's logits do not depend on the other
rows; rows load from and extract to one-row caches; prefix snapshots (history + boundary state) rebuild a cache."""

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.model.decode import DecodeState, compressor_rates
from dsv4.model.moe import MoE
from lively import lively
from numerics import assert_close_scaled, prefill_rows

VOCAB = 257


def tiny(dtype=torch.float32, **changes):
    # window 16, CSA rate 4 (top-8), HCA rate 16: short sequences wrap the ring and pass many blocks
    cfg = ModelConfig.preset("tiny").replace(vocab_size=VOCAB, **changes)
    torch.manual_seed(0)
    return lively(Transformer(cfg).eval()).to(dtype)


def run_rows(model, state, ids, prefill, rows):
    """Prefill row ``rows[j]`` of ``state`` with ``ids[j, :prefill[j]]`` (one-row cache, then ``load_row``) and decode
    every row one token per call to the end of ``ids``; each row's logits of every position, [len(rows), S, V]."""
    out = [[] for _ in rows]
    for j, (r, n) in enumerate(zip(rows, prefill)):
        cache = model.new_cache(1)
        out[j].append(model(ids[j:j + 1, :n], cache=cache))
        state.load_row(r, cache)
    while True:
        tokens = torch.zeros(state.rows, dtype=torch.long)
        going = []
        for j, r in enumerate(rows):
            if int(state.lengths[r]) < ids.shape[1]:
                tokens[r] = ids[j, int(state.lengths[r])]
                going.append(j)
            else:
                state.active[r] = False
        if not going:
            break
        logits = model(tokens.unsqueeze(1), cache=state)
        for j in going:
            out[j].append(logits[rows[j]:rows[j] + 1])
    return torch.cat([torch.cat(o, dim=1) for o in out])


@pytest.mark.parametrize("dtype, topk", [(torch.float64, 8), (torch.float32, 8), (torch.float64, 32)])
def test_rows_at_their_own_lengths_equal_one_call(dtype, topk):
    """Rows prefilled to 1, 13 (mid block), 16 (on a boundary) and 40 tokens decode to 70: the ring wraps, HCA
    entries are emitted, each at its own step; CSA's top-k picks from more entries than k (top-8), or, where the
    capacity holds no more entries than k (top-32 of at most 20), every visible entry is attended."""
    model = tiny(dtype, index_topk=topk)
    ids = torch.randint(0, VOCAB, (4, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        state = DecodeState(model, rows=5, capacity=80)
        got = run_rows(model, state, ids, [1, 13, 16, 40], [3, 0, 4, 1])
    assert_close_scaled(got, full)
    assert state.lengths.tolist() == [70, 70, 0, 70, 70]


def test_csa_dense_phase_rows_equal_one_call():
    model = tiny(torch.float64).set_indexer_phase(sparse=False, train_indexer=False)
    ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        got = run_rows(model, DecodeState(model, rows=2, capacity=64), ids, [3, 30], [0, 1])
    assert_close_scaled(got, full)


def test_a_rows_logits_are_bit_identical_whatever_else_is_in_the_batch():
    model = tiny(torch.float32)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 50), generator=g)
    others = torch.randint(0, VOCAB, (3, 50), generator=g)
    with torch.no_grad():
        alone = run_rows(model, DecodeState(model, rows=4, capacity=64), ids, [7], [2])
        crowd = run_rows(model, DecodeState(model, rows=4, capacity=64), torch.cat([others[:1], ids, others[1:]]),
                         [30, 7, 1, 12], [0, 2, 1, 3])[1:2]
    assert torch.equal(alone, crowd)


def test_extracted_rows_continue_exactly_and_serialize_as_prefix_parts():
    model = tiny(torch.float64)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 64), generator=g)
    with torch.no_grad():
        full = model(ids)
        state = DecodeState(model, rows=2, capacity=64)
        cache = model.new_cache(1)
        model(ids[:, :5], cache=cache)
        state.load_row(1, cache)
        for i in range(5, 48):  # decode to 48, a multiple of every rate (the tiny preset's block is 16)
            tokens = torch.zeros(2, dtype=torch.long)
            tokens[1] = ids[0, i]
            model(tokens.unsqueeze(1), cache=state)
        row = state.extract_row(1)
        assert row.seen == 48
        rates = compressor_rates(model)
        parts = [row.history(a, a + 16, rates) for a in range(0, 48, 16)]
        rebuilt = model.new_cache(1).fill(parts, row.boundary_state(), 48)
        tail = model(ids[:, 48:], cache=rebuilt)
        tail_direct = model(ids[:, 48:], cache=row)
    assert_close_scaled(tail, full[:, 48:])
    assert torch.equal(tail, tail_direct)


def test_bad_use_is_a_clear_error():
    model = tiny()
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_position_embeddings"):
            DecodeState(model, rows=1, capacity=model.config.max_position_embeddings + 1)
        state = DecodeState(model, rows=2, capacity=8)
        cache = model.new_cache(1)
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="capacity"):
            state.load_row(0, cache)
        with pytest.raises(ValueError, match="at least one token"):
            model(torch.zeros(2, 0, dtype=torch.long), cache=state)
        with pytest.raises(ValueError, match="batch"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=state)
        small = model.new_cache(1)
        model(torch.zeros(1, 8, dtype=torch.long), cache=small)
        state.load_row(0, small)
        with pytest.raises(ValueError, match="full"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=state)
        with pytest.raises(ValueError, match="block boundary"):
            partial = model.new_cache(1)
            model(torch.zeros(1, 6, dtype=torch.long), cache=partial)
            partial.boundary_state()


def test_per_token_experts_equal_the_grouped_path():
    cfg = ModelConfig.preset("tiny").replace(vocab_size=VOCAB)
    torch.manual_seed(4)
    moe = lively(MoE(cfg, layer_idx=1)).double()
    x = torch.randn(9, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        grouped, _ = moe(x, None)
        alone, _ = moe(x, None, per_token=True)
    assert_close_scaled(alone, grouped)


@pytest.mark.parametrize("topk", [8, 32])
def test_several_tokens_per_call_and_rollback_equal_one_call(topk):
    """Calls of 3 tokens per row (a speculative check: the pending token and drafts), of which each row keeps a
    different number and rolls the rest back (undoing ring slots, completed blocks' overlap series): the kept
    logits equal one full call, through ring wraps, CSA's top-k (or every entry) and HCA entries."""
    model = tiny(torch.float64, index_topk=topk)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (3, 100), generator=g)
    with torch.no_grad():
        full = model(ids)
        state = DecodeState(model, rows=3, capacity=110)
        got = [[logits] for logits in prefill_rows(model, state, ids, [4, 11, 16])]
        step, mark = 0, None
        while int(state.lengths.min()) < 66:
            lengths = state.lengths.tolist()
            tokens = torch.stack([ids[r, lengths[r]:lengths[r] + 3] for r in range(3)])
            # the first mark copies the state; the later ones are written over it (one batched copy)
            mark = state.mark(into=mark)
            logits = model(tokens, cache=state)
            keep = [(step + r) % 3 + 1 for r in range(3)]  # 1, 2 or 3 of the 3 tokens
            for r in range(3):
                got[r].append(logits[r, :keep[r]])
            state.rollback(mark, keep, [0, 1, 2])
            assert state.lengths.tolist() == [a + k for a, k in zip(lengths, keep)]
            step += 1
    for r in range(3):
        row = torch.cat(got[r])
        assert_close_scaled(row, full[r, :row.shape[0]])
