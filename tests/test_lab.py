"""The claims lab (``dsv4 lab``): the framework on a stand-in lab, then every registered lab's --quick mode end to end
(the labs share one prepared corpus through one --out folder)."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from dsv4 import cli
from dsv4.lab import LABS
from dsv4.lab.common import DOES_NOT_HOLD, HOLDS, LabOptions, json_safe, run_lab, spikes, verdict
from dsv4.lab.docs import write_claims


def _fake_lab(holds: bool = True, answer: bool = True) -> types.ModuleType:
    mod = types.ModuleType("fake_lab")
    mod.TITLE = "a stand-in"
    mod.SPEC = "The spec's sentence (spec 0)."
    mod.THRESHOLD = "x exceeds 1"

    def run(options):
        x = 2.0 if holds else 0.5
        out = {"x": x, "curve": [1.0, float("nan")]}
        return {**out, **verdict(x > 1, f"x = {x}")} if answer else out

    def plot(result, prefix: Path):
        path = Path(f"{prefix}-curve.png")
        path.write_bytes(b"png")
        return [path]

    mod.run, mod.plot = run, plot
    return mod


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "fake_lab", _fake_lab())
    monkeypatch.setitem(LABS, "fake", "fake_lab")
    return "fake"


def test_a_run_writes_its_json_and_plots_and_saves_only_when_asked(fake, tmp_path):
    results = tmp_path / "results"
    r = run_lab(fake, LabOptions(quick=True, out=tmp_path / "out"), results_dir=results)
    assert r["verdict"] == HOLDS and r["reason"] == "x = 2.0" and r["x"] == 2.0
    assert r["command"] == "dsv4 lab fake --quick" and r["threshold"] == "x exceeds 1"
    assert r["curve"] == [1.0, None]  # strict JSON
    assert json.loads((tmp_path / "out" / "fake.json").read_text()) == r
    assert Path(r["plots"][0]) == tmp_path / "out" / "fake-curve.png"
    assert not results.exists()
    run_lab(fake, LabOptions(out=tmp_path / "out", save=True, seed=3), results_dir=results)
    saved = [json.loads(p.read_text()) for p in results.glob("lab-fake-*.json")]
    assert len(saved) == 1 and saved[0]["command"] == "dsv4 lab fake --seed 3" and not saved[0]["quick"]


def test_claims_md_shows_the_newest_full_run(fake, tmp_path, monkeypatch):
    results, docs = tmp_path / "results", tmp_path / "docs"
    run_lab(fake, LabOptions(out=tmp_path / "out", save=True), results_dir=results)
    monkeypatch.setitem(sys.modules, "fake_lab", _fake_lab(holds=False))
    run_lab(fake, LabOptions(quick=True, out=tmp_path / "out", save=True), results_dir=results)
    text = write_claims(results, docs).read_text()
    part = text[text.index("## `fake`"):]
    assert "> The spec's sentence (spec 0)." in part and "Holds if x exceeds 1." in part
    assert "Command: `dsv4 lab fake`" in part and "| x | 2 |" in part  # the full run, not the newer quick one
    assert f"**Verdict: {HOLDS}.** x = 2.0" in part and "![fake: claims-fake-curve](claims-fake-curve.png)" in part
    assert (docs / "claims-fake-curve.png").exists()
    # the load average at the run's end: "other work shared the CPU" only when it was above the core count
    for path in results.glob("lab-fake-*.json"):
        r = json.loads(path.read_text())
        path.write_text(json.dumps({**r, "load_average_at_end": 0.5 if r["quick"] else 4.0 * os.cpu_count()}))
    assert "other work shared the CPU" in write_claims(results, docs).read_text()
    for path in results.glob("lab-fake-*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "load_average_at_end": 0.5}))
    assert "other work shared the CPU" not in write_claims(results, docs).read_text()


def test_a_lab_without_a_verdict_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fake_lab", _fake_lab(answer=False))
    monkeypatch.setitem(LABS, "fake", "fake_lab")
    with pytest.raises(RuntimeError, match="no verdict"):
        run_lab("fake", LabOptions(out=tmp_path))


def test_the_command(fake, tmp_path, capsys):
    assert cli.main(["lab", fake, "--quick", "--json", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["verdict"] == HOLDS and out.count("\n") == 1
    assert cli.main(["lab", "nope"]) == 2
    assert "unknown lab 'nope'" in capsys.readouterr().err
    assert cli.main(["lab"]) == 2
    assert cli.main(["lab", fake, "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_helpers():
    assert verdict(False, "why")["verdict"] == DOES_NOT_HOLD
    assert json_safe({"a": (1.0, float("inf"))}) == {"a": [1.0, None]}
    flat = [2.0 + 0.01 * (i % 3) for i in range(40)]
    assert spikes(flat) == 0 and spikes(flat[:30] + [5.0] + flat[:9]) == 1 and spikes(flat + [None]) == 1


# ------------------------------------------------------------------------------------------ the labs, --quick
# the figures docs/claims.md shows, per lab: each --quick run must carry them
NEEDED = {
    "mhc": ["hc_over_mhc_gain_normal", "hc_over_mhc_gain_high", "mhc_high_max_gain", "hc_high_max_gain",
            "residual_high_val_loss", "hc_diverges_where_mhc_trains"],
    "muon": ["muon_best_lr", "adamw_best_lr", "target_val_loss", "adamw_tokens", "muon_tokens_to_target",
             "mid_schedule_ratio", "budgets", "token_ratio"],
    "routing": ["sqrtsoftplus_hash_val_loss", "sqrtsoftplus_hash_imbalance", "sigmoid_learned_imbalance",
                "softmax_learned_val_loss", "best_val_loss", "best_imbalance"],
    "mtp": ["val_loss_with_mtp", "val_loss_without_mtp", "val_loss_rel_diff", "final_acceptance",
            "final_acceptance_untrained_draft"],
    "fp4": ["qat_val_loss", "qat_fp4_rel_diff", "no_qat_val_loss", "no_qat_fp4_rel_diff"],
    "indexer": ["recall_at_init", "recall_end_of_dense", "recall_end_of_warmup", "val_loss_sparse",
                "val_loss_dense_attention", "sparse_vs_dense"],
}


@pytest.fixture(scope="module")
def lab_out(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")  # one folder: the labs share its prepared corpus


@pytest.mark.parametrize("name", [n for n in LABS if n in NEEDED])
def test_quick_lab_end_to_end(name, lab_out):
    r = run_lab(name, LabOptions(quick=True, out=lab_out))
    assert r["verdict"] in (HOLDS, DOES_NOT_HOLD) and r["reason"]
    for key in NEEDED[name]:
        assert key in r, key
    assert all(Path(p).stat().st_size > 1000 for p in r.get("plots", []))  # real PNGs
    assert json.loads((lab_out / f"{name}.json").read_text())["lab"] == name


def test_mhc_composite_gain_of_a_plain_residual_is_one_and_grows_with_unconstrained_mixing():
    import torch

    import dsv4
    from dsv4.lab.mhc import composite_gains, model_config

    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    gains = {}
    for mode in ("residual", "mhc", "hc"):
        torch.manual_seed(0)
        model = dsv4.Transformer(model_config(300, 2, 32, mode))
        if mode == "hc":  # comb = 1.5 I in every unit: the composite of 4 units is 1.5^4 I
            for layer in model.layers:
                for unit in (layer.hc_attn, layer.hc_ffn):
                    unit.scale.data.zero_()
                    unit.base.data[8:].copy_((1.5 * torch.eye(4)).flatten())
        gains[mode] = composite_gains(model, ids)
    assert gains["residual"] == {"forward": [1.0] * 4, "backward": [1.0] * 4}
    assert all(abs(g - 1) < 1e-4 for g in gains["mhc"]["forward"] + gains["mhc"]["backward"])
    assert gains["hc"]["forward"] == pytest.approx([1.5, 1.5 ** 2, 1.5 ** 3, 1.5 ** 4])


def test_muon_tokens_to_reach():
    from dsv4.lab.muon import tokens_to_reach

    assert tokens_to_reach(2.0, [10, 20, 30], [3.0, 2.5, 1.5], 100) == pytest.approx(2500.0)
    assert tokens_to_reach(3.5, [10, 20], [3.0, 2.5], 100) == 1000.0
    assert tokens_to_reach(1.0, [10, 20], [3.0, None], 100) is None


def test_distill_lab_reads_the_posttrain_pipeline(monkeypatch, tmp_path):
    """The distill lab's --quick run takes minutes (greedy generation for every score), and the pipeline itself is
    tested end to end in tests/test_posttrain.py: here its verdict from the pipeline's JSON."""
    from dsv4.posttrain import run as posttrain

    acc = {"base": {"reverse": 0.0, "sort": 0.0}, "specialist-reverse": {"reverse": 0.9, "sort": 0.0},
           "specialist-sort": {"reverse": 0.0, "sort": 0.8}, "student": {"reverse": 0.88, "sort": 0.6}}

    def fake(args):
        assert args.tasks == "reverse,sort" and args.sft_steps == 2 and args.json
        print(json.dumps({"sft_steps": 2, "rl_steps": 1, "opd_steps": 2, "accuracy": acc, "opd_loss_first": 1.0,
                          "opd_loss_last": 0.5}))
        return 0

    monkeypatch.setattr(posttrain, "run", fake)
    r = run_lab("distill", LabOptions(quick=True, out=tmp_path))
    assert r["student_over_specialist_reverse"] == pytest.approx(0.88 / 0.9)
    assert r["student_over_specialist_sort"] == pytest.approx(0.75)
    assert r["verdict"] == DOES_NOT_HOLD and "sort: student 0.600" in r["reason"]
