"""The benchmark commands run and report what the docs table reads; bad contexts are refused with the figure."""

import json

import pytest

from dsv4 import ModelConfig
from dsv4.bench import check_context
from dsv4.cli import main
from numerics import assert_close_scaled


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_prefill_reports_speed_memory_cache_and_parity(capsys):
    r = run_json(capsys, "bench", "prefill", "--preset", "tiny", "--context", "256", "--repeats", "1", "--device",
                 "cpu", "--json")
    assert r["device"] == "cpu" and "peak_gpu_mem_gib" not in r
    for key in ("seconds", "dense_seconds", "speedup_vs_dense", "peak_rss_gib", "mfu", "kv_bytes",
                "dense_kv_bytes", "cost_model_kv_bytes", "speedup_vs_hf_eager", "max_abs_logit_diff_vs_hf"):
        assert key in r, key
    # exact ties at the indexer's top-k boundary are broken differently by transformers (arbitrarily) and dsv4
    # (toward the lower index); without them the logits agree
    assert r["max_abs_logit_diff_vs_hf"] < 1e-4 or r["indexer_boundary_ties"] > 0
    if r["first_tie_position"] > 0:  # causal: logits before the first tie agree whatever the tie rule
        assert r["max_abs_logit_diff_vs_hf_before_first_tie"] < 1e-4
    assert r["kv_bytes"] < r["dense_kv_bytes"]


def test_train_reports_throughput_and_mfu(capsys):
    r = run_json(capsys, "bench", "train", "--preset", "tiny", "--context", "64", "--batch-size", "1",
                 "--steps", "1", "--warmup-steps", "0", "--json")
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1


def test_bad_contexts_are_refused():
    cfg = ModelConfig.preset("small")
    with pytest.raises(ValueError, match="below one compressed block"):
        check_context(cfg, 100, 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        check_context(cfg, cfg.max_position_embeddings + 1, 4)
    huge = cfg.replace(max_position_embeddings=1 << 40)
    with pytest.raises(ValueError, match="GiB"):
        check_context(huge, 1 << 38, 4)
    with pytest.raises(ValueError, match="x 1000000 rows"):
        check_context(cfg, 1 << 20, 4, batch=1_000_000)


@pytest.mark.parametrize("flag, value", [("--tokens", "0"), ("--repeats", "0"), ("--chunk", "0"), ("--block", "0"),
                                         ("--steps", "0"), ("--batch-size", "0"), ("--warmup-steps", "-1")])
def test_bad_counts_are_refused_naming_the_flag(flag, value, capsys):
    assert main(["bench", "decode", "--preset", "tiny", "--context", "300", flag, value, "--json"]) == 2
    assert f"{flag} must be >=" in capsys.readouterr().err


def test_cache_bytes_match_the_cost_model():
    import torch

    from dsv4 import Transformer
    from dsv4.cost import kv_cache_bytes

    cfg = ModelConfig.preset("tiny").replace(vocab_size=64, num_hidden_layers=3, moe_intermediate_size=16,
                                             layer_types=["compressed_sparse_attention",
                                                          "heavily_compressed_attention", "sliding_attention"],
                                             mlp_layer_types=["moe"] * 3, num_nextn_predict_layers=0)
    model = Transformer(cfg).eval()
    cache = model.new_cache(1)
    with torch.no_grad():
        for i in range(0, 4096, 1024):
            model(torch.randint(0, 64, (1, 1024)), cache=cache, last_only=True)
    predicted = kv_cache_bytes(cfg, 4096, 4)
    assert abs(cache.nbytes() - predicted) <= 0.01 * predicted, (cache.nbytes(), predicted)


def test_dense_baseline_decodes_like_one_call():
    """The dense baseline's growing cache: chunks and single tokens give the logits of one full call."""
    import torch

    from dsv4 import Transformer
    from dsv4.bench_baselines import dense_attention, dense_cache

    cfg = ModelConfig.preset("tiny").replace(vocab_size=64, num_nextn_predict_layers=0)
    model = Transformer(cfg).eval().set_attention(dense_attention)
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        full = model(ids)
        cache = dense_cache(model, 1)
        parts = [model(ids[:, :17], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(17, 40)]
    assert_close_scaled(torch.cat(parts, dim=1), full)  # float32: scaled to the logits' magnitude
    assert cache.nbytes() == 40 * cfg.head_dim * 4 * cfg.num_hidden_layers


def test_the_dense_decode_state_decodes_like_the_growing_cache():
    """The dense baseline's static-shape state (what its compiled step runs): rows at their own lengths give the
    growing cache's logits; a full row and a second token per row are refused."""
    import torch

    from dsv4 import Transformer
    from dsv4.bench_baselines import DenseDecodeState, dense_attention, dense_cache

    cfg = ModelConfig.preset("tiny").replace(vocab_size=64, num_nextn_predict_layers=0)
    model = Transformer(cfg).eval().set_attention(dense_attention)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    state = DenseDecodeState(model, 2, 32)
    with torch.no_grad():
        caches = [dense_cache(model, 1) for _ in range(2)]
        for r, n in enumerate((5, 12)):  # row r's prompt through the growing cache, then copied into the state
            model(ids[r:r + 1, :n], cache=caches[r])
            for layer, lc in zip(state.layers, caches[r].layers):
                layer.kv[r, :n] = lc.kv[0, :n]
            state.lengths[r], state.active[r] = n, True
        for _ in range(10):
            tokens = torch.stack([ids[r, int(state.lengths[r])] for r in range(2)])
            got = model(tokens[:, None], cache=state)[:, 0]
            for r in range(2):
                assert_close_scaled(got[r], model(tokens[r:r + 1, None], cache=caches[r])[0, 0])
        assert state.lengths.tolist() == [15, 22] and state.nbytes() == 2 * 32 * cfg.head_dim * 4 * 4
        with pytest.raises(ValueError, match="one token per row"):
            model(ids[:, :2], cache=state)
        state.lengths[1] = 32
        with pytest.raises(ValueError, match="full"):
            model(ids[:, :1], cache=state)


def test_decode_reports_ratios(capsys):
    r = run_json(capsys, "bench", "decode", "--preset", "tiny", "--context", "300", "--tokens", "2",
                 "--repeats", "1", "--json")
    assert r["speedup_vs_dense"] > 0 and r["cache_ratio_vs_dense"] > 1
    assert r["dense_cache_bytes"] == r["dense_kv_bytes"] + 2 * 64 * 4 * 4  # context, then 2 decoded tokens
    # the roofline: a share of the measured step, growing with the context as its bytes and FLOPs do
    assert 0 < r["roofline_ms_per_token"] and 0 < r["roofline_ms_per_token_4k"]
    assert r["roofline_ratio_vs_4k"] == pytest.approx(r["roofline_ms_per_token"] / r["roofline_ms_per_token_4k"])
    assert r["bandwidth_bytes_per_s"] > 1e8 and r["matmul_peak_flops"] > 1e8
    assert r["batch_size"] == 1 and r["tokens_per_s"] == pytest.approx(1e3 / r["ms_per_token"])


def test_decode_takes_a_batch_of_rows(capsys):
    r = run_json(capsys, "bench", "decode", "--preset", "tiny", "--context", "300", "--tokens", "2",
                 "--repeats", "1", "--batch-size", "3", "--json")
    assert r["batch_size"] == 3 and r["tokens_per_s"] == pytest.approx(3e3 / r["ms_per_token"])
    assert r["dense_cache_bytes"] == r["dense_kv_bytes"] + 3 * 2 * 64 * 4 * 4  # every row: context + 2 tokens
    assert r["cache_ratio_vs_dense"] > 1 and r["speedup_vs_dense"] > 0


@pytest.mark.parametrize("device, message", [("mps", "cpu or cuda"), ("gpu:x", "not a device"),
                                             ("cuda:64", "CUDA device")])
def test_bad_device_is_refused_with_the_reason(device, message):
    from dsv4.bench import resolve_device

    with pytest.raises(ValueError, match=message):
        resolve_device(device)


def test_gpu_check_passes_on_the_cpu():
    # benchmarks/gpu_check.py is the GPU session's first step; here it runs its checks with the CPU as the device
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from gpu_check import check

    result = check(torch.device("cpu"), seq=120)
    assert result["ok"], result
