"""Tolerances for tests that compare two computation orders, so that they hold on any CPU (AVX2, AVX-512, the
``ATEN_CPU_CAPABILITY=default`` kernels) and on GPUs: in float64 the orders agree to about 1e-15 relative, so 1e-9
is a real check; in float32 the last bits differ between kernels, so the tolerance scales with the values."""

import torch

RELATIVE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, relative: float | None = None) -> None:
    """``actual`` equals ``expected`` within ``relative`` (by dtype: ``RELATIVE``) times the largest magnitude of
    ``expected`` (at least 1)."""
    rel = RELATIVE[expected.dtype] if relative is None else relative
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=rel * scale, rtol=0)


def logits_in_calls(model, ids: torch.Tensor, splits, cache=None) -> torch.Tensor:
    """The logits of ``ids`` [B, S] computed through a cache: calls of ``splits`` tokens, then one token a call to
    the end; [B, S, vocab], to compare with one full call."""
    cache = model.new_cache(ids.shape[0]) if cache is None else cache
    parts, i = [], 0
    with torch.no_grad():
        for n in splits:
            parts.append(model(ids[:, i:i + n], cache=cache))
            i += n
        while i < ids.shape[1]:
            parts.append(model(ids[:, i:i + 1], cache=cache))
            i += 1
    return torch.cat(parts, dim=1)


def prefill_rows(model, state, ids: torch.Tensor, lengths) -> list[torch.Tensor]:
    """Row r of the DecodeState ``state`` prefilled with ``ids[r, :lengths[r]]`` through a one-row cache
    (``load_row``); each row's prefill logits [lengths[r], vocab]."""
    out = []
    for r, n in enumerate(lengths):
        cache = model.new_cache(1)
        out.append(model(ids[r:r + 1, :n], cache=cache)[0])
        state.load_row(r, cache)
    return out
