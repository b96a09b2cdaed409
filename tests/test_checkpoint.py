"""Checkpoints (spec 9): DeepSeek's official layout with FP8 / FP4 weights written and read back, HF layout sharded,
and every broken directory giving an error that names what is wrong without losing what was saved."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv4
from dsv4 import ModelConfig, quant
from dsv4.weights import read_tensors, save_official, save_pretrained
from dsv4.config import CSA, HASH_MOE, HCA, MOE, SLIDING

FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
                "attn.indexer.wq_b.weight", "shared_experts.w1.weight", "shared_experts.w2.weight",
                "shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")


def small_config(**changes) -> ModelConfig:
    base = dict(vocab_size=256, num_hidden_layers=3, layer_types=[SLIDING, CSA, HCA],
                mlp_layer_types=[HASH_MOE, MOE, MOE], n_routed_experts=4, num_experts_per_tok=2,
                num_nextn_predict_layers=1)
    base.update(changes)
    return ModelConfig.preset("tiny").replace(**base)


def random_model(config: ModelConfig, seed: int = 0) -> dsv4.Transformer:
    """A model whose every tensor is random and non-trivial (norms, sinks, ape, mHC, router bias, tid2eid)."""
    torch.manual_seed(seed)
    model = dsv4.Transformer(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 1 and leaf == "weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf == "scale":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.dim() == 1 or leaf in ("ape", "base"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("tid2eid"):
                # a table no default construction gives: distinct experts per token
                rows = torch.stack([torch.randperm(config.n_routed_experts, generator=g)[:b.shape[1]]
                                    for _ in range(b.shape[0])])
                b.copy_(rows)
    return model


def expected_state(model: torch.nn.Module, fp8: bool = True, fp4_experts: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict (dsv4 names, experts stacked [E, out, in]) as an official save should give it back:
    routed experts MXFP4- or FP8-quantized and dequantized, the FP8 matrices FP8-quantized and dequantized."""
    def fp8_round_trip(w):
        return quant.fp8_block_dequant(*quant.fp8_block_quant(w))

    out = {}
    for name, w in model.state_dict().items():
        if re.search(r"\.ffn\.experts\.w[123]$", name) and fp4_experts:
            w = quant.fake_quant_fp4(w)
        elif re.search(r"\.ffn\.experts\.w[123]$", name) and fp8:
            w = torch.stack([fp8_round_trip(e) for e in w])
        elif name.endswith(FP8_SUFFIXES) and fp8:
            w = fp8_round_trip(w)
        out[name] = w
    return out


def assert_state_equals(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def model():
    return random_model(small_config())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def official_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "ckpt"
    save_official(model, path)
    return path


@pytest.fixture(scope="module")
def official_loaded(official_dir):
    return dsv4.from_pretrained(official_dir, dtype=torch.float32, numerics="plain")  # the weights alone


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------- official layout
def test_official_layout_names_and_dtypes(model, official_dir):
    stored = read_tensors(official_dir)
    assert not any(k.startswith("model.") for k in stored)
    for k in ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale",
              "layers.0.attn.kv_norm.weight", "layers.0.hc_attn_fn", "layers.0.ffn.gate.tid2eid",
              "layers.1.ffn.gate.bias", "layers.1.attn.attn_sink", "layers.1.attn.compressor.ape",
              "layers.2.ffn.experts.3.w2.weight", "mtp.0.e_proj.weight", "mtp.0.hc_head_fn"):
        assert k in stored, k
    d, inter = model.config.hidden_size, model.config.moe_intermediate_size
    fp8 = [k for k in stored if k.endswith(FP8_SUFFIXES)]
    # 4 blocks (3 layers + MTP) x (5 attention + 3 shared-expert matrices), the CSA layer's indexer wq_b, e/h_proj
    assert len(fp8) == 4 * (5 + 3) + 1 + 2
    for k in fp8:
        w, s = stored[k], stored[k[:-len(".weight")] + ".scale"]
        assert w.dtype == torch.float8_e4m3fn, k
        assert tuple(s.shape) == (-(-w.shape[0] // 128), -(-w.shape[1] // 128)), k
        assert s.dtype == quant.SCALE_DTYPE
    experts = [k for k in stored if ".ffn.experts." in k and k.endswith(".weight")]
    assert len(experts) == 4 * 3 * 4  # 3 main layers + MTP, 3 projections, 4 experts
    for k in experts:
        w, s = stored[k], stored[k[:-len(".weight")] + ".scale"]
        n_in = d if not k.endswith("w2.weight") else inter
        assert w.dtype == torch.int8 and w.shape[-1] == n_in // 2, k
        assert tuple(s.shape) == (w.shape[0], n_in // 32), k
    # everything else is unquantized
    scaled = {k[:-len(".scale")] + ".weight" for k in stored if k.endswith(".scale")}
    assert scaled == set(fp8) | set(experts)
    for k in ("layers.1.attn.compressor.wkv.weight", "layers.1.attn.compressor.wgate.weight",
              "layers.1.attn.indexer.weights_proj.weight", "layers.1.attn.indexer.compressor.wkv.weight",
              "layers.1.ffn.gate.weight", "embed.weight", "head.weight", "layers.0.hc_attn_fn"):
        assert stored[k].dtype == torch.float32, k
    assert stored["layers.0.ffn.gate.tid2eid"].dtype == torch.int64


def test_official_config_json(model, official_dir):
    raw = json.loads((official_dir / "config.json").read_text())
    assert raw["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                          "weight_block_size": [128, 128]}
    assert raw["expert_dtype"] == "fp4"
    assert raw["compress_ratios"] == [0, 4, 16, 0]  # one per layer, then the MTP layer
    assert raw["num_hash_layers"] == 1 and raw["qk_rope_head_dim"] == 16
    assert raw["layer_types"] == model.config.layer_types
    # the legacy fields alone give the same model
    for k in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters"):
        raw.pop(k)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.replace(quantization_config=None) == model.config


def test_official_round_trip_equals_fake_quantized_weights(model, official_loaded):
    assert len(official_loaded.mtp) == 1
    want = expected_state(model)
    assert_state_equals(official_loaded, want)
    # the quantization did change the quantized tensors, and only those
    orig = model.state_dict()
    for k in ("layers.1.ffn.experts.w1", "mtp.0.ffn.experts.w2", "layers.1.attn.wq_a.weight", "mtp.0.e_proj.weight",
              "layers.1.attn.indexer.wq_b.weight", "layers.2.ffn.shared_experts.w3.weight"):
        assert not torch.equal(want[k], orig[k]), k
    changed = {k for k in orig if not torch.equal(want[k], orig[k])}
    assert all(re.search(r"experts\.w[123]$", k) or k.endswith(FP8_SUFFIXES) for k in changed), changed


def test_official_round_trip_logits(model, official_loaded, ids):
    # the same model with fake-quantized weights gives the same logits ...
    reference = random_model(model.config)
    reference.load_state_dict(expected_state(model))
    with torch.no_grad():
        out, ref, orig = official_loaded(ids), reference(ids), model(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # ... and stays near the unquantized model's
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), orig.flatten(1), dim=1)
    assert (cos > 0.8).all(), cos
    assert (out.argmax(-1) == orig.argmax(-1)).float().mean() > 0.5


def test_official_tid2eid_is_loaded(model, official_loaded):
    table = official_loaded.layers[0].ffn.gate.tid2eid
    assert torch.equal(table, model.layers[0].ffn.gate.tid2eid)
    default = dsv4.Transformer(model.config).layers[0].ffn.gate.tid2eid
    assert not torch.equal(table, default)


def test_meta_device_build_loads_the_same(official_dir, official_loaded, monkeypatch):
    import dsv4.weights.hf

    monkeypatch.setattr(dsv4.weights.hf, "_META_BUILD_ABOVE", 0)
    assert_state_equals(dsv4.from_pretrained(official_dir, dtype=torch.float32), official_loaded.state_dict())


def test_loading_leaves_the_global_rng_alone(official_dir):
    torch.manual_seed(3)
    a = torch.rand(4)
    torch.manual_seed(3)
    dsv4.from_pretrained(official_dir, dtype=torch.float32)
    assert torch.equal(torch.rand(4), a)


@pytest.mark.parametrize("fp8, fp4", [(True, False), (False, False), (False, True)])
def test_official_precision_options(model, tmp_path, fp8, fp4):
    save_official(model, tmp_path / "ckpt", fp8=fp8, fp4_experts=fp4)
    stored = read_tensors(tmp_path / "ckpt")
    expert = stored["layers.1.ffn.experts.0.w1.weight"]
    assert expert.dtype == (torch.int8 if fp4 else torch.float8_e4m3fn if fp8 else torch.float32)
    assert stored["layers.1.attn.wq_a.weight"].dtype == (torch.float8_e4m3fn if fp8 else torch.float32)
    assert_state_equals(dsv4.from_pretrained(tmp_path / "ckpt", dtype=torch.float32), expected_state(model, fp8, fp4))


def test_official_bf16_keeps_fp32_group(model, tmp_path):
    save_official(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    stored = read_tensors(tmp_path / "ckpt")
    assert stored["embed.weight"].dtype == torch.bfloat16
    assert stored["layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    for k in ("layers.1.hc_attn_fn", "hc_head_scale", "layers.1.attn.attn_sink", "layers.1.attn.compressor.ape",
              "layers.1.ffn.gate.bias"):
        assert stored[k].dtype == torch.float32, k


def test_official_fp4_needs_input_dim_multiple_of_32(tmp_path):
    m = random_model(small_config(moe_intermediate_size=48))
    with pytest.raises(ValueError, match=r"w2\.weight.*multiple of 32"):
        save_official(m, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    save_official(m, tmp_path / "ckpt", fp4_experts=False)  # FP8 experts have no such constraint
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


def test_official_sharded(model, tmp_path):
    save_official(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 2
    loaded = dsv4.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    save_official(model, tmp_path / "single")
    assert_same_state(loaded, dsv4.from_pretrained(tmp_path / "single", dtype=torch.float32))


def test_hf_save_of_a_loaded_official_model_is_plain(official_loaded, tmp_path):
    loaded = official_loaded
    assert loaded.config.quantization_config is not None  # what the checkpoint said
    loaded.save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in raw  # the HF save holds plain floats
    assert_same_state(loaded, dsv4.from_pretrained(tmp_path / "hf", dtype=torch.float32))


# ------------------------------------------------------------------------------------------------------ HF layout
def test_sharded_hf_save_loads_back(model, tmp_path):
    save_pretrained(model, tmp_path / "hf", max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert "model.layers.0.attn.norm.weight" in index["weight_map"]  # HF's name for the kv norm
    assert "head.weight" in index["weight_map"] and "mtp.0.e_proj.weight" in index["weight_map"]
    loaded = dsv4.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert_same_state(model, loaded)


def test_index_naming_an_absent_tensor(model, tmp_path):
    path = tmp_path / "hf"
    save_pretrained(model, path, max_shard_bytes=100_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.attn.ghost.weight"] = next(iter(index["weight_map"].values()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="ghost"):
        dsv4.from_pretrained(path, dtype=torch.float32)


def test_index_naming_a_missing_shard(model, tmp_path):
    path = tmp_path / "hf"
    save_pretrained(model, path, max_shard_bytes=100_000)
    (path / "model-00002-of-" f"{len(list(path.glob('*.safetensors'))):05d}.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        dsv4.from_pretrained(path, dtype=torch.float32)


def test_corrupt_index(model, tmp_path):
    path = tmp_path / "hf"
    save_pretrained(model, path, max_shard_bytes=100_000)
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index"):
        dsv4.from_pretrained(path, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ broken directories
def edit_checkpoint(path, edit):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


@pytest.fixture
def hf_dir(model, tmp_path):
    save_pretrained(model, tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_tensor_is_named(hf_dir):
    edit_checkpoint(hf_dir, lambda t: t.pop("model.layers.1.attn.wq_b.weight"))
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.attn\.wq_b\.weight"):
        dsv4.from_pretrained(hf_dir, dtype=torch.float32)


def test_missing_hc_tensor_is_named_as_stored(hf_dir):
    edit_checkpoint(hf_dir, lambda t: t.pop("model.layers.2.hc_ffn_base"))
    with pytest.raises(ValueError, match=r"missing.*layers\.2\.hc_ffn_base"):
        dsv4.from_pretrained(hf_dir, dtype=torch.float32)


def test_missing_expert_is_named(hf_dir):
    edit_checkpoint(hf_dir, lambda t: t.pop("model.layers.1.ffn.experts.1.w3.weight"))
    with pytest.raises(ValueError, match=r"layers\.1\.ffn\.experts.*\[1\].*w3"):
        dsv4.from_pretrained(hf_dir, dtype=torch.float32)


def test_unexpected_tensor_is_named(hf_dir):
    edit_checkpoint(hf_dir, lambda t: t.update({"model.layers.0.attn.extra_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"unexpected.*layers\.0\.attn\.extra_proj\.weight"):
        dsv4.from_pretrained(hf_dir, dtype=torch.float32)


def test_misshaped_tensor_is_named(hf_dir):
    def edit(t):
        t["model.layers.2.attn.wo_b.weight"] = torch.zeros(128, 64)
    edit_checkpoint(hf_dir, edit)
    with pytest.raises(ValueError, match=r"mis-shaped.*layers\.2\.attn\.wo_b\.weight.*\(128, 64\)"):
        dsv4.from_pretrained(hf_dir, dtype=torch.float32)


def test_misshaped_quantized_tensor_is_named(official_dir, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(official_dir, path)
    edit_checkpoint(path, lambda t: t.update({"layers.1.attn.wq_a.scale": torch.ones(2, 2)}))
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wq_a"):
        dsv4.from_pretrained(path, dtype=torch.float32)


def test_fp8_without_scale_is_named(official_dir, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(official_dir, path)
    edit_checkpoint(path, lambda t: t.pop("layers.2.attn.wo_a.scale"))
    with pytest.raises(ValueError, match=r"layers\.2\.attn\.wo_a\.weight.*no scale"):
        dsv4.from_pretrained(path, dtype=torch.float32)


def test_only_pickle(tmp_path, model):
    path = tmp_path / "pickled"
    path.mkdir()
    model.config.to_json(path / "config.json")
    torch.save({"embed.weight": torch.zeros(2)}, path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle.*never read"):
        dsv4.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(hf_dir, damage):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"model\.safetensors.*not a readable safetensors file"):
        dsv4.from_pretrained(hf_dir, dtype=torch.float32)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        dsv4.from_pretrained(tmp_path / "nothing-here", dtype=torch.float32)


def test_no_mtp_weights_drops_the_block(hf_dir):
    edit_checkpoint(hf_dir, lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.")])
    loaded = dsv4.from_pretrained(hf_dir, dtype=torch.float32)
    assert len(loaded.mtp) == 0 and loaded.config.num_nextn_predict_layers == 0


# ------------------------------------------------------------------------------------------------- atomic writes
def test_save_over_existing_directory_replaces_it(model, tmp_path):
    path = tmp_path / "hf"
    save_pretrained(model, path, max_shard_bytes=100_000)
    assert (path / "model.safetensors.index.json").exists()
    (path / "notes.txt").write_text("old")
    save_pretrained(model, path)  # now one file: the old shards and index must be gone
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_state(model, dsv4.from_pretrained(path, dtype=torch.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directories left


@pytest.mark.parametrize("writer", ["hf", "official"])
def test_failed_write_leaves_previous_directory(model, tmp_path, monkeypatch, writer):
    import safetensors.torch

    path = tmp_path / "ckpt"
    save = save_pretrained if writer == "hf" else save_official
    save(model, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    other = random_model(model.config, seed=1)
    with pytest.raises(OSError, match="disk full"):
        save(other, path)
    assert calls
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
