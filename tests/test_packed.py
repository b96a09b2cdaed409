"""Released checkpoints at their stored size (#18): tensors memory-mapped from safetensors, FP8 / FP4 / BF16
weights kept as stored and dequantized tile by tile (dsv4.model.packed), the synthetic writer of the released layout,
and the errors a bad checkpoint gets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.config import ModelConfig
from dsv4.model import packed as packed_mod
from dsv4.model.packed import PackedEmbedding, PackedExperts, PackedLinear
from dsv4.weights import read_tensors, save_official, save_pretrained
from dsv4.weights.files import map_tensors, read_header, read_headers
from dsv4.weights.synthetic import write_synthetic
from numerics import assert_close_scaled, prefill_rows


def small_config(**changes) -> ModelConfig:
    """Dimensions that are multiples of the FP8 blocks, with every layer type and the MTP block."""
    return ModelConfig.preset("tiny").replace(**changes)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "ckpt"
    info = write_synthetic(small_config(), path, seed=3, max_shard_bytes=1 << 20)  # several shards and an index
    assert (path / "model.safetensors.index.json").exists() and info["bytes"] > 1 << 20
    return path


@pytest.fixture(scope="module")
def pair(synthetic_dir):
    """(packed, materialized float64) models of the synthetic checkpoint."""
    return dsv4.from_pretrained(synthetic_dir), dsv4.from_pretrained(synthetic_dir, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- mapped files
def test_mapped_tensors_equal_read_tensors(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.float8_e4m3fn), "c": torch.randn(4, 4).bfloat16(),
               "d": torch.arange(5, dtype=torch.int8), "e": torch.randn(2, 3, dtype=torch.float64)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    mapped, read = map_tensors(tmp_path), read_tensors(tmp_path)
    assert set(mapped) == set(read) == set(tensors)
    for k, t in tensors.items():
        assert mapped[k].dtype == t.dtype and mapped[k].shape == t.shape
        assert torch.equal(mapped[k].view(torch.uint8), t.contiguous().view(torch.uint8)), k
    mapped["a"].add_(1)  # a copy-on-write mapping: the file is untouched
    assert torch.equal(read_tensors(tmp_path)["a"], tensors["a"])


def test_each_file_is_mapped_once(synthetic_dir):
    """The tensors of one file are views of one mapping (a mapping per tensor put thousands of whole-file mappings
    on every page of a large checkpoint)."""
    mapped = map_tensors(synthetic_dir)
    files = list(synthetic_dir.glob("*.safetensors"))
    assert len(files) > 1
    storages = {t.untyped_storage().data_ptr() for t in mapped.values()
                if t.untyped_storage().nbytes() in {f.stat().st_size for f in files}}
    assert len(storages) == len(files)


def test_truncated_or_corrupt_files_are_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"tensor 'w'.*truncated"):
        map_tensors(tmp_path)
    f.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + data[28:])
    with pytest.raises(ValueError, match="not JSON"):
        read_header(f)
    f.write_bytes(b"abc")
    with pytest.raises(ValueError, match="shorter than its header length"):
        read_header(f)


def test_headers_check_the_index(synthetic_dir, tmp_path):
    import shutil

    bad = tmp_path / "ckpt"
    shutil.copytree(synthetic_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"]["made.up.tensor"] = index["weight_map"][name]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="made.up.tensor"):
        read_headers(bad)


@pytest.mark.parametrize("decoder", ["kernel", "table"])
def test_fast_dequantization_equals_the_reference_quantizers(decoder, monkeypatch):
    """Both fast decoders (the fused kernel's, and the byte tables where it is not built) give the reference
    quantizers' values exactly, over scales from 2^-18 to 2^8 (past float32's range once E4M3's 2^120 bias is
    folded in: the kernel's scalar branch)."""
    from dsv4 import quant
    from dsv4.model import fused
    from dsv4.model.packed import dequant_rows

    if decoder == "table":
        monkeypatch.setattr(fused, "available", lambda: False)
    elif not fused.available():
        pytest.skip("the fused kernel could not be built here")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 384, generator=g) * torch.logspace(-3, 1, 384)
    w[:128, :128] *= 1e5
    assert torch.equal(dequant_rows(w.bfloat16(), None, 128, 256, torch.float32), w.bfloat16()[128:].float())
    q8, s8 = quant.fp8_block_quant(w)
    q4, s4 = quant.mxfp4_quant(w)
    for r0, r1 in ((0, 256), (128, 256)):
        assert torch.equal(dequant_rows(q8, s8, r0, r1, torch.float32), quant.fp8_block_dequant(q8, s8)[r0:r1])
        assert torch.equal(dequant_rows(q4, s4, r0, r1, torch.float64),
                           quant.mxfp4_dequant(q4, s4)[r0:r1].double())
    odd, s_odd = quant.fp8_block_quant(torch.randn(200, 72, generator=g))  # partial blocks
    assert torch.equal(dequant_rows(odd, s_odd, 128, 200, torch.float32), quant.fp8_block_dequant(odd, s_odd)[128:])


# ---------------------------------------------------------------------------------------------- packed model
def test_official_layout_loads_packed(pair, synthetic_dir):
    packed, _ = pair
    attn = packed.layers[0].attn
    assert isinstance(attn.wq_a, PackedLinear) and attn.wq_a.fmt == "fp8"
    assert attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert isinstance(packed.layers[0].ffn.experts, PackedExperts)
    assert packed.layers[0].ffn.experts.stored[0].w1.dtype == torch.int8
    assert isinstance(packed.embed, PackedEmbedding) and packed.embed.weight.dtype == torch.bfloat16
    assert isinstance(packed.head, PackedLinear) and packed.head.fmt == "plain"
    assert len(packed.mtp) == 1 and isinstance(packed.mtp[0].e_proj, PackedLinear)
    # the packed weights are the file's bytes, not copies: their memory lies in a mapping of a shard
    for t in (attn.wq_a.weight, packed.layers[1].ffn.experts.stored[3].w2, packed.embed.weight):
        assert _mapped_file(t.data_ptr()).startswith(str(synthetic_dir.resolve())), t.shape


def _mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process ("" if none)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    return ""


@pytest.mark.parametrize("tile_bytes", [packed_mod.TILE_BYTES, 4096])  # one tile, and many
def test_packed_equals_materialized_in_float64(pair, tile_bytes, monkeypatch):
    packed, dense = pair
    monkeypatch.setattr(packed_mod, "TILE_BYTES", tile_bytes)
    packed64 = packed.double()
    try:
        ids = torch.randint(0, packed.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = packed64(ids), dense(ids)
            assert a.dtype == torch.float64
            assert_close_scaled(a, b)
            out_a, out_b = packed64.forward_train(ids), dense.forward_train(ids)
            assert_close_scaled(out_a.mtp_logits[0], out_b.mtp_logits[0])
    finally:
        packed.float()
    assert packed.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn  # .double() / .float() kept the bytes


def test_packed_equals_materialized_in_float32(synthetic_dir, pair):
    packed, _ = pair
    dense = dsv4.from_pretrained(synthetic_dir, dtype=torch.float32)
    ids = torch.randint(0, packed.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_scaled(packed(ids), dense(ids))


def test_packed_decoding_matches_materialized(pair):
    """Cached decoding and the serving DecodeState's rows (experts one by one, batch-invariant) on packed weights."""
    from dsv4.model.decode import DecodeState

    packed, dense = pair
    packed64 = packed.double()
    try:
        ids = torch.randint(0, packed.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            full = dense(ids)
            cache = packed64.new_cache(1)
            step = torch.cat([packed64(ids[:, :20], cache=cache)] +
                             [packed64(ids[:, t:t + 1], cache=cache) for t in range(20, 30)], dim=1)
            assert_close_scaled(step, full)
            state = DecodeState(packed64, rows=2, capacity=64)
            prefill_rows(packed64, state, ids.expand(2, -1), [10, 10])
            rows = [packed64(ids[:, t:t + 1].expand(2, 1), cache=state) for t in range(10, 30)]
            for r in range(2):
                assert_close_scaled(torch.cat([x[r] for x in rows]), full[0, 10:])
    finally:
        packed.float()


def test_official_save_of_packed_model_is_bit_exact(pair, synthetic_dir, tmp_path):
    packed, dense = pair
    save_official(packed, tmp_path / "again")
    a, b = read_tensors(synthetic_dir), read_tensors(tmp_path / "again")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    save_pretrained(packed, tmp_path / "hf")  # HF layout: dequantized floats, loadable as today
    hf = dsv4.from_pretrained(tmp_path / "hf", dtype=torch.float64, numerics="official")
    ids = torch.randint(0, packed.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close_scaled(hf(ids), dense(ids))


# ---------------------------------------------------------------------------------------------- bad input
def _copy_with(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` with ``edit(tensors)`` applied, written as one file."""
    from safetensors.torch import save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = {k: v.clone() for k, v in read_tensors(src).items()}
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_bad_checkpoints_are_refused_naming_the_tensor(synthetic_dir, tmp_path):
    expert = "layers.1.ffn.experts.5.w2.weight"
    bad = _copy_with(synthetic_dir, tmp_path / "missing", lambda t: (t.pop(expert), t.pop(expert[:-6] + "scale")))
    with pytest.raises(ValueError, match=r"layers\.1\.ffn\.experts.*missing"):
        dsv4.from_pretrained(bad)
    scale = "layers.0.attn.wq_b.scale"
    bad = _copy_with(synthetic_dir, tmp_path / "scale", lambda t: t.__setitem__(scale, t[scale][:1]))
    with pytest.raises(ValueError, match=r"wq_b"):
        dsv4.from_pretrained(bad)
    bad = _copy_with(synthetic_dir, tmp_path / "shape",
                     lambda t: t.__setitem__("layers.0.attn_norm.weight", torch.ones(3)))
    with pytest.raises(ValueError, match=r"attn_norm"):
        dsv4.from_pretrained(bad)
    cfg = json.loads((synthetic_dir / "config.json").read_text())
    cfg["quantization_config"]["fmt"] = "e5m2"
    odd = tmp_path / "quant"
    odd.mkdir()
    for f in synthetic_dir.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown quantization_config"):
        dsv4.from_pretrained(odd)
    shard = sorted(odd.glob("*.safetensors"))[-1]
    cfg["quantization_config"]["fmt"] = "e4m3"
    (odd / "config.json").write_text(json.dumps(cfg))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        dsv4.from_pretrained(odd)


# ---------------------------------------------------------------------------------------------- memory
_RSS_SCRIPT = r"""
import json, resource, sys, torch
import dsv4
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
torch.set_num_threads(1)
dsv4.from_pretrained(sys.argv[1])  # dropped: the first load imports and builds what every load needs
before = rss()
model = dsv4.from_pretrained(sys.argv[1])
loaded = rss()
with torch.no_grad():
    model(torch.arange(64).view(1, 64) % model.config.vocab_size)
print(json.dumps({"load": loaded - before, "after_forward": rss() - before}))
"""


def test_loading_reads_nothing_until_used(tmp_path):
    """Loading maps the files: the resident set grows by a small part of the checkpoint; a forward that routes
    tokens to every expert then reads them in (file pages), within the checkpoint's size plus working memory."""
    cfg = small_config(n_routed_experts=64, moe_intermediate_size=512, hidden_size=256)
    info = write_synthetic(cfg, tmp_path / "big", seed=0)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big")], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["load"] < 0.1 * info["bytes"], figures
    assert figures["after_forward"] < 1.5 * info["bytes"] + (64 << 20), (figures, info)


def test_serving_engine_runs_a_packed_model(pair):
    """The engine (continuous batching over a DecodeState) on packed weights: greedy outputs equal plain cached
    decoding of the same model, several requests at once."""
    from dsv4.generate import generate
    from dsv4.serve.engine import Engine, SamplingParams

    class Ids:  # a stand-in tokenizer
        eos_id, bos_id, sha256 = 1, 0, "ids"

        def decode(self, ids):
            return " ".join(map(str, ids))

    class Decoder:
        def push(self, token):
            return f"{token} "

        def flush(self):
            return ""

    packed = pair[0].double()  # float64: the engine's and generate's computation orders agree far below any tie
    eng = Engine(packed, Ids(), max_model_len=96, max_num_seqs=2, prefill_chunk=16)
    assert eng.compile_seconds is None  # packed experts are not compiled automatically
    eng.new_decoder = Decoder
    eng.start()
    try:
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(2, packed.config.vocab_size, (n,), generator=g).tolist() for n in (23, 40)]
        outs = [eng.generate(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)) for p in prompts]
        for p, out in zip(prompts, outs):
            want = generate(packed, torch.tensor(p), 6, temperature=0)[0, len(p):].tolist()
            assert out[0]["token_ids"] == want
    finally:
        eng.stop()
        packed.float()


def test_bench_decode_of_a_saved_model(synthetic_dir, capsys):
    """``dsv4 bench decode --model DIR``: load time, the step against its roofline, whose weight bytes per token
    are the bytes the model holds by kind with the routed experts at k / E, one embedding row and no MTP: the stored
    bytes (checkpoint_weights), except that the small BF16 tensors computed in float32 are held at twice theirs."""
    from dsv4.cli import main
    from dsv4.cost.weights import checkpoint_weights

    assert main(["bench", "decode", "--model", str(synthetic_dir), "--context", "40", "--tokens", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = ModelConfig.from_json(synthetic_dir / "config.json")
    _, stored, layout = checkpoint_weights(synthetic_dir, "packed")
    assert layout == "official"
    want = (stored["head"] + stored["attention"] + stored["shared_experts"] + stored["norms_other"]
            + stored["experts"] * config.num_experts_per_tok / config.n_routed_experts
            + stored["embedding"] / config.vocab_size)
    assert want - 2 <= r["weight_bytes_per_token"] <= want + stored["attention"] + stored["norms_other"]
    assert r["load_s"] > 0 and r["ms_per_token"] > 0 and r["kv_bytes"] > 0
    assert r["roofline_ms_per_token"] == pytest.approx(1e3 * (r["weight_bytes_per_token"] + r["kv_bytes"])
                                                      / r["bandwidth_bytes_per_s"])
    assert r["vs_roofline"] == pytest.approx(r["ms_per_token"] / r["roofline_ms_per_token"])
    too_long = str(config.max_position_embeddings)
    assert main(["bench", "decode", "--model", str(synthetic_dir), "--context", too_long]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
