"""The claims lab (``dsv4 lab``): the framework on a stand-in lab, then every registered lab's --quick mode end to end
(the labs share one prepared corpus through one --out folder)."""

from __future__ import annotations

import json
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
