"""The model's experiment switches (``dsv4 lab``): unconstrained hyper-connections and a plain residual
(``ModelConfig.hc_mode``), sigmoid and softmax router affinities (``ModelConfig.scoring_func``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv4
from dsv4.config import ModelConfig
from dsv4.model.hyper import HyperConnection, sinkhorn
from dsv4.model.moe import Router


def _config(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=256, num_hidden_layers=2, layer_types=[
        "sliding_attention", "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "moe"], **changes)


def _model(config: ModelConfig, seed: int = 0) -> dsv4.Transformer:
    torch.manual_seed(seed)
    return dsv4.Transformer(config).double()


def test_unconstrained_hc_starts_where_mhc_starts():
    """With the gating factors at 0 both are their static part, and HC's static logits are mHC's initial mixing."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    models = [_model(_config(hc_mode=mode)) for mode in ("mhc", "hc")]
    for m in models:
        for name, p in m.named_parameters():
            if name.endswith("scale") and ("hc_" in name):
                p.data.zero_()
    mhc, hc = (m(ids) for m in models)
    # equal up to the float32 rounding of the static logits (the model is built in float32)
    assert (mhc - hc).abs().max() <= 1e-6 * mhc.abs().max()


def test_unconstrained_hc_mixes_by_its_logits_and_mhc_projects_them():
    config = _config(hc_mode="hc")
    unit = HyperConnection(config).double()
    n, d = config.hc_mult, config.hidden_size
    with torch.no_grad():
        unit.fn.normal_()
        unit.scale.copy_(torch.tensor([0.3, 0.2, 0.1]))
        unit.base.normal_()
    x = torch.randn(3, 5, n, d, dtype=torch.float64)
    y, post, comb = unit(x)
    mix = F.linear(x.flatten(-2) * torch.rsqrt(x.flatten(-2).square().mean(-1, keepdim=True) + config.rms_norm_eps),
                   unit.fn)
    logits = mix * unit.scale.repeat_interleave(torch.tensor([n, n, n * n])) + unit.base
    assert torch.allclose(comb, logits[..., 2 * n:].unflatten(-1, (n, n)), atol=1e-12)
    assert torch.allclose(post, logits[..., n:2 * n], atol=1e-12)
    assert torch.allclose(y, (logits[..., :n].unsqueeze(-1) * x).sum(-2), atol=1e-12)
    unit.mode = "mhc"
    _, post_m, comb_m = unit(x)
    assert torch.allclose(comb_m, sinkhorn(logits[..., 2 * n:].unflatten(-1, (n, n)), config.hc_sinkhorn_iters,
                                           config.hc_eps), atol=1e-12)
    assert torch.allclose(post_m, 2 * torch.sigmoid(logits[..., n:2 * n]), atol=1e-12)
    assert (comb.sum(-1) - 1).abs().max() > 0.1  # unconstrained rows do not sum to 1


def test_plain_residual_is_x_plus_sublayers():
    """Streams that start equal stay equal, each x + attn(norm(x)) then + moe(norm(.)); the head takes their mean."""
    model = _model(_config(hc_mode="residual"))
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    x = model.embed(ids).double()
    positions = torch.arange(20)
    block = model.layers[0]
    streams = x.unsqueeze(-2).expand(-1, -1, 4, -1).contiguous()
    out, _ = block(streams, positions, ids)
    h = x + block.attn(block.attn_norm(x), positions)
    h = h + block.ffn(block.ffn_norm(h), ids)[0]
    for k in range(4):
        assert torch.allclose(out[..., k, :], h, atol=1e-12)
    assert torch.allclose(model.hc_head(out), h, atol=1e-12)
    logits = model(ids)
    assert torch.isfinite(logits).all()


def test_hc_mode_is_written_only_when_not_mhc(tmp_path):
    assert "hc_mode" not in _config().to_dict()
    config = _config(hc_mode="residual")
    config.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path).hc_mode == "residual"
    with pytest.raises(ValueError, match="ModelConfig.hc_mode"):
        _config(hc_mode="sinkhorn")
    with pytest.raises(ValueError, match="ModelConfig.scoring_func"):
        _config(scoring_func="relu")


@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_router_affinities(func):
    config = _config(scoring_func=func)
    torch.manual_seed(0)
    router = Router(config, 1, hashed=False).double()
    torch.nn.init.normal_(router.weight)
    x = torch.randn(7, config.hidden_size, dtype=torch.float64)
    logits = x @ router.weight.t()
    expected = {"sqrtsoftplus": torch.sqrt(F.softplus(logits)), "sigmoid": torch.sigmoid(logits),
                "softmax": torch.softmax(logits, -1)}[func]
    out = router(x, None)
    assert torch.allclose(out.scores, expected, atol=1e-12)
    top = torch.topk(expected, config.num_experts_per_tok, dim=-1)
    assert torch.equal(out.indices, top.indices)
    gates = top.values / top.values.sum(-1, keepdim=True) * config.routed_scaling_factor
    assert torch.allclose(out.weights, gates, atol=1e-12)


def test_a_saved_variant_is_not_labelled_deepseek_v4(tmp_path):
    """A lab variant saved in HF layout keeps its hc_mode for dsv4 and carries another model_type, so that
    transformers refuses it rather than loading it as V4 with mHC; V4 itself stays deepseek_v4."""
    import json

    import dsv4
    from dsv4.config import EXPERIMENT_MODEL_TYPE
    from dsv4.weights import save_pretrained

    for mode, model_type in (("hc", EXPERIMENT_MODEL_TYPE), ("mhc", "deepseek_v4")):
        path = tmp_path / mode
        save_pretrained(_model(_config(hc_mode=mode)), path)
        assert json.loads((path / "config.json").read_text())["model_type"] == model_type
        assert dsv4.from_pretrained(path).config.hc_mode == mode
