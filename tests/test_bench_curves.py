"""The benchmarks' curves: V4 decode caches filled with random entries (``bench decode --fill random``) are shaped as
prefilled ones, and decode; the sweep's rows draw the plot and name their commands (benchmarks/run_all.py)."""

import json
import sys
from pathlib import Path

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


def test_the_docs_draw_the_sweeps_curves_and_name_their_commands(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import run_all

    def decode(context, **extra):
        return {"bench": "decode", "context": context, "batch_size": 1, "threads": 1, "ms_per_token": 10.0,
                "roofline_ms_per_token": 1.0, "command": f"dsv4 bench decode --context {context} --fill random "
                "--compile --no-4k --json", "fill": "random", "compiled_ms_per_token": 5.0,
                "dense_ms_per_token": 20.0, "dense_compiled_ms_per_token": 15.0, **extra}

    rows = [decode(4096), decode(65536, compile_seconds=100.0),
            {"bench": "decode", "context": 131072, "batch_size": 1, "threads": 1, "ms_per_token": 11.0,
             "command": "dsv4 bench decode --context 131072 --json"},
            {"bench": "prefill", "context": 4096, "threads": 1, "seconds": 6.0, "useful_flops": 3e11,
             "matmul_peak_flops": 1e11, "command": "dsv4 bench prefill --context 4096 --json"}]
    monkeypatch.setattr(run_all, "DOCS", tmp_path)
    monkeypatch.setattr(run_all, "experiments", lambda: [])
    run_all.write_docs({"cpu-test": rows})
    doc = (tmp_path / "benchmarks.md").read_text()
    assert (tmp_path / "bench-cpu-test.png").stat().st_size > 0
    assert "`dsv4 bench decode --context N --fill random --compile --no-4k --json`, N = 4,096, 65,536" in doc
    assert "Crosses: V4 eager from a prefilled cache" in doc and "N = 131,072" in doc
    assert "| 4,096 | 1 | 6 | - | - | - | - | - | - | 3 |" in doc  # the prefill's roofline s from its FLOPs and peak
    # the sweep: every decode context up to 1M less its tokens, compiled, from random fills
    decodes = [b for b in run_all.SWEEP if b[0] == "decode"]
    assert [int(b[b.index("--context") + 1]) for b in decodes][-1] + run_all.SWEEP_TOKENS == 1 << 20
    assert all("random" in b and "--compile" in b for b in decodes)
