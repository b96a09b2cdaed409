"""The compiled decoding step (``dsv4.model.decode.DecodeStep``: ``torch.compile`` of a ``DecodeState`` step, one
graph without breaks): equal to the eager step over many steps (ring wraps, compressor blocks, CSA's top-k, rows at
different lengths), batch-invariant like it; ``dsv4.generate`` and the serving engine decode with it and give the
eager outputs; where the compiler fails they decode eager after one warning. (These are the suite's tests about
compilation: the others run eager.) The CPU compiles steps with inductor's C++ wrapper (``decode.compile_step``); its
first compilation with a cold cache takes minutes, so the first test runs it and the others take the Python wrapper
around the same kernels (``DSV4_CPP_WRAPPER=0``)."""

import copy
import logging
import types

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.generate import generate
from dsv4.model import decode, fused
from dsv4.model.decode import DecodeState, DecodeStep, capacity_bucket
from dsv4.serve.engine import Engine, SamplingParams
from lively import lively
from numerics import assert_close_scaled, prefill_rows
from test_serve_engine import LetterDecoder, Letters, prompts

VOCAB = 257


@pytest.fixture(autouse=True)
def python_wrapper(monkeypatch):  # a test on the C++ wrapper sets it back to 1
    monkeypatch.setenv("DSV4_CPP_WRAPPER", "0")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB)).eval())


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


def filled(model, starts, rows=4, capacity=96, seed=0, compile=False):
    """A decode state whose rows hold prompts of the given lengths (the rest free), its step (compiled before the
    rows are filled, with ``fullgraph``: a graph break fails), and the prompts' ids."""
    state = DecodeState(model, rows, capacity)
    step = DecodeStep(model, state)
    if compile:
        assert step.compile(fullgraph=True), "the decoding step does not compile as one graph"
    ids = torch.randint(0, VOCAB, (len(starts), capacity), generator=torch.Generator().manual_seed(seed))
    prefill_rows(model, state, ids, starts)
    return state, step, ids


def test_the_compiled_step_equals_the_eager_step_and_is_batch_invariant(model, monkeypatch):
    monkeypatch.setenv("DSV4_CPP_WRAPPER", "1")
    with torch.inference_mode():
        eager, step, ids = filled(model, [3, 17, 40])
        compiled, compiled_step, _ = filled(model, [3, 17, 40], compile=True)
        # the same graph (no second compilation), called directly with this state's inputs (decode._SHARED)
        alone, alone_step, _ = filled(model, [3, 17, 40], compile=True)
        for r in (0, 2):  # row 1 alone in its batch
            alone.reset_row(r)
        for _ in range(45):  # row 0 from 3 to 48 tokens: the ring (16) wraps, CSA (4) and HCA (16) blocks end
            tokens = torch.stack([ids[r, int(eager.lengths[r])] if r < 3 else torch.tensor(0) for r in range(4)])
            a, b = step(tokens), compiled_step(tokens)
            assert_close_scaled(b[:3], a[:3])
            c = alone_step(torch.where(torch.arange(4) == 1, tokens, 0))
            assert torch.equal(c[1], b[1])  # the other rows (free in ``alone``) change nothing of row 1
        assert eager.lengths.tolist() == compiled.lengths.tolist() == [48, 62, 85, 0]
        assert decode.cpp_wrapper()
        if fused.available():  # its graph called without dynamo (the reference attention's graph is not)
            assert compiled_step.direct and alone_step.direct
        compiled.lengths[2] = 96  # the compiled step checks room and ids before it runs, as the eager one does
        with pytest.raises(ValueError, match="full"):
            compiled_step(tokens)
        with pytest.raises(ValueError, match="token ids"):
            compiled_step(torch.full((4,), VOCAB))


def test_the_wrapper_switch_names_a_bad_value(monkeypatch):
    monkeypatch.setenv("DSV4_CPP_WRAPPER", "yes")
    with pytest.raises(ValueError, match="DSV4_CPP_WRAPPER must be 0 or 1, got 'yes'"):
        decode.cpp_wrapper()


def test_compiled_generation_equals_eager_generation(model64):
    """``generate(compile=True)`` in float64 (no near-tie of two computation orders flips a greedy token): two
    prompts of different lengths, two samples each (four rows of one compiled state), greedy and sampled with a
    seed, give eager generation's tokens; its capacity is the bucket of prompt and new tokens."""
    m64 = model64
    prompt = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(5))
    prompt[1, :7] = 0
    info = {}
    for kw in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}):
        compiled = generate(m64, prompt, 40, samples=2, compile=True, info=info, **kw)
        assert info["compile_seconds"] is not None and info["capacity"] == capacity_bucket(30 + 39, 65536) == 256
        assert torch.equal(compiled, generate(m64, prompt, 40, samples=2, **kw))


def test_the_compiled_step_equals_eager_in_float64_to_the_capacity(model64):
    """In float64 the compiled step equals the eager one within 1e-9 of the logits' scale, over steps that take a row
    to the last position of its capacity (the last entry slot of CSA and HCA, the ring wrapping) beside rows at other
    lengths (the graph of the generation test above: four rows of 256)."""
    with torch.inference_mode():
        eager, step, ids = filled(model64, [13, 101, 238], capacity=256)
        compiled, compiled_step, _ = filled(model64, [13, 101, 238], capacity=256, compile=True)
        for _ in range(18):  # row 2 from 238 to 256 tokens: its capacity
            tokens = torch.stack([ids[r, int(eager.lengths[r])] if r < 3 else torch.tensor(0) for r in range(4)])
            assert_close_scaled(compiled_step(tokens)[:3], step(tokens)[:3])  # float64: 1e-9
        assert compiled.lengths.tolist() == [31, 119, 256, 0]
        with pytest.raises(ValueError, match="full"):
            compiled_step(tokens)


def test_the_compiled_speculative_step_equals_eager_through_rollbacks(model):
    """``SpeculativeStep`` compiled (both parts, each one graph) against eager, on rows at different lengths: two
    tokens a row, the MTP block's draft on their streams, and alternate rows' drafts rolled back, over calls that
    wrap the ring and end CSA and HCA blocks (lengths grow by 1 or 2 a call, unevenly)."""
    from dsv4.model.speculative import SpeculativeStep

    def speculative(compile):
        state = DecodeState(model, 3, 128, mtp=True)
        step = SpeculativeStep(model, state)
        if compile:
            assert step.compile(fullgraph=True), "the speculative step does not compile as graphs without breaks"
        prefill_rows(model, state, ids, [3, 17, 40])
        return state, step

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 128), generator=g)
    with torch.inference_mode():
        (eager, e_step), (compiled, c_step) = speculative(False), speculative(True)
        for call in range(30):
            tokens = torch.randint(0, VOCAB, (3, 2), generator=g)
            after = torch.randint(0, VOCAB, (3, 2), generator=g)
            positions = eager.lengths.unsqueeze(1) + torch.arange(2)
            outs = []
            for state, step in ((eager, e_step), (compiled, c_step)):
                mark = state.mark()
                streams, logits = step.verify(tokens)
                drafts = step.draft(streams, after, positions)
                rejected = [r for r in range(3) if (r + call) % 2]
                state.rollback(mark, [1] * len(rejected), rejected)
                outs.append((logits, drafts))
            assert_close_scaled(outs[1][0], outs[0][0])
            assert_close_scaled(outs[1][1], outs[0][1])
            assert eager.lengths.tolist() == compiled.lengths.tolist()
        assert eager.lengths.tolist() == [48, 62, 85]  # 15 calls of 2 and 15 of 1 a row
        if fused.available():  # both graphs called without dynamo, as the plain step's
            assert c_step.direct == {"verify": True, "draft": True}
        with pytest.raises(ValueError, match="two tokens per row"):
            c_step.verify(tokens[:, :1])


def test_compiled_speculative_generation_gives_plain_greedy_tokens(model64, monkeypatch):
    """``speculative_stream(compile=True)`` in float64 gives the tokens of plain greedy decoding, with drafts kept
    and rejected along the way: the random model's MTP block is helped to the right draft (greedy decoding's next
    token) at two positions of three, so that both branches run."""
    from dsv4.generate import speculative_stream
    from dsv4.model.speculative import SpeculativeStep

    prompt = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
    want = generate(model64, prompt, 40, temperature=0)[0].tolist()
    draft = SpeculativeStep.draft

    def helped(self, streams, next_ids, positions):
        logits = draft(self, streams, next_ids, positions).clone()
        for j in range(positions.shape[1]):
            target = int(positions[0, j]) + 2  # the position of the token this draft guesses
            if target < len(want) and target % 3:
                logits[0, j, want[target]] += 1e3
        return logits

    monkeypatch.setattr(SpeculativeStep, "draft", helped)
    stats, info = {}, {}
    with torch.inference_mode():
        spec = torch.cat(list(speculative_stream(model64, prompt, 40, temperature=0, compile=True, stats=stats,
                                                 info=info)))
    assert info["compile_seconds"] is not None and info["capacity"] == 256
    assert spec.tolist() == want[30:]
    assert 0 < stats["accepted"] < stats["drafts"] == stats["calls"] < 39


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
    with caplog.at_level(logging.WARNING, logger="dsv4.model.decode"):
        eng = Engine(model, Letters(), max_model_len=64, max_num_seqs=4, compile=True)
        assert eng.compile_seconds is None and "decoding eager" in caplog.text
        assert not eng.state.active.any() and not eng.state.lengths.any()
        caplog.clear()
        info = {}
        prompt = torch.arange(10)
        out = generate(model, prompt, 6, temperature=0, compile=True, info=info)
        assert info["compile_seconds"] is None and "decoding eager" in caplog.text
        assert torch.equal(out, generate(model, prompt, 6, temperature=0))


def test_capacity_buckets():
    assert [capacity_bucket(n, 65536) for n in (1, 256, 257, 5000)] == [256, 256, 512, 8192]
    assert capacity_bucket(70000, 100000) == 100000
    with pytest.raises(ValueError, match="max_position_embeddings"):
        capacity_bucket(70000, 65536)
    with pytest.raises(ValueError, match="at least one token"):
        capacity_bucket(0, 65536)


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


def test_a_compiled_linear_of_a_few_rows_equals_f_linear():
    """Inside a compiled graph, 2 to ``FUSE_ROWS`` rows against a weight of at most ``FUSE_MAX`` elements are a
    product and a sum (``dsv4.model.linear``), a larger weight a library call: both F.linear's product, in float64
    to rounding."""
    import torch.nn.functional as F

    from dsv4.model.linear import FUSE_MAX, FUSE_ROWS, linear

    g = torch.Generator().manual_seed(0)
    small, large = (torch.randn(out, 256, generator=g, dtype=torch.float64) for out in (96, FUSE_MAX // 256 + 8))
    bias = torch.randn(96, generator=g, dtype=torch.float64)

    def f(x):
        return linear(x, small, bias), linear(x, large)

    with torch.inference_mode():
        compiled = torch.compile(f, dynamic=False)
        for rows in (2, FUSE_ROWS):
            x = torch.randn(rows, 256, generator=g, dtype=torch.float64)
            for got, want in zip(compiled(x), (F.linear(x, small, bias), F.linear(x, large))):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_an_unguarded_step_skips_guards_and_compiles_once_more_for_an_unseen_input():
    # decode.unguarded: no new trace for a tensor made outside inference mode (cloned as the warm-up's kind), a
    # second graph (through the guarded call) for a shape the warm-up did not have, then both run unguarded
    from dsv4.model.decode import unguarded

    traces = []

    def double(x):
        traces.append(x.shape)  # a Python side effect: runs when dynamo traces, not when the graph runs
        return x * 2

    fn = torch.compile(double, backend="eager", dynamic=False)
    with torch.inference_mode():
        fn(torch.ones(3))
    run = unguarded(fn)
    assert torch.equal(run(torch.ones(3)), torch.full((3,), 2.0)) and len(traces) == 1
    assert torch.equal(run(torch.ones(4)), torch.full((4,), 2.0)) and len(traces) == 2
    assert torch.equal(run(torch.ones(4)), torch.full((4,), 2.0)) and len(traces) == 2


def test_a_direct_step_runs_its_one_graph_and_is_refused_where_it_cannot_be_shown_safe():
    # decode.direct_step: the graph called without dynamo, where one graph takes the warm-up's tokens, writes its
    # buffers in place and repeats its first call; refused for an attribute given a new tensor (which dynamo would
    # store) and for a function split into two graphs
    buf = torch.zeros(3)

    def step(tokens):
        buf.copy_(tokens + 1)  # written in place: the graph returns the buffer itself
        return tokens * 2 + buf.sum()

    warm = torch.zeros(3)
    owner = types.SimpleNamespace(model=torch.nn.Module(), state=types.SimpleNamespace())  # holds none of them
    fn = decode.compile_step(step, "cpu")
    with torch.inference_mode(), decode.capturing([]) as graphs:
        first = fn(warm)
    direct = decode.direct_step(owner, graphs, warm, first)
    assert len(graphs) == 1 and direct is not None
    assert torch.equal(direct(torch.ones(3)), torch.full((3,), 8.0)) and torch.equal(buf, torch.full((3,), 2.0))
    run = decode.direct_or(direct, warm, lambda t: "guarded")
    assert run(torch.ones(3, dtype=torch.float64)) == "guarded" and torch.equal(run(warm), first)

    class Holder:
        t = torch.zeros(3)

    holder = Holder()

    def rebinds(tokens):
        holder.t = tokens + 1  # a new tensor stored on an object: dynamo's code after the graph does that
        return tokens * 2

    fn = decode.compile_step(rebinds, "cpu")
    with torch.inference_mode(), decode.capturing([]) as graphs:
        first = fn(warm)
    assert len(graphs) == 1 and decode.direct_step(owner, graphs, warm, first) is None

    def split(tokens):
        a = tokens * 2
        torch._dynamo.graph_break()
        return a + 1

    fn = decode.compile_step(split, "cpu")
    with torch.inference_mode(), decode.capturing([]) as graphs:
        first = fn(warm)
    assert len(graphs) == 2 and decode.direct_step(owner, graphs, warm, first) is None
    assert decode.direct_step(owner, [], warm, first) is None  # nothing captured, and no shared graph fits


def test_what_the_cpu_can_check_of_the_cuda_graph_step(model):
    # on a CUDA device compile_step records the step as CUDA graphs (benchmarks/gpu_check.py holds it to the eager
    # step there): every tensor of the decode state is marked a static input, which the graphs write in place
    # instead of copying in and out, and a replayed step hands out copies of its outputs, which the next replay
    # of the graphs overwrites
    state = DecodeState(model, 2, 64, mtp=True)
    found = {decode._view(t) for _, t in decode._state_tensors(state)}
    wanted = [state.lengths, state.active]
    for layer in state.all_layers():
        wanted += [layer.ring, layer.ring_pos] + [t for p in layer.parts() for t in vars(p).values() if t is not None]
    assert len(wanted) > 20 and all(decode._view(t) in found for t in wanted)
    decode.static_state(state)
    assert all(t._dynamo_static_input_type == "unguarded" for _, t in decode._state_tensors(state))
    pool = torch.arange(3.0)  # stands for the graphs' memory pool
    replay = decode.replayed(lambda x: (pool * x, {"same": pool}))
    product, named = replay(torch.tensor(2.0))
    assert torch.equal(named["same"], pool) and named["same"].data_ptr() != pool.data_ptr()
    assert torch.equal(product, torch.tensor([0.0, 2.0, 4.0]))
