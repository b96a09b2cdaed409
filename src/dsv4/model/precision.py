"""The compute dtype of the parts that run in float32 whatever the activation dtype (DESIGN: numerics): mHC, router
scores, compressor softmax, sinks, norms, RoPE and the attention softmax run in float32 for bf16 / fp16 / float32
models and in float64 for a float64 model, so that a float64 model is float64 end to end (equivalence tests hold
two computation orders to 1e-9 there, on any CPU).

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its compute dtype: ``x.float()``, except that float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()
