"""dsv4 cost --fit (dsv4.cost.fit): weight bytes from safetensors headers, the KV cache against a real cache, and the
predicted peak against a process's measured peak resident memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dsv4 import cli
from dsv4.config import ModelConfig
from dsv4.cost.fit import entries_capacity, plan_checkpoint, plan_memory
from dsv4.cost.weights import KINDS, config_weights
from dsv4.weights.files import read_header
from dsv4.weights.hf import save_pretrained
from dsv4.weights.official import save_official

MIB = 1 << 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from dsv4 import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    root = tmp_path_factory.mktemp("fit")
    save_pretrained(model, root / "hf")
    save_official(model, root / "official")
    return {"model": model, "hf": root / "hf", "official": root / "official"}


def payload_bytes(path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for f in sorted(path.glob("*.safetensors"))
               for t in load_file(str(f)).values())


def test_weight_bytes_are_the_safetensors_payloads(checkpoints):
    hf = plan_checkpoint(checkpoints["hf"], context=4096, memory_bytes=1 << 40)
    official = plan_checkpoint(checkpoints["official"], context=4096, memory_bytes=1 << 40)
    assert hf.dtype == "float32" and "hf layout" in hf.source
    assert official.dtype == "packed" and "official layout" in official.source
    assert hf.weights_bytes == payload_bytes(checkpoints["hf"])
    assert official.weights_bytes == payload_bytes(checkpoints["official"])
    assert official.weights_bytes < 0.5 * hf.weights_bytes  # FP8 matrices and FP4 experts
    # the official checkpoint materialized in float32 is the HF one, kind by kind, and the model's own tensors
    materialized = plan_checkpoint(checkpoints["official"], context=4096, dtype="float32", memory_bytes=1 << 40)
    assert materialized.weights == hf.weights
    model = checkpoints["model"]
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == hf.weights_bytes
    assert config_weights(model.config, "float32") == hf.weights
    assert all(hf.weights[k] > 0 for k in KINDS)
    # plan_memory takes a checkpoint directory as weights too (benchmarks/flash_slice.py does)
    assert plan_memory(None, weights=str(checkpoints["official"]), context=4096,
                       memory_bytes=1 << 40).to_dict() == official.to_dict()
    # packed: no loading peak (the files are mapped); materialized: the checkpoint's tensors, the experts stacked
    # and the model at once
    assert official.loading_bytes == 0
    assert hf.loading_bytes == 2 * hf.weights_bytes + hf.weights["experts"]


def test_v4_flash_packed_is_the_release_size():
    # DeepSeek-V4-Flash is about 160 GB as released (issue 18): FP8 matrices, FP4 experts, BF16 rest, MTP included
    weights = config_weights(ModelConfig.preset("v4-flash"), "packed")
    assert 155e9 < sum(weights.values()) < 165e9
    assert weights["experts"] > 0.9 * sum(weights.values())


def test_kv_cache_matches_a_real_cache(checkpoints):
    model = checkpoints["model"]
    config = model.config
    batch, prompt, chunk, steps = 2, 81, 32, 19  # the prompt in chunks, then a token at a time
    ids = torch.randint(0, config.vocab_size, (batch, prompt + steps))
    with torch.no_grad():
        cache = model.new_cache(batch)
        for a in range(0, prompt, chunk):
            model(ids[:, a:min(a + chunk, prompt)], cache=cache, last_only=True)
        for t in range(prompt, prompt + steps):
            model(ids[:, t:t + 1], cache=cache)
    plan = plan_memory(config, context=prompt + steps, batch=batch, prefill_chunk=chunk, prompt=prompt,
                       memory_bytes=1 << 40)

    def nbytes(t):
        return 0 if t is None else t.numel() * t.element_size()

    rings = sum(nbytes(layer.kv) + nbytes(layer.pos) for layer in cache.layers)
    entries = sum(nbytes(layer.compressor._room) for layer in cache.layers if layer.compressor is not None)
    keys = sum(nbytes(layer.indexer._room) for layer in cache.layers if layer.indexer is not None)
    assert plan.kv["window"] == rings
    assert plan.kv["compressed"] == entries and plan.kv["indexer"] == keys
    partial = sum(nbytes(s.kv) + nbytes(s.gate) + nbytes(s.prev_kv) + nbytes(s.prev_gate)
                  for layer in cache.layers for s in (layer.compressor, layer.indexer) if s is not None)
    assert partial <= plan.kv["compressor_state"]  # the plan counts full partial blocks (m - 1 tokens)


def test_entries_capacity_visits_only_the_growing_calls():
    def every_call(context, chunk, rate, prompt):  # dsv4.cache.append_rows, one call at a time
        cap = 0
        ends = list(range(chunk, prompt, chunk)) + [prompt] + list(range(prompt + 1, context + 1))
        for a, z in zip([0] + ends, ends):
            need, filled = z // rate, a // rate
            if need > filled and need > cap:
                cap = max(need, 2 * filled)
        return cap

    for context in (1, 3, 4, 127, 128, 129, 1000, 4099):
        for chunk in (1, 3, 16, 64, 1000, 4096):
            for rate in (1, 4, 128):
                for prompt in {1, context // 3 or 1, context}:
                    assert entries_capacity(context, chunk, rate, prompt) == every_call(context, chunk, rate, prompt)
    assert entries_capacity(1 << 20, 1, 4) == 1 << 18


# The measured process: loads the HF checkpoint as dsv4.from_pretrained does, prefills N tokens in chunks (last
# position's logits, as dsv4 generate) and decodes a few steps. Peaks are the peak resident set (VmHWM, the counter
# behind ru_maxrss) minus its value after the imports and the fused kernel's loading (the interpreter's baseline, not
# the model's memory); the peak resident set is reset between loading and running (/proc/self/clear_refs) so that
# each phase is measured alone.
_MEASURE = textwrap.dedent("""
    import gc, json, sys
    import torch
    import dsv4.model, dsv4.weights
    from dsv4.model import fused
    from dsv4.weights import from_pretrained
    # VmHWM, ru_maxrss's own counter: ru_maxrss also keeps the high-water mark of the process that forked this one
    # (here pytest's, larger than this whole run), which /proc/self/clear_refs cannot reset
    from dsv4.bench import peak_rss_bytes as peak, reset_peak_rss as reset

    path, dtype, (n, batch, chunk, steps) = sys.argv[1], sys.argv[2], map(int, sys.argv[3:])
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (batch, n))
    fused.kernel()  # the fused extension's library and torch.utils.cpp_extension's imports: runtime, as the imports
    base = peak()
    model = from_pretrained(path, dtype=None if dtype == "none" else getattr(torch, dtype))
    gc.collect()
    load = peak() - base
    separate = reset()
    with torch.no_grad():
        cache = model.new_cache(batch)
        for a in range(0, n, chunk):
            token = model(ids[:, a:a + chunk], cache=cache, last_only=True)[:, -1:].argmax(-1)
        for _ in range(steps):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
    print(json.dumps({"load": load, "run": peak() - base, "separate": separate}))
""")


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    """The small preset (89M parameters, 341 MiB in float32): large enough that the weights, the cache and the
    prefill's working set decide the peak, not the process's runtime (threads' arenas, libraries loaded on first use),
    which varies by several MiB between machines and virtual environments and is all the tiny model's 15 MiB show."""
    from dsv4 import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("small")).eval()
    root = tmp_path_factory.mktemp("fit-small")
    save_pretrained(model, root / "hf")
    save_official(model, root / "official")
    return {"hf": root / "hf", "official": root / "official"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in bytes / 1024 and clear_refs: Linux")
@pytest.mark.parametrize("layout, dtype, n", [("hf", None, 1024), ("official", "float32", 0)])
def test_prediction_against_measured_peak(small_checkpoints, layout, dtype, n):
    """Tolerance: 25% either way. On this machine: HF float32 load 909 MiB against 891 predicted, run 457 against
    433; official materialized load 738 to 854 (between runs) against 740. The tiny model's peaks, where the runtime
    is most of the run, went from 56 to 77 MiB between this machine's venv and CI's with the same code, so the small
    preset is used."""
    batch, chunk, steps = 2, 512, 4 if n else 0  # n = 0: loading alone
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(small_checkpoints[layout]), str(dtype).lower(), str(n),
                          str(batch), str(chunk), str(steps)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread: quick on a busy machine
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    plan = plan_checkpoint(small_checkpoints[layout], context=max(1, n + steps), batch=batch, prefill_chunk=chunk,
                           dtype=dtype, memory_bytes=1 << 40)
    report = (f"measured load {measured['load'] / MIB:.1f} MiB, run {measured['run'] / MIB:.1f} MiB; predicted "
              f"load {plan.loading_peak_bytes / MIB:.1f}, run {plan.total_bytes / MIB:.1f} MiB")
    print(report)
    if measured["separate"] or not n:
        assert measured["load"] == pytest.approx(plan.loading_peak_bytes, rel=0.25), report
    if n and measured["separate"]:
        assert measured["run"] == pytest.approx(plan.total_bytes, rel=0.25), report
    elif n:  # no resettable peak: the whole process against the larger of the two
        assert max(measured["load"], measured["run"]) == pytest.approx(plan.peak_bytes, rel=0.25), report


# ---------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def main(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"cost": cli.COMMANDS["cost"]})
    return cli.main


def test_cli_json_and_text(main, capsys, checkpoints):
    assert main(["cost", "--fit", "--model", str(checkpoints["official"]), "--context", "8K", "--batch-size", "2",
                 "--memory-gib", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)  # exactly one object
    for key in ("weights", "kv_cache", "working", "total_bytes", "memory_bytes", "fits", "verdict"):
        assert key in plan
    assert plan["dtype"] == "packed" and plan["batch"] == 2 and plan["context"] == 8192 and plan["fits"] is True
    assert plan["memory_bytes"] == 4 << 30 and plan["memory_source"] == "given"
    assert plan["total_bytes"] == (plan["weights_resident_bytes"] + plan["kv_bytes"] + plan["working_bytes"]
                                   + plan["runtime_bytes"])
    # mapped weights are resident where touched: 2 x 8K tokens use at most 16K embedding rows, no MTP block
    assert plan["weights_resident"]["mtp"] == 0 < plan["weights"]["mtp"]
    assert plan["weights_resident"]["experts"] == plan["weights"]["experts"]  # 16K tokens touch all 8 experts
    assert plan["weights_resident"]["embedding"] == plan["weights"]["embedding"]  # 16K tokens >= 4096 rows
    assert main(["cost", "--fit", "--model", str(checkpoints["official"]), "--context", "64", "--speculative",
                 "--memory-gib", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["weights_resident"]["mtp"] == plan["weights"]["mtp"]
    assert plan["weights_resident"]["embedding"] == plan["weights"]["embedding"] * 64 // 4096
    # a short prompt prefills fewer tokens than a whole context's worth
    assert main(["cost", "--fit", "--preset", "tiny", "--context", "4096", "--prompt", "600", "--json"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert main(["cost", "--fit", "--preset", "tiny", "--context", "4096", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert short["prompt"] == 600 and whole["prompt"] == 4096
    assert short["working"]["prefill"]["activations"] * 4096 == whole["working"]["prefill"]["activations"] * 600
    assert main(["cost", "--fit", "--preset", "tiny", "--context", "4096"]) == 0
    text = capsys.readouterr().out
    assert "weights" in text and "KV cache" in text and "working memory" in text
    assert text.rstrip().splitlines()[-1].startswith("fits:")


def test_not_fitting_names_the_figure(main, capsys):
    assert main(["cost", "--fit", "--preset", "tiny", "--context", "1M", "--batch-size", "64", "--prefill-chunk", "1",
                 "--memory-gib", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False
    assert plan["verdict"].startswith("does not fit") and "KV cache" in plan["verdict"]
    assert main(["cost", "--fit", "--preset", "tiny", "--context", "1M", "--memory-gib", "1"]) == 0
    assert "working memory" in capsys.readouterr().out.splitlines()[-1]  # HCA's logits of a 2048-query span
    config = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="weights .* alone is too large"):
        plan_memory(config, context=64, prefill_chunk=64, memory_bytes=4 * MIB).check()


@pytest.mark.parametrize("args, words", [(["--prompt", "0"], "--prompt"), (["--batch-size", "0"], "batch"),
                                         (["--prefill-chunk", "0"], "prefill_chunk"),
                                         (["--memory-gib", "0"], "--memory-gib")])
def test_bad_figures_are_named(main, capsys, args, words):
    assert main(["cost", "--fit", "--preset", "tiny", "--context", "4096", *args]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and captured.out == ""


def test_bad_checkpoints_name_the_file(main, capsys, checkpoints, tmp_path):
    def fails(path, *words):
        assert main(["cost", "--fit", "--model", str(path), "--context", "4096"]) == 2
        err = capsys.readouterr().err
        for w in words:
            assert w in err, err

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "config.json", str(empty))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoints["hf"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    fails(corrupt, "model.safetensors", "header")

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoints["hf"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    fails(truncated, "model.safetensors", "truncated")

    sharded = tmp_path / "sharded"
    save_pretrained(checkpoints["model"], sharded, max_shard_bytes=4 * MIB)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert plan_checkpoint(sharded, memory_bytes=1 << 40).weights_bytes == payload_bytes(sharded)
    name, shard = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != shard)
    index["weight_map"][name] = other
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(sharded, shard, name)
    index["weight_map"]["model.layers.0.not_there"] = other
    index["weight_map"][name] = shard
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(sharded, "model.safetensors.index.json", "model.layers.0.not_there")
    index["weight_map"]["model.layers.0.not_there"] = "model-00009-of-00009.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(sharded, "model-00009-of-00009.safetensors")


def test_header_reader_reads_no_data(checkpoints, tmp_path):
    # a header whose data was never written (sparse file): the reader needs only the header and the file's size
    src = checkpoints["hf"] / "model.safetensors"
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = f.read(n)
    sparse = tmp_path / "model.safetensors"
    with open(sparse, "wb") as f:
        f.write(n.to_bytes(8, "little") + head)
        f.truncate(src.stat().st_size)
    assert [(k, t.nbytes) for k, t in read_header(sparse)[0].items()] == \
        [(k, t.nbytes) for k, t in read_header(src)[0].items()]
