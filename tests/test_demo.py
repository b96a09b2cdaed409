"""`dsv4 demo` end to end in a reduced form: a small corpus, a reduced model, a few steps."""

import json

from test_train_cli import run_cli, write_inputs


def demo_args(corpus, config, out, steps=3):
    return ("demo", "--config", config, "--data", corpus, "--vocab-size", 300, "--seq-len", 32, "--batch-size", 2,
            "--steps", steps, "--val-batches", 2, "--max-tokens", 10, "--quiet", "--out", out)


def test_demo_trains_reports_samples_and_saves(tmp_path):
    corpus, config = write_inputs(tmp_path)
    out = tmp_path / "demo"
    rc, stdout, stderr = run_cli(*demo_args(corpus, config, out))
    assert rc == 0, stdout + stderr
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in stdout
    assert "validation before" in stdout and "bits per byte" in stdout
    assert "over the last 3 steps" in stdout and "layer 1 " in stdout and "MTP 0 " in stdout
    assert "\ndef " in stdout  # the sample starts with the prompt
    assert "identical tensors: True" in stdout and "(ok)" in stdout
    for name in ("model/config.json", "model/tokenizer.json", "metrics.jsonl", "curves.png", "checkpoints",
                 "tb", "demo.json"):
        assert (out / name).exists(), name
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # a rerun starts afresh in the same directory, re-using the tokenizer and shards
    rc, stdout, stderr = run_cli(*demo_args(corpus, config, out, steps=2))
    assert rc == 0, stdout + stderr
    assert "re-using its tokenizer and shards" in stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_demo_refuses_a_directory_that_is_not_its_own(tmp_path):
    corpus, config = write_inputs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    rc, _, stderr = run_cli(*demo_args(corpus, config, other))
    assert rc == 2 and "not a demo run directory" in stderr
    assert (other / "notes.txt").read_text() == "keep me"
