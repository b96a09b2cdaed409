"""The benchmarks' curves: V4 decode caches filled with random entries (``bench decode --fill random``) are shaped as
prefilled ones, and decode."""

import json

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.bench import filled_cache, prefill
from dsv4.cli import main
from dsv4.model.decode import DecodeState, DecodeStep


def layout(cache) -> list:
    """Every tensor's shape and dtype, each ring's positions and each compressor's entry count: what a step reads."""
    def shape(t):
        return None if t is None else (tuple(t.shape), t.dtype)

    out = [cache.seen, cache.nbytes()]
    for lc in cache.layers:
        out.append((shape(lc.kv), lc.pos.tolist()))
        for s in (lc.compressor, lc.indexer):
            out.append(None if s is None else (s.count, [shape(t) for t in (s.kv, s.gate, s.prev_kv, s.prev_gate,
                                                                             s.entries)]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_randomly_filled_cache_is_laid_out_as_a_prefilled_one_and_decodes(dtype):
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").replace(vocab_size=64, num_nextn_predict_layers=0)
    model = Transformer(config).eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    # inside the first block and the window; a block's end at the window's; past both, inside a block
    for context in (3, 16, 70):
        ids = torch.randint(0, config.vocab_size, (1, context + 4), generator=g)
        real, _ = prefill(model, ids[:, :context], 128)
        filled = filled_cache(model, context, g, room=4)
        assert layout(filled) == layout(real)
        with torch.inference_mode():
            for i in range(context, context + 4):  # both advance alike, the filled one finite
                assert model(ids[:, i:i + 1], cache=filled).isfinite().all()
                model(ids[:, i:i + 1], cache=real)
        assert layout(filled) == layout(real)
        # into a decode state of capacity context + tokens (what the compiled step runs), then its steps
        states = []
        for cache in (prefill(model, ids[:, :context], 128)[0], filled_cache(model, context, g, room=4)):
            state = DecodeState(model, 2, context + 4)
            for r in range(2):
                state.load_row(r, cache)
            states.append(state)
        a, b = states
        assert a.nbytes() == b.nbytes() and torch.equal(a.lengths, b.lengths)
        for la, lb in zip(a.layers, b.layers):
            assert torch.equal(la.ring_pos, lb.ring_pos)
        step = DecodeStep(model, b)
        with torch.inference_mode():
            for i in range(context, context + 4):
                assert step(ids[0, i].repeat(2)).isfinite().all()
        assert b.lengths.tolist() == [context + 4] * 2


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_decode_from_a_random_fill_reads_the_bytes_of_a_prefill(capsys):
    args = ("bench", "decode", "--preset", "tiny", "--context", "300", "--tokens", "2", "--threads", "1", "--json")
    real = run_json(capsys, *args)
    random = run_json(capsys, *args, "--fill", "random", "--no-4k")
    assert real["fill"] == "prefill" and random["fill"] == "random"
    assert random["kv_bytes"] == real["kv_bytes"] and random["dense_cache_bytes"] == real["dense_cache_bytes"]
    assert "ms_per_token_4k" not in random and random["ms_per_token"] > 0 and random["roofline_ms_per_token"] > 0
