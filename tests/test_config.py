"""ModelConfig: validation names the bad field, the presets match the report (spec 1), and config.json in each of
the namings people have (legacy DeepSeek root config, official inference/config.json, what transformers writes)
reads back to the same fields."""

import json
from collections import Counter

import pytest

from dsv4 import ModelConfig
from dsv4.config import CSA, HASH_MOE, HCA, MOE, SLIDING

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4, 0]  # 44 entries: 43 layers + the MTP layer (spec 1.2)


def tiny(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**changes)


# ------------------------------------------------------------------------------------------------------- validation
BAD = {
    "heads-not-divisible-by-groups": (dict(num_attention_heads=4, o_groups=3), "o_groups"),
    "rope-factor-above-one": (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    "odd-rope-dims": (dict(partial_rotary_factor=15 / 64), "partial_rotary_factor"),
    "fractional-rope-dims": (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
    "zero-rope-factor": (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
    "rope-dims-above-index-head-dim": (dict(partial_rotary_factor=1.0), "index_head_dim"),
    "unknown-layer-type": (dict(layer_types=[SLIDING, CSA, "full_attention", CSA]), "layer_types"),
    "unknown-mlp-layer-type": (dict(mlp_layer_types=[HASH_MOE, MOE, "dense", MOE]), "mlp_layer_types"),
    "top-k-above-experts": (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    "layer-types-too-short": (dict(layer_types=[SLIDING, CSA, HCA]), "layer_types"),
    "layer-types-too-long": (dict(layer_types=[SLIDING, CSA, HCA, CSA, HCA]), "layer_types"),
    "mlp-layer-types-too-short": (dict(mlp_layer_types=[HASH_MOE, MOE]), "mlp_layer_types"),
    "layers-not-a-list": (dict(layer_types="sliding_attention"), "layer_types"),
    "zero-hidden": (dict(hidden_size=0), "hidden_size"),
    "negative-heads": (dict(num_attention_heads=-4, o_groups=1), "num_attention_heads"),
    "zero-layers": (dict(num_hidden_layers=0, layer_types=[], mlp_layer_types=[]), "num_hidden_layers"),
    "negative-layers": (dict(num_hidden_layers=-1), "num_hidden_layers"),
    "float-vocab": (dict(vocab_size=4096.0), "vocab_size"),
    "bool-experts": (dict(n_routed_experts=True), "n_routed_experts"),
    "zero-window": (dict(sliding_window=0), "sliding_window"),
    "zero-top-k": (dict(index_topk=0), "index_topk"),
    "zero-experts": (dict(n_routed_experts=0, num_experts_per_tok=0), "num_experts_per_tok"),
    "zero-moe-width": (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    "zero-hc-mult": (dict(hc_mult=0), "hc_mult"),
    "negative-eps": (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    "negative-mtp": (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    "two-kv-heads": (dict(num_key_value_heads=2), "num_key_value_heads"),
    "relu-router": (dict(scoring_func="relu"), "scoring_func"),
    "hc-mode": (dict(hc_mode="sinkhorn"), "hc_mode"),
    "tied-embeddings": (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    "zero-rope-theta": (dict(rope_theta=0.0), "rope_theta"),
    "rates-zero": (dict(compress_rates={CSA: 0, HCA: 16}), "compress_rates"),
    "rates-negative": (dict(compress_rates={CSA: 4, HCA: -128}), "compress_rates"),
    "rates-float": (dict(compress_rates={CSA: 4.5, HCA: 16}), "compress_rates"),
    "rates-string": (dict(compress_rates={CSA: "4", HCA: 16}), "compress_rates"),
    "rates-unknown-key": (dict(compress_rates={CSA: 4, HCA: 16, "sliding_attention": 1}), "compress_rates"),
    "rates-not-a-dict": (dict(compress_rates=[4, 128]), "compress_rates"),
    "rope-not-a-dict": (dict(rope_parameters=["yarn"]), "rope_parameters"),
    "rope-unknown-type": (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_parameters"),
    "rope-yarn-no-factor": (dict(rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 64}),
                            "rope_parameters"),
    "rope-yarn-no-original": (dict(rope_parameters={"rope_type": "yarn", "factor": 16}), "rope_parameters"),
    "rope-yarn-factor-below-one": (dict(rope_parameters={"rope_type": "yarn", "factor": 0.5,
                                                         "original_max_position_embeddings": 64}),
                                   "rope_parameters"),
    "rope-yarn-betas-swapped": (dict(rope_parameters={"rope_type": "yarn", "factor": 16, "beta_fast": 1,
                                                      "beta_slow": 32, "original_max_position_embeddings": 64}),
                                "rope_parameters"),
    "rope-only-main": (dict(rope_parameters={"main": {"rope_type": "default", "rope_theta": 1e4}}),
                       "rope_parameters"),
    "rope-negative-theta": (dict(rope_parameters={
        "main": {"rope_type": "default", "rope_theta": -1.0},
        "compress": {"rope_type": "default", "rope_theta": 1.6e5}}), "rope_parameters"),
    "rope-mscale": (dict(rope_parameters={
        "main": {"rope_type": "default", "rope_theta": 1e4},
        "compress": {"rope_type": "yarn", "rope_theta": 1.6e5, "factor": 16, "original_max_position_embeddings": 64,
                     "attention_factor": 1.28}}), "rope_parameters"),
    "rope-factor-disagrees": (dict(rope_parameters={
        "main": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        "compress": {"rope_type": "default", "rope_theta": 1.6e5}}), "rope_parameters"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_value_raises_naming_the_field(case):
    changes, field = BAD[case]
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        tiny(**changes)


def test_validate_catches_a_field_changed_after_construction():
    cfg = tiny()
    cfg.o_groups = 3
    with pytest.raises(ValueError, match="o_groups"):
        cfg.validate()


def test_rates_not_named_keep_their_default():
    cfg = tiny(compress_rates={CSA: 8})
    assert cfg.compress_rates == {CSA: 8, HCA: 128}


def test_flat_yarn_goes_to_the_compressed_rope_only():
    cfg = tiny(rope_parameters={"type": "yarn", "factor": 16, "original_max_position_embeddings": 4096,
                                "beta_fast": 32, "beta_slow": 1})
    main, comp = cfg.rope_parameters["main"], cfg.rope_parameters["compress"]
    assert main == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    assert comp["rope_type"] == "yarn" and comp["rope_theta"] == 160000.0
    assert comp["factor"] == 16 and comp["original_max_position_embeddings"] == 4096
    assert comp["attention_factor"] == 1.0  # no YaRN mscale (spec 10.3)
    assert "type" not in comp


# --------------------------------------------------------------------------------------------------------- presets
def test_v4_flash_preset():
    cfg = ModelConfig.preset("v4-flash")
    assert cfg.num_hidden_layers == 43 == len(cfg.layer_types)
    assert cfg.layer_types[:2] == [SLIDING, SLIDING]
    assert cfg.layer_types[2::2] == [CSA] * 21 and cfg.layer_types[3::2] == [HCA] * 20
    assert Counter(cfg.layer_types) == {SLIDING: 2, CSA: 21, HCA: 20}
    assert cfg.mlp_layer_types == [HASH_MOE] * 3 + [MOE] * 40
    assert (cfg.index_topk, cfg.o_groups, cfg.o_lora_rank, cfg.sliding_window) == (512, 8, 1024, 128)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim) == (4096, 64, 512, 64)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.routed_scaling_factor) == (256, 6, 1.5)
    assert cfg.compress_rates == {CSA: 4, HCA: 128}
    comp = cfg.rope_parameters["compress"]
    assert comp["rope_type"] == "yarn" and comp["factor"] == 16 and comp["rope_theta"] == 160000
    assert comp["original_max_position_embeddings"] == 65536 and comp["attention_factor"] == 1.0
    assert cfg.rope_parameters["main"]["rope_type"] == "default"
    total = cfg.num_parameters(include_mtp=False)
    active = cfg.num_parameters(activated=True, include_mtp=False)
    assert total == pytest.approx(284e9, rel=0.03)
    assert active == pytest.approx(13e9, rel=0.05)
    assert cfg.num_parameters() > total  # the MTP block counts when asked


def test_v4_pro_preset():
    cfg = ModelConfig.preset("v4-pro")
    assert cfg.num_hidden_layers == 61 == len(cfg.layer_types)
    assert cfg.layer_types[:2] == [HCA, HCA]
    assert Counter(cfg.layer_types) == {CSA: 30, HCA: 31}
    assert cfg.mlp_layer_types[:4] == [HASH_MOE] * 3 + [MOE]
    assert (cfg.index_topk, cfg.o_groups, cfg.hidden_size, cfg.n_routed_experts) == (1024, 16, 7168, 384)
    assert cfg.num_parameters(include_mtp=False) == pytest.approx(1.6e12, rel=0.03)
    assert cfg.num_parameters(activated=True, include_mtp=False) == pytest.approx(49e9, rel=0.03)


def test_small_and_tiny_presets():
    small = ModelConfig.preset("small")
    assert small.sliding_window == 128 and small.compress_rates == {CSA: 4, HCA: 128} and small.index_topk == 512
    assert set(small.layer_types) == {SLIDING, CSA, HCA} and HASH_MOE in small.mlp_layer_types
    t = ModelConfig.preset("tiny")
    assert 1e6 < t.num_parameters() < 10e6
    assert set(t.layer_types) == {SLIDING, CSA, HCA} and set(t.mlp_layer_types) == {HASH_MOE, MOE}


def test_unknown_preset():
    with pytest.raises(ValueError, match="v4-ultra"):
        ModelConfig.preset("v4-ultra")


def test_num_parameters_matches_the_module():
    from dsv4 import Transformer

    cfg = ModelConfig.preset("tiny")
    assert cfg.num_parameters() == Transformer(cfg).num_parameters()


# ------------------------------------------------------------------------------------------------------------ JSON
def write(tmp_path, obj, name="config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


LEGACY_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43, "num_attention_heads": 64,
    "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
    "o_lora_rank": 1024, "o_groups": 8, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6,
    "num_hash_layers": 3, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "sliding_window": 128, "compress_ratios": FLASH_RATIOS,
    "compress_rope_theta": 160000, "rope_theta": 10000, "max_position_embeddings": 1048576,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16", "transformers_version": "4.57.1",
    "first_k_dense_replace": 0,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128]},
    "expert_dtype": "fp4",
}

OFFICIAL_FLASH_ARGS = {  # inference/config.json of the Flash release (ModelArgs names)
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3, "n_heads": 64,
    "n_routed_experts": 256, "n_routed_experts_score": 128, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512,
    "rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "original_seq_len": 65536,
    "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "dtype": "fp8",
    "scale_fmt": "ue8m0", "expert_dtype": "fp4", "compress_rope_theta": 160000, "compress_ratios": FLASH_RATIOS,
}


def assert_flash_fields(cfg: ModelConfig) -> None:
    ref = ModelConfig.preset("v4-flash")
    for key in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
                "n_shared_experts", "routed_scaling_factor", "sliding_window", "index_n_heads", "index_head_dim",
                "index_topk", "hc_mult", "hc_sinkhorn_iters", "swiglu_limit", "layer_types", "mlp_layer_types",
                "compress_rates", "partial_rotary_factor", "qk_rope_head_dim", "rope_theta", "compress_rope_theta"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert len(cfg.layer_types) == 43  # the MTP entry of compress_ratios is dropped
    main, comp = cfg.rope_parameters["main"], cfg.rope_parameters["compress"]
    assert main["rope_type"] == "default" and main["rope_theta"] == 10000
    assert comp["rope_type"] == "yarn" and comp["rope_theta"] == 160000 and comp["factor"] == 16
    assert comp["original_max_position_embeddings"] == 65536
    assert (comp["beta_fast"], comp["beta_slow"], comp["attention_factor"]) == (32, 1, 1.0)
    assert cfg.quantization_config["quant_method"] == "fp8"
    assert cfg.quantization_config["expert_dtype"] == "fp4"


def test_from_json_legacy_root_config(tmp_path):
    cfg = ModelConfig.from_json(write(tmp_path, LEGACY_FLASH))
    assert_flash_fields(cfg)
    assert cfg.num_nextn_predict_layers == 1


def test_from_json_directory(tmp_path):
    write(tmp_path, LEGACY_FLASH)
    assert ModelConfig.from_json(tmp_path).layer_types == ModelConfig.preset("v4-flash").layer_types


def test_from_json_official_inference_args(tmp_path):
    cfg = ModelConfig.from_json(write(tmp_path, OFFICIAL_FLASH_ARGS))
    assert_flash_fields(cfg)
    assert cfg.scoring_func == "sqrtsoftplus" and cfg.max_position_embeddings == 1048576


def test_official_args_without_yarn(tmp_path):
    # ModelArgs applies YaRN only when original_seq_len > 0
    args = dict(OFFICIAL_FLASH_ARGS, original_seq_len=0)
    cfg = ModelConfig.from_json(write(tmp_path, args))
    assert cfg.rope_parameters["compress"]["rope_type"] == "default"


def test_legacy_pro_schedule(tmp_path):
    ratios = [128, 128] + [4, 128] * 29 + [4, 0]  # 62 entries
    raw = dict(LEGACY_FLASH, num_hidden_layers=61, compress_ratios=ratios)
    cfg = ModelConfig.from_json(write(tmp_path, raw))
    assert cfg.layer_types == ModelConfig.preset("v4-pro").layer_types


def test_legacy_ratios_other_hca_rate():
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "layer_types": None, "compress_ratios": [0, 4, 16, 4, 0]})
    assert cfg.layer_types == [SLIDING, CSA, HCA, CSA] and cfg.compress_rates[HCA] == 16


@pytest.mark.parametrize("ratios, match", [([0, 4, 128], "3 entries"), ([0, 4, -1, 4], ">= 0"),
                                           ([0, 4, 16, 32], "more than one HCA"), ("0,4", "list")])
def test_legacy_ratios_bad(ratios, match):
    raw = {**tiny().to_dict(), "layer_types": None, "compress_rates": None, "compress_ratios": ratios}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(raw)


def test_legacy_compress_rate_fields():
    raw = {**tiny().to_dict(), "compress_rates": None, "compress_rate_csa": 8, "compress_rate_hca": 32}
    assert ModelConfig.from_dict(raw).compress_rates == {CSA: 8, HCA: 32}


def test_from_json_what_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV4Config(
        vocab_size=1000, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, head_dim=32, q_lora_rank=32,
        o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=6, sliding_window=32,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, compress_ratios=[0, 4, 128, 4, 128, 0],
        num_hash_layers=2, qk_rope_head_dim=8, compress_rope_theta=160000.0,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1})
    hf.to_json_file(tmp_path / "config.json")
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert cfg.layer_types == [SLIDING, CSA, HCA, CSA, HCA]
    assert cfg.mlp_layer_types == [HASH_MOE, HASH_MOE, MOE, MOE, MOE]
    assert cfg.partial_rotary_factor == 0.25 and cfg.qk_rope_head_dim == 8
    assert (cfg.hidden_size, cfg.index_topk, cfg.sliding_window, cfg.o_groups) == (64, 6, 32, 2)
    assert cfg.rope_parameters["compress"]["rope_type"] == "yarn"
    assert cfg.rope_parameters["compress"]["attention_factor"] == 1.0
    assert cfg.rope_parameters["main"]["rope_type"] == "default"
    hf_dict = hf.to_dict()
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor"):
        assert getattr(cfg, key) == hf_dict[key], key


@pytest.mark.parametrize("name", ["tiny", "small", "v4-flash", "v4-pro"])
def test_to_json_round_trip(tmp_path, name):
    cfg = ModelConfig.preset(name)
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg


def test_round_trip_keeps_quantization_config(tmp_path):
    cfg = tiny(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json").quantization_config == cfg.quantization_config


def test_replace_changes_rope_theta_everywhere():
    cfg = ModelConfig.preset("v4-flash").replace(compress_rope_theta=40000.0)
    assert cfg.rope_parameters["compress"]["rope_theta"] == 40000.0
    assert cfg.rope_parameters["compress"]["rope_type"] == "yarn"


def test_malformed_json(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(write(tmp_path, '{"hidden_size": 64,'))


def test_binary_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path / "nope" / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path)  # a directory without one


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"a string"', "42", "null"])
def test_non_object_json(tmp_path, text):
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_json(write(tmp_path, text))


def test_bad_field_in_json_names_it(tmp_path):
    raw = dict(LEGACY_FLASH, o_groups=7)
    with pytest.raises(ValueError, match=r"ModelConfig\.o_groups"):
        ModelConfig.from_json(write(tmp_path, raw))
    raw = dict(LEGACY_FLASH, compress_rates="4")
    with pytest.raises(ValueError, match=r"ModelConfig\.compress_rates"):
        ModelConfig.from_json(write(tmp_path, raw))
    raw = dict(LEGACY_FLASH, num_hidden_layers="43")
    with pytest.raises(ValueError, match=r"ModelConfig\.num_hidden_layers"):
        ModelConfig.from_json(write(tmp_path, raw))
