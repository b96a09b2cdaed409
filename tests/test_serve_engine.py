"""The inference engine and the prefix cache, without HTTP: continuous batching gives each request its solo output,
resumed prefixes give the logits of a cold prefill, the cache's tiers keep their budgets and survive restarts and
corrupt files, cancellation frees rows."""

import logging
import threading

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.generate import generate
from dsv4.model.decode import compressor_rates
from dsv4.serve.engine import Engine, EngineError, SamplingParams
from dsv4.serve.prefix_cache import PrefixCache, model_fingerprint
from lively import lively
from numerics import assert_close_scaled

VOCAB = 257


class Letters:
    """A stand-in tokenizer: id i is one letter; EOS is id 1."""

    eos_id, bos_id, sha256 = 1, 0, "letters"

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


class LetterDecoder:
    def push(self, token: int) -> str:
        return chr(97 + token % 26)

    def flush(self) -> str:
        return ""


def tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return lively(Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB)).eval()).to(dtype)


def engine(model, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_seqs", 3)
    kw.setdefault("prefill_chunk", 32)
    eng = Engine(model, Letters(), **kw)
    eng.new_decoder = LetterDecoder
    return eng.start()


def prompts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def solo(model, ids, n):
    return generate(model, torch.tensor(ids), n, temperature=0)[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_concurrent_requests_get_their_solo_greedy_output_and_free_every_row(model):
    eng = engine(model)
    try:
        ps = prompts(5, 40, 70, 17, 100, 3)  # more requests than rows: some wait
        outs = [None] * len(ps)

        def go(i):
            outs[i] = eng.generate(ps[i], SamplingParams(max_tokens=12 + i, temperature=0, ignore_eos=True))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(ps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, p in enumerate(ps):
            assert outs[i][0]["token_ids"] == solo(model, p, 12 + i), i
            assert outs[i][0]["finish_reason"] == "length"
            assert outs[i][0]["text"] == Letters().decode(outs[i][0]["token_ids"])
        assert eng.kv_bytes_in_use() == 0 and sorted(eng.free) == [0, 1, 2] and not eng.running
        assert eng.stats["prompt_tokens"] == sum(map(len, ps))
    finally:
        eng.shutdown()


def test_a_longer_prompt_resumes_from_the_cached_prefix_with_the_same_tokens(model):
    eng = engine(model)
    try:
        first, = prompts(100, seed=2)
        eng.generate(first, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        longer = first + prompts(37, seed=3)[0]
        out = eng.generate(longer, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        assert out[0]["token_ids"] == solo(model, longer, 10)
        assert eng.prefix.stats.hits == 1 and eng.prefix.stats.hit_tokens == 96  # the last 16-token boundary
    finally:
        eng.shutdown()


def test_n_samples_stop_strings_seeds_and_logprobs(model):
    eng = engine(model)
    try:
        p, = prompts(30, seed=4)
        params = SamplingParams(max_tokens=15, temperature=1.0, seed=7, n=3, ignore_eos=True, logprobs=2)
        a, b = eng.generate(p, params), eng.generate(p, params)
        assert [o["token_ids"] for o in a] == [o["token_ids"] for o in b]  # seeded: reproducible
        assert len({tuple(o["token_ids"]) for o in a}) > 1  # the samples differ from each other
        lp = a[0]["logprobs"][0]
        assert lp["logprob"] <= 0 and len(lp["top"]) == 2 and lp["top"][0][1] >= lp["top"][1][1]
        greedy = eng.generate(p, SamplingParams(max_tokens=15, temperature=0, ignore_eos=True))[0]["text"]
        stop = greedy[5:7]
        out = eng.generate(p, SamplingParams(max_tokens=15, temperature=0, ignore_eos=True, stop=[stop]))[0]
        assert out["finish_reason"] == "stop" and out["text"] == greedy[:greedy.find(stop)]
    finally:
        eng.shutdown()


def test_cancelled_requests_free_their_rows_and_others_finish(model):
    eng = engine(model)
    try:
        ps = prompts(20, 25, 30, seed=5)
        done = threading.Event()
        seen = []

        def emit(ev):
            seen.append(ev)
            if ev.finish_reason:
                done.set()

        from dsv4.serve.engine import Request

        req = eng.submit(Request(ps[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), emit))
        other = threading.Thread(target=lambda: seen.append(
            eng.generate(ps[1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))))
        other.start()
        while not any(ev.token_ids for ev in seen if hasattr(ev, "token_ids")):
            threading.Event().wait(0.01)
        req.cancel()
        assert done.wait(60)
        other.join(60)
        assert seen[-1][0]["token_ids"] == solo(model, ps[1], 20)
        assert [ev.finish_reason for ev in seen if hasattr(ev, "finish_reason") and ev.finish_reason] == ["abort"]
        assert eng.kv_bytes_in_use() == 0 and len(eng.free) == 3
    finally:
        eng.shutdown()


def test_requests_that_can_never_run_are_refused(model):
    eng = engine(model)
    try:
        for ids, params, match in [
            (prompts(256)[0], SamplingParams(), "maximum context length"),
            (prompts(10)[0], SamplingParams(max_tokens=250), "exceed"),
            (prompts(10)[0], SamplingParams(n=4), "n=4"),
            (prompts(10)[0], SamplingParams(max_tokens=-1), "max_tokens"),
            (prompts(10)[0], SamplingParams(temperature=-0.5), "temperature"),
            ([], SamplingParams(), "no token"),
            ([VOCAB], SamplingParams(), "token ids"),
        ]:
            with pytest.raises(EngineError, match=match):
                eng.validate(ids, params)
    finally:
        eng.shutdown()


def test_speculative_decoding_gives_the_greedy_output_of_plain_decoding(model):
    """Drafts right for some rows and steps and wrong for others (an oracle that knows each request's greedy output
    stands in for a trained MTP block, whose drafts a random model never gets right), under concurrency: every
    output equals plain decoding's; accepted drafts save steps, rejected ones are rolled back. Then the real MTP
    block's drafts."""
    eng = engine(model, speculative=True)
    try:
        ps = prompts(9, 33, 50, 70, 21, seed=11)
        want = {tuple(p): solo(model, p, 24) for p in ps}
        real_set_draft = eng._set_draft

        def oracle(sample, draft_logits):
            truth = want[tuple(sample.request.prompt_ids)]
            k = len(sample.ids)
            right = k < len(truth) and (k + sample.row) % 3 != 0
            sample.draft, sample.draft_probs = (truth[k] if right else (truth[k - 1] + 1) % VOCAB), None

        eng._set_draft = oracle
        outs = [None] * len(ps)

        def go(i):
            outs[i] = eng.generate(ps[i], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(ps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [o[0]["token_ids"] for o in outs] == [want[tuple(p)] for p in ps]
        assert 0 < eng.stats["accepted"] < eng.stats["drafts"]
        before = eng.stats["steps"]
        assert eng.generate(ps[1], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]["token_ids"] \
            == want[tuple(ps[1])]
        assert eng.stats["steps"] - before < 23 * 0.8  # alone: kept drafts saved steps (plain decoding: 23)
        eng._set_draft = real_set_draft
        out = eng.generate(ps[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        assert out[0]["token_ids"] == want[tuple(ps[0])]
    finally:
        eng.shutdown()


def test_speculative_decoding_needs_an_mtp_block():
    model = lively(Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB, num_nextn_predict_layers=0)))
    with pytest.raises(ValueError, match="MTP"):
        Engine(model.eval(), Letters(), max_model_len=64, max_num_seqs=1, speculative=True)


# ------------------------------------------------------------------------------------------------- prefix cache
def prefix_cache(model, **kw):
    kw.setdefault("memory_bytes", 1 << 30)
    return PrefixCache(block=16, rates=compressor_rates(model), fingerprint=model_fingerprint(model),
                       new_cache=lambda: model.new_cache(1), **kw)


@pytest.mark.parametrize("tier, dtype", [("memory", torch.float64), ("disk", torch.float64),
                                         ("memory", torch.float32), ("disk", torch.float32)])
def test_resuming_from_a_snapshot_equals_one_cold_prefill(tier, dtype, tmp_path):
    """A 96-token prefix (the ring wrapped, CSA and HCA entries emitted) resumes for a suffix that ends mid
    compressor block; float64 within 1e-9, float32 within a tolerance scaled to the logits; from memory and, after
    a restart, from disk."""
    model = tiny(dtype)
    ids, = prompts(96 + 23, seed=6)
    with torch.no_grad():
        cold = model(torch.tensor([ids]))
        cache = model.new_cache(1)
        model(torch.tensor([ids[:96]]), cache=cache)
        store = prefix_cache(model, disk_dir=tmp_path, disk_bytes=1 << 30)
        assert store.store(ids, cache) == 6
        if tier == "disk":  # a new process: an empty memory tier over the same directory
            store = prefix_cache(model, disk_dir=tmp_path, disk_bytes=1 << 30)
            assert len(store.nodes) == 0 and len(store.disk) == 6
        length, resumed = store.lookup(ids)
        assert length == 96
        warm = model(torch.tensor([ids[96:]]), cache=resumed)
    assert_close_scaled(warm, cold[:, 96:])


def test_corrupt_or_truncated_disk_entries_are_skipped_and_recomputed(tmp_path, caplog):
    model = tiny(torch.float64)
    ids, = prompts(70, seed=7)
    with torch.no_grad():
        for cut in (32, 64):
            cache = model.new_cache(1)
            model(torch.tensor([ids[:cut]]), cache=cache)
            prefix_cache(model, disk_dir=tmp_path, disk_bytes=1 << 30).store(ids, cache)
        store = prefix_cache(model, disk_dir=tmp_path, disk_bytes=1 << 30)
        files = {int(m.length): store._path(k) for k, m in store.disk.items()}
        data = files[64].read_bytes()
        files[64].write_bytes(data[:len(data) // 2])  # truncated: a write that died half-way
        (store.dir / f"{'0' * 64}.safetensors.tmp-123").write_bytes(b"partial")
        store = prefix_cache(model, disk_dir=tmp_path, disk_bytes=1 << 30)
        assert not list(store.dir.glob("*.tmp-*"))
        with caplog.at_level(logging.WARNING, logger="dsv4.serve"):
            length, resumed = store.lookup(ids)
        assert length == 32 and store.stats.corrupt >= 1
        assert "skipping" in caplog.text
        cold = model(torch.tensor([ids]))
        warm = model(torch.tensor([ids[32:]]), cache=resumed)
    assert_close_scaled(warm, cold[:, 32:])


def test_tiers_stay_within_their_budgets_and_keep_the_most_recent(tmp_path):
    model = tiny(torch.float32)
    node = None
    with torch.no_grad():
        seqs = prompts(*([48] * 6), seed=8)
        caches = []
        for s in seqs:
            cache = model.new_cache(1)
            model(torch.tensor([s]), cache=cache)
            caches.append(cache)
        probe = prefix_cache(model)
        probe.store(seqs[0], caches[0])
        node = probe.memory_used  # one sequence's three blocks with one anchor
        store = prefix_cache(model, memory_bytes=2 * node, disk_dir=tmp_path, disk_bytes=3 * node + 4096)
        for s, c in zip(seqs, caches):
            store.store(s, c)
            assert store.memory_used <= 2 * node and store.disk_used <= 3 * node + 4096
        assert store.stats.evicted_nodes > 0
        assert store.lookup(seqs[-1] + [5])[0] == 48  # the most recent is kept
        assert store.lookup(seqs[0] + [5])[0] == 0  # the oldest is gone from both tiers


def test_another_model_never_reads_this_ones_entries(tmp_path):
    a, b = tiny(seed=0), tiny(seed=1)
    assert model_fingerprint(a) != model_fingerprint(b)
    ids, = prompts(40, seed=9)
    with torch.no_grad():
        cache = a.new_cache(1)
        a(torch.tensor([ids[:32]]), cache=cache)
    prefix_cache(a, disk_dir=tmp_path, disk_bytes=1 << 30).store(ids, cache)
    assert prefix_cache(b, disk_dir=tmp_path, disk_bytes=1 << 30).lookup(ids) == (0, None)
    assert prefix_cache(a, disk_dir=tmp_path, disk_bytes=1 << 30).lookup(ids)[0] == 32
