"""Model FLOPs and a matmul peak measured in the same process: the two halves of MFU."""

from __future__ import annotations

import time

import torch

from dsv4.config import CSA, HCA, ModelConfig


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 8) -> float:
    """Best FLOP/s of an n x n x n matmul on this device (CPU here), in ``dtype``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def bf16_is_fast() -> bool:
    """Whether bf16 matmuls beat float32 here by a clear margin (AMX / tensor cores)."""
    return matmul_peak_flops(torch.bfloat16, 512, 4) > 1.5 * matmul_peak_flops(torch.float32, 512, 4)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Useful forward FLOPs per token of a training sequence: 2 x activated matmul parameters (lm head included, the
    embedding lookup not) plus attention over what each query sees, averaged over the positions of the sequence."""
    from dsv4.cost import matmul_parameters

    flops = 2.0 * matmul_parameters(config)
    h, c = config.num_attention_heads, config.head_dim
    w = config.sliding_window
    for lt in config.layer_types:
        total = 0.0
        for t in range(0, seq_len, max(1, seq_len // 64)):
            keys = min(t + 1, w)
            if lt == CSA:
                n = (t + 1) // config.compress_rate(lt)
                keys += min(n, config.index_topk)
                total += 2 * config.index_n_heads * config.index_head_dim * n
            elif lt == HCA:
                keys += (t + 1) // config.compress_rate(lt)
            total += 4 * h * c * keys
        flops += total / len(range(0, seq_len, max(1, seq_len // 64)))
    return flops


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward: three times the forward (the indexer's scoring has no LM gradient but is counted)."""
    return 3.0 * forward_flops_per_token(config, seq_len)
