"""Parity with HF transformers 5.23 ``DeepseekV4ForCausalLM`` on random small configs (float32, within 1e-4).

Together the configs cover sliding, CSA and HCA layers, hash and learned routing, hc_mult 4, YaRN on the compressed
layers, and sequences that are not multiples of the rates and exceed both the window and the indexer's top-k span.
The indexer uses 8 heads so that exact ReLU ties (all heads negative), which transformers breaks arbitrarily and
dsv4 toward the lower index, do not fall on a top-k boundary.
"""

import pytest
import torch

from hf_oracle import hf_config, random_hf_model
from numerics import logits_in_calls

import dsv4
from dsv4 import ModelConfig

YARN = {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}

CONFIGS = {
    "swa-csa-hca-csa": dict(index_n_heads=8, rope_parameters=dict(YARN)),
    "hca-csa-swa": dict(num_hidden_layers=3, hidden_size=48, head_dim=32, partial_rotary_factor=0.25,
                        num_attention_heads=8, o_groups=4, o_lora_rank=12, q_lora_rank=24, index_n_heads=8,
                        index_head_dim=16, index_topk=4, sliding_window=16,
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
                        layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                                     "sliding_attention"],
                        mlp_layer_types=["hash_moe", "hash_moe", "moe"], n_routed_experts=8,
                        num_experts_per_tok=3),
    "csa-only-small-window": dict(num_hidden_layers=2, index_n_heads=8, index_topk=2, sliding_window=4,
                                  layer_types=["compressed_sparse_attention"] * 2, mlp_layer_types=["moe", "moe"],
                                  rope_parameters=dict(YARN)),
}
SEQ = {"swa-csa-hca-csa": 41, "hca-csa-swa": 57, "csa-only-small-window": 37}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    name = request.param
    cfg = hf_config(**CONFIGS[name])
    hf = random_hf_model(cfg, seed=len(name))
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    model = dsv4.from_pretrained(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ[name]), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    return name, hf, model, ids, ref


def test_config_round_trip(pair):
    _, hf, model, _, _ = pair
    hf_dict = hf.config.to_dict()
    ours = model.config
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "sliding_window", "index_topk", "hc_mult",
                "o_groups", "head_dim", "partial_rotary_factor", "rope_parameters"):
        assert getattr(ours, key) == hf_dict[key], key


def test_full_forward_matches(pair):
    _, _, model, ids, ref = pair
    with torch.no_grad():
        out = model(ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunks", [(5, 9), (13,), (1, 2, 3)])
def test_chunked_prefill_then_decode_matches(pair, chunks):
    _, _, model, ids, ref = pair
    torch.testing.assert_close(logits_in_calls(model, ids, chunks), ref, atol=1e-4, rtol=0)


def test_transformers_loads_what_dsv4_saves(pair, tmp_path):
    _, hf, model, ids, ref = pair
    from transformers import DeepseekV4ForCausalLM

    model.save_pretrained(tmp_path / "saved")
    back = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "saved").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits.float(), ref, atol=1e-4, rtol=0)
    reloaded = dsv4.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids), atol=0, rtol=0)


def test_dsv4_built_model_runs_in_transformers(tmp_path):
    """A model made by dsv4 from scratch (with MTP) is loaded by transformers, which ignores the MTP weights."""
    from transformers import DeepseekV4ForCausalLM

    cfg = ModelConfig.preset("tiny").replace(vocab_size=300, num_hidden_layers=2,
                                             layer_types=["compressed_sparse_attention",
                                                          "heavily_compressed_attention"],
                                             mlp_layer_types=["hash_moe", "moe"], index_n_heads=8)
    torch.manual_seed(0)
    model = dsv4.Transformer(cfg).eval()
    model.save_pretrained(tmp_path)
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 70))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), model(ids), atol=1e-4, rtol=0)
    again = dsv4.from_pretrained(tmp_path)
    assert len(again.mtp) == cfg.num_nextn_predict_layers == 1
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
