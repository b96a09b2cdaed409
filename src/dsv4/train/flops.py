"""Model FLOPs and a matmul peak measured in the same process: the two halves of MFU."""

from __future__ import annotations

import time

import torch

from dsv4.config import CSA, HCA, SLIDING, ModelConfig


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU. Timers read the clock after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 8, *,
                      device: torch.device | str | None = None, warmup_s: float = 0.2, budget_s: float = 1.0
                      ) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on ``device`` (default CPU): the peak that MFU divides by.

    The first calls are slow (thread-pool start, page faults, kernel selection, clock ramp-up: on a 2-core AVX2 CPU
    the first float32 call ran at a tenth of the steady rate), so matmuls run for ``warmup_s`` seconds untimed, then
    the best of ``repeats`` timed calls counts. Timed calls stop early once ``budget_s`` is spent, so a dtype
    without fast kernels (bf16 on a CPU without AVX512-BF16 / AMX: about 1 GFLOP/s, 2 s per call at n = 1024)
    costs two calls rather than ``repeats + 1``.
    """
    device = torch.device(device if device is not None else "cpu")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    end = time.perf_counter() + warmup_s
    while True:  # at least one untimed call
        torch.mm(a, b)
        synchronize(device)
        if time.perf_counter() >= end:
            break
    best = float("inf")
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return 2 * n ** 3 / best


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX); without them PyTorch's bf16
    matmuls are emulated and far slower than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if c is not None]
    if not checks:  # an older PyTorch without these probes: let the measurement decide
        return True
    return any(c() for c in checks)


def bf16_is_fast(device: torch.device | str | None = None) -> bool:
    """Whether bf16 matmuls beat float32 here by a clear margin (AMX, AVX512-BF16, tensor cores).

    On a CPU without bf16 instructions this answers False without measuring; otherwise both dtypes are measured
    after warm-up (``matmul_peak_flops``), since a first slow call must not decide it.
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu" and not cpu_has_native_bf16():
        return False
    kw = dict(n=512, repeats=6, device=device, budget_s=0.5)
    return matmul_peak_flops(torch.bfloat16, **kw) > 1.5 * matmul_peak_flops(torch.float32, **kw)


def _attention_flops(config: ModelConfig, layer_type: str, seq_len: int) -> float:
    """Attention FLOPs per query of one layer, averaged over the positions of a sequence: q.k and p.v over what the
    query sees (window + selected or all compressed entries), plus the indexer's scores for CSA."""
    h, c, w = config.num_attention_heads, config.head_dim, config.sliding_window
    positions = range(0, seq_len, max(1, seq_len // 64))
    total = 0.0
    for t in positions:
        keys = min(t + 1, w)
        if layer_type == CSA:
            n = (t + 1) // config.compress_rate(layer_type)
            keys += min(n, config.index_topk)
            total += 2 * config.index_n_heads * config.index_head_dim * n
        elif layer_type == HCA:
            keys += (t + 1) // config.compress_rate(layer_type)
        total += 4 * h * c * keys
    return total / len(positions)


def forward_flops_per_token(config: ModelConfig, seq_len: int, mtp: bool = True) -> float:
    """Useful forward FLOPs per token of a training sequence: 2 x activated matmul parameters (lm head included, the
    embedding lookup not) plus attention over what each query sees, averaged over the positions of the sequence.

    With ``mtp`` (training), each MTP depth adds its block (a sliding-window layer, its projections and mHC), its
    attention and one more pass through the shared lm head. Work that the kernels do beyond this (masked blocks,
    the dense attention the indexer's KL target needs, elementwise ops) is not useful FLOPs and is not counted.
    """
    from dsv4.cost import matmul_parameters

    flops = 2.0 * matmul_parameters(config)
    for lt in config.layer_types:
        flops += _attention_flops(config, lt, seq_len)
    depth = config.num_nextn_predict_layers
    if mtp and depth:
        block = config.num_parameters(activated=True) - config.num_parameters(activated=True, include_mtp=False)
        flops += 2.0 * block + depth * (2.0 * config.vocab_size * config.hidden_size
                                         + _attention_flops(config, SLIDING, seq_len))
    return flops


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward: three times the forward, MTP included (the indexer's scoring has no LM gradient but is
    counted)."""
    return 3.0 * forward_flops_per_token(config, seq_len, mtp=True)
