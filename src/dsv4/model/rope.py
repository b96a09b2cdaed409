"""Interleaved partial RoPE on the trailing dims, YaRN frequencies, and the output de-rotation (spec 2.2.3-4, 2.2.7).

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also r rope dims.

V4 rotates only the last ``r`` channels of each head, in adjacent pairs (2k, 2k+1), with frequency theta^(-2k/r).
Sliding-window layers use the "main" RoPE (theta 1e4, no YaRN); every layer with a compressor uses the "compress"
RoPE (theta 1.6e5 with YaRN on the released models) for everything in that layer. YaRN's attention magnitude factor
is never applied: cos/sin are unscaled (spec 10.3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.precision import upcast


def inv_freq(params: dict, rope_dim: int) -> torch.Tensor:
    """The r/2 inverse frequencies of one RoPE kind (``rope_parameters['main']`` or ``['compress']``), float32."""
    base = float(params["rope_theta"])
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    freq = 1.0 / (base ** exponents)
    if params.get("rope_type", "default") != "yarn":
        return freq
    factor = float(params["factor"])
    original = float(params["original_max_position_embeddings"])
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        # the pair index whose wavelength makes `rotations` turns over the original context
        return rope_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # pairs below `low` keep their frequency (extrapolate), pairs above `high` are divided by `factor`
    keep = 1.0 - ramp
    return freq / factor * (1 - keep) + freq * keep


class RotaryEmbedding(nn.Module):
    """Holds the inverse frequencies of both RoPE kinds; ``cos_sin(positions, kind)`` gives [..., r/2] tables."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rope_dim = config.rope_dim
        self.params = {kind: dict(config.rope_parameters[kind]) for kind in ("main", "compress")}
        for kind in ("main", "compress"):
            self.register_buffer(f"{kind}_inv_freq", torch.empty(self.rope_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the frequency tables, e.g. after building the model on the meta device."""
        for kind, params in self.params.items():
            buf = getattr(self, f"{kind}_inv_freq")
            setattr(self, f"{kind}_inv_freq", inv_freq(params, self.rope_dim).to(buf.device))

    def cos_sin(self, positions: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables [..., r/2] of positions [...] in ``dtype`` (the compute dtype: float32, or float64)."""
        freq = getattr(self, f"{kind}_inv_freq")
        angles = positions.to(dtype).unsqueeze(-1) * freq.to(positions.device, dtype)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of ``x`` in interleaved pairs; float32 math.

    ``cos``/``sin`` broadcast against ``x[..., :r/2]`` (callers unsqueeze a head axis where needed).
    ``inverse`` rotates by the negative angle: the de-rotation of attention outputs at the query position.
    Each pair (a, b) is the complex number a + ib times cos + i sin: one complex product on a contiguous copy of the
    rope channels (faster on CPU than real arithmetic on the strided pair views, and the same values).
    """
    r = 2 * cos.shape[-1]
    if torch.compiler.is_compiling():  # the compiler fuses real arithmetic (it does not generate complex code)
        a, b = upcast(x[..., -r::2]), upcast(x[..., -r + 1::2])
        s = -sin if inverse else sin
        out = x.clone()
        out[..., -r:] = torch.stack([a * cos - b * s, a * s + b * cos], dim=-1).flatten(-2).to(x.dtype)
        return out
    pairs = torch.view_as_complex(upcast(x[..., -r:]).contiguous().unflatten(-1, (r // 2, 2)))
    rotated = torch.view_as_real(pairs * torch.complex(cos, -sin if inverse else sin)).flatten(-2)
    out = x.clone()
    out[..., -r:] = rotated.to(x.dtype)
    return out
