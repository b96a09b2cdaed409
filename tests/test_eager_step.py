"""The one door for decoding's eager forms (``dsv4.model.decode``'s last section): the switch, and each form held to
the tensor path it stands in for, in float64 (where two computation orders agree to about 1e-15)."""

import pytest
import torch

from dsv4 import ModelConfig, Transformer
from dsv4.model import decode
from dsv4.model.hyper import HyperConnection, sinkhorn
from dsv4.model.moe import Experts
from lively import lively
from numerics import assert_close_scaled


def test_python_float_sinkhorn_equals_the_tensor_path():
    """``sinkhorn_one`` (Python floats; 4 x 4 by the written-out ``balance_4``) gives ``sinkhorn``'s matrices."""
    g = torch.Generator().manual_seed(2)
    for n in (3, 4):
        for _ in range(3):
            logits = torch.randn(n, n, generator=g, dtype=torch.float64) * 3
            one = torch.tensor(decode.sinkhorn_one(logits.tolist(), 20, 1e-6), dtype=torch.float64)
            assert_close_scaled(one, sinkhorn(logits, 20, 1e-6))
    # the written-out 4 x 4 balancing, float for float
    k = (torch.rand(4, 4, generator=g, dtype=torch.float64) + 0.01).tolist()
    c = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).tolist()
    assert decode.balance_4(k, c, 20, 1e-6) == decode.balance(k, c, 20, 1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 4, 128), (1, 4, 128), (1, 3, 4, 128), (2, 1, 4, 128)])
def test_mix_rows_equals_the_hyper_connection(shape):
    """An eager step's mHC unit (Python floats for the mixing values, per position) gives the tensor path's
    outputs."""
    torch.manual_seed(3)
    hc = HyperConnection(ModelConfig.preset("tiny")).double()
    with torch.no_grad():
        for p in hc.parameters():
            p.normal_()
        x = torch.randn(*shape, dtype=torch.float64)
        rows, ref = decode.mix_rows(hc, x), hc(x)  # outside the switch: the tensor path
    for a, b in zip(rows, ref):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float64
        assert_close_scaled(a, b)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 3])
def test_expert_rows_equal_the_grouped_path(k, tokens):
    """An eager step's routed experts, token by token and expert by expert, give the grouped path's sums."""
    torch.manual_seed(k)
    experts = Experts(ModelConfig.preset("tiny").replace(num_experts_per_tok=k)).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.1)
        x = torch.randn(tokens, 128, dtype=torch.float64)
        indices = torch.stack([torch.randperm(experts.num_experts)[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k, dtype=torch.float64)
        assert_close_scaled(decode.expert_rows(experts, x, weights, indices), experts(x, weights, indices))
        assert decode.expert_rows(experts, x[:0], weights[:0], indices[:0]).shape == (0, 128)


def test_the_switch_is_on_only_for_an_eager_cached_step_of_few_tokens(monkeypatch):
    """``Block.forward`` takes the eager forms for a cached call of at most ``FEW_TOKENS`` tokens without autograd,
    and only inside that call; a forward without a cache, a longer call, or one with autograd takes the tensor
    paths."""
    cfg = ModelConfig.preset("tiny").replace(vocab_size=257)
    torch.manual_seed(0)
    model = lively(Transformer(cfg).eval())
    calls = []
    mix_rows = decode.mix_rows
    monkeypatch.setattr(decode, "mix_rows", lambda unit, streams: calls.append(streams.shape[:-2]) or
                        mix_rows(unit, streams))
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    units = 2 * (cfg.num_hidden_layers)
    with torch.no_grad():
        model(ids[:, :20])
        assert calls == []
        cache = model.new_cache(1)
        model(ids[:, :decode.FEW_TOKENS + 1], cache=cache)  # a prefill: too many tokens
        assert calls == []
        model(ids[:, 20:21], cache=cache)
        assert calls == [(1, 1)] * units
        model(ids[:, 21:23], cache=cache)
        assert calls[units:] == [(1, 2)] * units
    assert not decode.eager_step()
    calls.clear()
    model(ids[:, 23:24], cache=cache)  # autograd on
    assert calls == []
