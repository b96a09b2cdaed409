"""The analytic cost model against the report's figures (spec 8) and hand computations."""

import json

import pytest

from dsv4 import cli
from dsv4.config import CSA, HCA, SLIDING, ModelConfig
from dsv4.cost import (
    check_context, cost_report, decode_read_bytes, decode_roofline_seconds, entry_bytes, experts_touched, gqa8_cost,
    indexer_key_bytes, kv_cache_bytes, layer_kv_bytes, matmul_parameters, parse_context, v3_cost, v32_cost, v4_cost,
    v4_layer_costs,
)

M = 1 << 20


@pytest.fixture(scope="module")
def reports():
    return {p: cost_report(ModelConfig.preset(p), M, preset=p) for p in ("v4-flash", "v4-pro")}


@pytest.mark.parametrize("preset,flops,kv", [("v4-pro", 0.265, 0.103), ("v4-flash", 0.099, 0.072)])
def test_report_ratios_at_1m(reports, preset, flops, kv):
    r = reports[preset]
    assert r["flops_vs_v32"] == pytest.approx(flops, abs=0.01)
    assert r["kv_vs_v32"] == pytest.approx(kv, abs=0.01)


@pytest.mark.parametrize("preset", ["v4-pro", "v4-flash"])
def test_kv_about_two_percent_of_gqa8(reports, preset):
    assert reports[preset]["kv_vs_gqa8"] == pytest.approx(0.02, abs=0.002)


def test_plain_counting_matches_spec(reports):
    # Spec 8: plain FLOP counting gives 26.2% / 12.1%.
    assert reports["v4-pro"]["plain_flops_vs_v32"] == pytest.approx(0.262, abs=0.005)
    assert reports["v4-flash"]["plain_flops_vs_v32"] == pytest.approx(0.121, abs=0.005)


def test_breakdown_matches_spec():
    v32 = v32_cost(M)
    assert v32.weighted_flops == pytest.approx(1192e9, rel=0.005)
    assert v32.kv_bytes_per_token == 48_068
    assert v32.other_matmul_flops == 74e9
    pro, flash = ModelConfig.preset("v4-pro"), ModelConfig.preset("v4-flash")
    p, f = v4_cost(pro, M), v4_cost(flash, M)
    assert p.weighted_flops == pytest.approx(316e9, rel=0.01)
    assert f.weighted_flops == pytest.approx(118e9, rel=0.01)
    assert p.core_attention_flops == pytest.approx(76.7e9, rel=0.005)
    assert p.indexer_flops == pytest.approx(128.8e9, rel=0.005)
    assert f.core_attention_flops == pytest.approx(23.6e9, rel=0.005)
    assert f.indexer_flops == pytest.approx(90.2e9, rel=0.005)
    # The spec's per-token KV leaves out the 128-entry windows (a few bytes per token at 1M).
    assert p.kv_bytes_per_token == pytest.approx(4970, abs=5)
    assert f.kv_bytes_per_token == pytest.approx(3471, abs=5)
    # The report's activated counts: 13B and 49B.
    assert matmul_parameters(flash) == pytest.approx(13e9, rel=0.03)
    assert matmul_parameters(pro) == pytest.approx(49e9, rel=0.03)


def test_entry_sizes():
    pro = ModelConfig.preset("v4-pro")
    assert entry_bytes(pro) == 576 and indexer_key_bytes(pro) == 68
    tiny = ModelConfig.preset("tiny")  # head 64 with 16 rope dims, indexer dim 32
    assert entry_bytes(tiny) == 48 + 2 * 16 and indexer_key_bytes(tiny) == 16 + 1


def _tiny_uniform(L, b):
    # tiny: layers [SWA, CSA, HCA, CSA], head_dim 64, window 16, rates 4 / 16, index_head_dim 32.
    window = 4 * min(L, 16) * 64
    csa = 2 * (L // 4) * (64 + 32)
    hca = (L // 16) * 64
    return b * (window + csa + hca)


@pytest.mark.parametrize("L,b,expected", [(1, 4, 1024), (3, 2, 1536), (5, 4, 5888), (17, 2, 9856),
                                          (100, 4, None), (1001, 4, 224256), (4099, 2, None)])
def test_uniform_kv_bytes_tiny(L, b, expected):
    tiny = ModelConfig.preset("tiny")
    got = kv_cache_bytes(tiny, L, b)
    assert got == _tiny_uniform(L, b)
    if expected is not None:
        assert got == expected


def test_uniform_kv_bytes_accepts_dtype():
    torch = pytest.importorskip("torch")
    tiny = ModelConfig.preset("tiny")
    assert kv_cache_bytes(tiny, 77, torch.bfloat16) == kv_cache_bytes(tiny, 77, 2)
    assert kv_cache_bytes(tiny, 77, torch.float32) == _tiny_uniform(77, 4)


def test_decode_read_bytes_tiny():
    tiny = ModelConfig.preset("tiny")  # top-k 8
    L = 100  # window 16; CSA: 25 entries (8 read) and 25 indexer keys; HCA: 6 entries
    read = decode_read_bytes(tiny, L, 2)
    assert read["weights"] == 2 * matmul_parameters(tiny)
    assert read["attention"] == 2 * (4 * 16 * 64 + 2 * (8 * 64 + 25 * 32) + 6 * 64)


def test_decode_roofline_takes_the_longer_of_flops_and_bytes():
    tiny = ModelConfig.preset("tiny")
    cost, read = v4_cost(tiny, 100), decode_read_bytes(tiny, 100, 4)
    attn_flops = cost.core_attention_flops + cost.indexer_flops
    # bytes-bound at 1 byte/s, FLOPs-bound at 1 FLOP/s
    assert decode_roofline_seconds(tiny, 100, 4, 1e30, 1.0) == read["weights"] + read["attention"]
    assert decode_roofline_seconds(tiny, 100, 4, 1.0, 1e30) == cost.other_matmul_flops + attn_flops
    # a batch of 5 rows: 5x the FLOPs and each row's cache, the shared weights read once
    assert decode_roofline_seconds(tiny, 100, 4, 1.0, 1e30, batch=5) == 5 * (cost.other_matmul_flops + attn_flops)
    read5 = decode_read_bytes(tiny, 100, 4, batch=5)
    assert read5["attention"] == 5 * read["attention"]
    assert decode_roofline_seconds(tiny, 100, 4, 1e30, 1.0, batch=5) == read5["weights"] + read5["attention"]


def test_a_batch_reads_the_experts_its_rows_touch():
    tiny = ModelConfig.preset("tiny")  # 8 routed experts, 2 per token, 4 layers of 3 x 128 x 128 each
    assert experts_touched(tiny, 1) == 2 and experts_touched(tiny, 2) == 8 * (1 - 0.75 ** 2)
    assert experts_touched(tiny, 1000) == pytest.approx(8)
    expert = 3 * 128 * 128 * 4  # float32 bytes of one expert
    one, many = (decode_read_bytes(tiny, 100, 4, batch=b)["weights"] for b in (1, 1000))
    assert many - one == pytest.approx(4 * 6 * expert, abs=4)  # every layer's six other experts, once each
    with pytest.raises(ValueError, match="batch"):
        decode_read_bytes(tiny, 100, 4, batch=0)


def test_report_layout_kv_tiny():
    tiny = ModelConfig.preset("tiny")
    L = 21  # window 16; 5 CSA entries; 1 HCA entry
    assert layer_kv_bytes(tiny, SLIDING, L) == 16 * 80
    assert layer_kv_bytes(tiny, CSA, L) == 16 * 80 + 5 * (80 + 17)
    assert layer_kv_bytes(tiny, HCA, L) == 16 * 80 + 1 * 80
    assert kv_cache_bytes(tiny, L) == 4 * 16 * 80 + 2 * 5 * 97 + 80


def test_small_context_flops_use_visible_entries():
    flash = ModelConfig.preset("v4-flash")
    rows = v4_layer_costs(flash, 10)  # window holds 10 tokens, 2 CSA entries, no HCA entry
    h, c = 64, 512
    assert rows[SLIDING].core_attention_flops == 2 * 4 * h * c * 10
    assert rows[CSA].core_attention_flops == 21 * 4 * h * c * (2 + 10)
    assert rows[CSA].indexer_flops == 21 * 2 * 64 * 128 * 2
    assert rows[HCA].core_attention_flops == 20 * 4 * h * c * 10
    assert v32_cost(10).core_attention_flops == 61 * 2 * 128 * (576 + 512) * 10
    assert v3_cost(5000).core_attention_flops == 61 * 2 * 128 * (576 + 512) * 5000
    assert gqa8_cost(flash, 100).kv_bytes == 43 * 100 * 4096


def test_totals_are_sums_of_rows():
    for name in ("tiny", "small", "v4-flash"):
        cfg = ModelConfig.preset(name)
        rows = v4_layer_costs(cfg, 12345)
        total = v4_cost(cfg, 12345)
        assert sum(r.flops for r in rows.values()) == total.flops
        assert sum(r.kv_bytes for r in rows.values()) == total.kv_bytes == kv_cache_bytes(cfg, 12345)
        assert total.other_matmul_flops == 2 * matmul_parameters(cfg)
        assert rows["head"].other_matmul_flops > 0


@pytest.mark.parametrize("bad", [0, -3, 1.5, "100", None, True])
def test_bad_context_raises(bad):
    with pytest.raises(ValueError, match="context"):
        kv_cache_bytes(ModelConfig.preset("tiny"), bad)
    with pytest.raises(ValueError, match="context"):
        check_context(bad)


def test_parse_context():
    assert parse_context("1M") == M and parse_context("128K") == 131072
    assert parse_context("1_048_576") == parse_context("1,048,576") == M
    for bad in ("0", "-5", "1.5", "abc", "1G", ""):
        with pytest.raises(ValueError, match="context"):
            parse_context(bad)


@pytest.fixture
def main(monkeypatch):
    # Only the cost subcommand: the test must not depend on other subcommands' modules.
    monkeypatch.setattr(cli, "COMMANDS", {"cost": cli.COMMANDS["cost"]})
    return cli.main


def test_cli_json(main, capsys):
    assert main(["cost", "--preset", "v4-pro", "--context", "1048576", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # exactly one object: json.loads rejects trailing data
    for key in ("flops_vs_v32", "kv_vs_v32", "kv_vs_gqa8", "flops_vs_v3", "weighting", "context", "preset",
                "layer_types", "baselines"):
        assert key in report
    assert report["preset"] == "v4-pro" and report["context"] == M
    assert report["flops_vs_v32"] == pytest.approx(0.265, abs=0.01)
    assert set(report["layer_types"]) == {CSA, HCA, "head"}


def test_cli_text_and_config(main, capsys, tmp_path):
    path = tmp_path / "config.json"
    ModelConfig.preset("v4-flash").to_json(path)
    assert main(["cost", "--config", str(path), "--context", "1M"]) == 0
    out = capsys.readouterr().out
    assert "weighting: FP8-equivalent" in out and "V3.2" in out and "GQA-8" in out
    assert "9.97%" in out and "7.23%" in out


def test_cli_plot(main, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "cost.png"
    assert main(["cost", "--preset", "tiny", "--context", "4096", "--json", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "lots"])
def test_cli_bad_context(main, capsys, bad):
    assert main(["cost", "--preset", "tiny", f"--context={bad}"]) == 2
    captured = capsys.readouterr()
    assert "context" in captured.err and captured.out == ""
