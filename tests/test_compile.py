"""The compiled decoding step (``torch.compile`` of a ``DecodeState`` step): equal to the eager step over many steps
(ring wraps, compressor blocks, CSA's top-k, rows at different lengths), batch-invariant like it, and an engine whose
compiler fails decodes eager after one warning. (These are the suite's tests about compilation: the others run
eager.)"""

import logging

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.model.decode import DecodeState
from dsv4.serve.engine import Engine, SamplingParams
from lively import lively
from numerics import assert_close_scaled, prefill_rows
from test_serve_engine import LetterDecoder, Letters, prompts

VOCAB = 257


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB)).eval())


def filled(model, starts, rows=4, capacity=96, seed=0):
    """A decode state whose rows hold prompts of the given lengths (the rest free), and the prompts' ids."""
    state = DecodeState(model, rows, capacity)
    ids = torch.randint(0, VOCAB, (len(starts), capacity), generator=torch.Generator().manual_seed(seed))
    prefill_rows(model, state, ids, starts)
    return state, ids


def test_the_compiled_step_equals_the_eager_step_and_is_batch_invariant(model):
    with torch.inference_mode():
        eager, ids = filled(model, [3, 17, 40])
        compiled, _ = filled(model, [3, 17, 40])
        alone, _ = filled(model, [3, 17, 40])
        for r in (0, 2):  # row 1 alone in its batch
            alone.reset_row(r)
        def step(tokens, state):
            return model(tokens.unsqueeze(1), cache=state)[:, 0]

        compiled_step = torch.compile(step, dynamic=False)
        for _ in range(45):  # row 0 from 3 to 48 tokens: the ring (16) wraps, CSA (4) and HCA (16) blocks end
            tokens = torch.stack([ids[r, int(eager.lengths[r])] if r < 3 else torch.tensor(0) for r in range(4)])
            a, b = step(tokens, eager), compiled_step(tokens, compiled)
            assert_close_scaled(b[:3], a[:3])
            c = compiled_step(torch.where(torch.arange(4) == 1, tokens, 0), alone)
            assert torch.equal(c[1], b[1])  # the other rows (free in ``alone``) change nothing of row 1
        assert eager.lengths.tolist() == compiled.lengths.tolist() == [48, 62, 85, 0]


def test_a_compiled_engine_gives_the_eager_engines_greedy_outputs(model):
    ps = prompts(5, 40, 70, 17, seed=3)
    outs = {}
    for compiled in (False, True):
        eng = Engine(model, Letters(), max_model_len=160, max_num_seqs=4, prefill_chunk=32, compile=compiled)
        eng.new_decoder = LetterDecoder
        eng.start()
        try:
            assert (eng.compile_seconds is not None) == compiled
            outs[compiled] = [eng.generate(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
                              ["token_ids"] for p in ps]
        finally:
            eng.shutdown()
    assert outs[True] == outs[False]


def test_an_engine_whose_compiler_fails_decodes_eager(model, monkeypatch, caplog):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="dsv4.serve"):
        eng = Engine(model, Letters(), max_model_len=64, max_num_seqs=4, compile=True)
    assert eng.compile_seconds is None and "decoding eager" in caplog.text
    assert not eng.state.active.any() and not eng.state.lengths.any()


def test_the_official_roundings_survive_compilation():
    """The roundings of official numerics (dsv4.model.numerics) compiled equal them eager: inductor drops a round
    trip of casts (float32 -> float8 or bfloat16 -> float32) inside a fused kernel, so dsv4.quant rounds by
    arithmetic instead; the products around them fuse them into neighbouring kernels, as in a model."""
    from dsv4.model.numerics import round_activations, round_kv, round_scores

    def f(kv, x, s):
        return round_kv(kv * 1.5, 16) * 2.0, round_activations(x * 1.5) * 2.0, round_scores(s * 1.5) * 2.0

    g = torch.Generator().manual_seed(0)
    args = torch.randn(3, 5, 64, generator=g), torch.randn(5, 200, generator=g) * 30, torch.randn(4, 30, generator=g)
    for eager, compiled in zip(f(*args), torch.compile(f, dynamic=False)(*args)):
        assert torch.equal(compiled, eager)
