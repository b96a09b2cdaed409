"""Anticipatory routing (spec 6.5): after a loss spike, experts are chosen by the router as it was a few steps ago.

The report: at step t the features use the current parameters but the routing indices are computed with those of
step t - dt; the mode switches on automatically when a loss spike is detected, runs for a while, and switches off.
Neither dt nor the detector is published; ours (documented choices): a spike is a loss more than ``sigma`` standard
deviations above the mean of the last ``window`` finite language-model losses, or a non-finite one; the mode then
runs for ``duration`` steps with dt = ``delay``, and the baseline forms anew (so does it at a phase switch). Only
the routers' (weight, bias) are kept, one snapshot per step.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class AnticipatoryRouting:
    def __init__(self, routers: list, delay: int = 4, duration: int = 50, window: int = 50, sigma: float = 4.0,
                 min_history: int = 20):
        if delay < 1:
            raise ValueError(f"anticipatory routing delay must be >= 1, got {delay}")
        self.routers = routers
        self.delay, self.duration, self.sigma, self.min_history = delay, duration, sigma, min_history
        self.snapshots: deque = deque(maxlen=delay + 1)
        self.losses: deque = deque(maxlen=window)
        self.remaining = 0
        self.spikes = 0

    @property
    def active(self) -> bool:
        return self.remaining > 0

    def before_step(self) -> None:
        """Store this step's router parameters; while active, route with those of ``delay`` steps ago."""
        self.snapshots.append([(r.weight.detach().clone(), r.bias.detach().clone()) for r in self.routers])
        old = self.snapshots[0] if self.active else None
        for i, router in enumerate(self.routers):
            router.routing_params = old[i] if old is not None else None

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if len(self.losses) < self.min_history:
            return False
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        return loss > mean + self.sigma * max(std, 1e-3 * abs(mean))

    def after_step(self, loss: float) -> bool:
        """Feed the step's loss; returns True when a spike switched the mode on."""
        if self.remaining > 0:
            self.remaining -= 1
        spike = self.is_spike(loss)
        if spike:
            self.spikes += 1
            self.remaining = self.duration
            self.losses.clear()  # the baseline forms anew: a lasting change of level is not a spike forever
        elif math.isfinite(loss):
            self.losses.append(loss)
        return spike

    def reset_history(self) -> None:
        """Forget the loss history (when the loss changes meaning, e.g. at a phase or stage switch)."""
        self.losses.clear()

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "remaining": self.remaining, "spikes": self.spikes,
                "snapshots": [[(w, b) for w, b in snap] for snap in self.snapshots]}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.remaining, self.spikes = int(state["remaining"]), int(state["spikes"])
        self.snapshots.clear()
        for snap in state["snapshots"]:
            self.snapshots.append([(torch.as_tensor(w), torch.as_tensor(b)) for w, b in snap])
