"""The baselines V4's decode cost is set against, at the same context (spec 8): DeepSeek-V3.2, DeepSeek-V3 and a
GQA-8 model in the V4 model's shape. Each is a ``dsv4.cost.model.Cost`` built from the facts below (spec 1.1 and 8).

* ``v32_cost``: DeepSeek-V3.2, MLA + DSA, 61 layers. KV (656 + 132) B per token per layer (MLA latent 512 FP8 +
  16 B scales + 64 rope BF16; indexer key 128 FP8 + 4 B scale). Core ``2 n_h 576 min(2048, L) + 2 n_h 512 min(2048, L)``
  (absorbed MLA, n_h = 128, BF16), indexer ``2 64 128 L`` (FP8), 37B activated parameters (74 GF).
* ``v3_cost``: DeepSeek-V3, dense MLA: core ``2 128 576 L + 2 128 512 L``, KV 656 B per token per layer, no indexer,
  37B activated.
* ``gqa8_cost``: a BF16 GQA model with 8 KV heads of dim 128 over the V4 model's own layer count: KV
  ``2 * 8 * 128 * 2 = 4096`` B per token per layer, attention ``4 n_h 128 L`` with the V4 model's n_h, other matmuls
  the same as the V4 model's.
"""

from __future__ import annotations

from dsv4.config import ModelConfig
from dsv4.cost.model import Cost, check_context, matmul_parameters

# Baseline facts (spec 1.1 and 8).
V3_LAYERS = 61
V3_HEADS = 128
V3_ACTIVATED_PARAMS = 37_000_000_000
MLA_QK_DIM = 576           # absorbed MLA: kv_lora_rank 512 + rope 64 per score
MLA_V_DIM = 512            # absorbed MLA: values are the 512-d latent
MLA_KV_BYTES = 656         # 512 FP8 + 16 B scales + 64 x 2 B rope
DSA_KEY_BYTES = 132        # 128 FP8 + 4 B scale
DSA_TOPK = 2048
DSA_HEADS = 64
DSA_HEAD_DIM = 128
GQA_KV_HEADS = 8
GQA_HEAD_DIM = 128
GQA_BYTES = 2              # BF16


def v32_cost(context: int) -> Cost:
    """DeepSeek-V3.2 (MLA + DSA top-2048 over raw tokens, 61 layers) at ``context``."""
    L = check_context(context)
    k = min(DSA_TOPK, L)
    return Cost(name="V3.2", context=L, layers=V3_LAYERS,
                kv_bytes=V3_LAYERS * L * (MLA_KV_BYTES + DSA_KEY_BYTES),
                core_attention_flops=V3_LAYERS * 2 * V3_HEADS * (MLA_QK_DIM + MLA_V_DIM) * k,
                indexer_flops=V3_LAYERS * 2 * DSA_HEADS * DSA_HEAD_DIM * L,
                other_matmul_flops=2 * V3_ACTIVATED_PARAMS, indexer_precision="fp8")


def v3_cost(context: int) -> Cost:
    """DeepSeek-V3 (dense MLA, 61 layers) at ``context``."""
    L = check_context(context)
    return Cost(name="V3", context=L, layers=V3_LAYERS, kv_bytes=V3_LAYERS * L * MLA_KV_BYTES,
                core_attention_flops=V3_LAYERS * 2 * V3_HEADS * (MLA_QK_DIM + MLA_V_DIM) * L,
                indexer_flops=0, other_matmul_flops=2 * V3_ACTIVATED_PARAMS, indexer_precision="fp8")


def gqa8_cost(config: ModelConfig, context: int, activated_params: int | None = None) -> Cost:
    """A BF16 GQA-8 (head dim 128) model with the V4 model's layers, query heads and matmuls, at ``context``."""
    L = check_context(context)
    n = config.num_hidden_layers
    params = matmul_parameters(config) if activated_params is None else int(activated_params)
    return Cost(name="GQA-8 BF16", context=L, layers=n,
                kv_bytes=n * L * 2 * GQA_KV_HEADS * GQA_HEAD_DIM * GQA_BYTES,
                core_attention_flops=n * 4 * config.num_attention_heads * GQA_HEAD_DIM * L,
                indexer_flops=0, other_matmul_flops=2 * params)
