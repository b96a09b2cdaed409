"""Anticipatory routing (spec 6.5): old routers choose the experts after a spike; gates stay current."""

import math

import torch

from dsv4 import ModelConfig
from dsv4.model.moe import Router
from dsv4.train.anticipatory import AnticipatoryRouting


def router():
    torch.manual_seed(0)
    r = Router(ModelConfig.preset("tiny"), 1, hashed=False)
    torch.nn.init.normal_(r.weight, 0, 0.05)
    return r


def test_routing_params_choose_experts_and_current_weights_give_gates():
    r = router()
    x = torch.randn(64, r.weight.shape[1])
    old_w, old_b = r.weight.detach().clone(), r.bias.clone()
    before = r(x, None)
    with torch.no_grad():
        r.weight.add_(torch.randn_like(r.weight) * 0.5)
    now = r(x, None)
    r.routing_params = (old_w, old_b)
    anticipated = r(x, None)
    assert torch.equal(anticipated.indices, before.indices)
    assert not torch.equal(now.indices, before.indices)
    expected = now.scores.gather(1, before.indices)
    expected = expected / expected.sum(-1, keepdim=True) * r.scaling
    torch.testing.assert_close(anticipated.weights, expected)


def test_spike_switches_the_mode_on_for_its_duration_with_the_delayed_router():
    r = router()
    ar = AnticipatoryRouting([r], delay=2, duration=3, window=10, sigma=4.0, min_history=5)
    weights = []
    for step in range(12):
        ar.before_step()
        weights.append(r.weight.detach().clone())
        if 8 <= step <= 10:  # the three steps after the spike at step 7
            assert ar.active and torch.equal(r.routing_params[0], weights[step - 2])
        else:
            assert r.routing_params is None
        loss = 2.0 + 0.01 * math.sin(step) if step != 7 else 50.0
        with torch.no_grad():
            r.weight.add_(0.01)
        ar.after_step(loss)
    assert ar.spikes == 1
    ar.before_step()  # duration over
    assert r.routing_params is None and not ar.active
    assert ar.after_step(float("nan")) and ar.active  # a non-finite loss is a spike too
    state = ar.state_dict()
    again = AnticipatoryRouting([r], delay=2, duration=3)
    again.load_state_dict(state)
    assert again.remaining == ar.remaining and len(again.snapshots) == len(ar.snapshots)
