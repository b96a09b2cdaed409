"""V4's analytic decode cost: KV-cache bytes and FLOPs per generated token at context length L, and the bytes and
roofline time of a decoding step of B rows (``bench decode``).

Facts: spec section 8 (the table and the [CALC] reproduction), sections 1-2 for the shapes. Everything here is
arithmetic on a ``ModelConfig``; nothing runs a model. The baselines are ``dsv4.cost.baselines``; the ``dsv4 cost``
report is ``dsv4.cost.report``.

What is counted, per generated token at context L (the query sits at position L - 1 and sees L tokens):

* KV cache (``kv_cache_bytes``). Every attention layer keeps a window of ``min(L, sliding_window)`` KV entries.
  CSA layers add ``floor(L / m)`` compressed entries plus as many indexer keys; HCA layers add ``floor(L / m')``
  entries (spec 2.5: entry w is visible iff w < floor((t + 1) / ratio)). Two byte layouts:

  - the report's precision layout (``dtype_bytes=None``): a V4 entry stores its ``head_dim - rope`` dims in FP8 and
    its rope dims in BF16 (576 B at 512 / 64; the FP8 block scales are ignored, as in the report); an indexer key
    stores ``index_head_dim`` FP4 values plus one UE8M0 scale byte per 32 (68 B at 128);
  - a uniform layout (``dtype_bytes=k``): every stored element takes k bytes (the project's own float32 / bfloat16
    decode cache), so a V4 entry is ``head_dim * k`` and an indexer key ``index_head_dim * k``.

  The MTP layer is not counted (it belongs to speculative decoding, not to the model's cache).

* FLOPs, split into core attention, indexer and other matmuls (spec 8's table; n_win -> min(L, n_win)):
  SWA ``4 n_h c n_win``; CSA core ``4 n_h c (min(k, floor(L/m)) + n_win)`` and indexer ``2 n_h^I c^I floor(L/m)``;
  HCA ``4 n_h c (floor(L/m') + n_win)``. "Other matmuls" is 2 x the matmul parameters touched by one token:
  ``config.num_parameters(activated=True)`` of the main model without the MTP layer. That count already holds a
  single vocab x hidden matrix (the LM head; the embedding table is a lookup, not a matmul) and the top-k experts only.
  It also holds a few thousand vector parameters (norm weights, biases, sinks, position biases), which are noise at
  this scale. For the official presets it gives 13.27B (Flash) and 48.85B (Pro), the report's 13B and 49B.

* Precision weighting (``WEIGHTING``): FLOPs are also counted as FP8-equivalent, BF16 x2, FP8 x1, FP4 x0.5, with the
  V4 core attention in BF16, the V4 indexer in FP4, the V3.2 indexer in FP8, all baseline core attention in BF16 and
  all parameter matmuls in FP8 (FP4 experts count as FP8: FP4 x FP8 runs at FP8 peak). This is a reverse engineering
  (spec 8, unconfirmed), but with it the report's four ratios at 1M come out (Pro 26.5% / 10.3%, Flash 9.9% / 7.2%).

* Bytes read by one decoding step (``decode_read_bytes``): each matmul weight it uses once (every routed expert
  its rows touch, ``experts_touched``) and each row's cache that its attention reads; ``decode_roofline_seconds``
  weighs those bytes against the step's FLOPs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dsv4.config import CSA, LAYER_TYPES, MOE, SLIDING, ModelConfig

PRECISION_WEIGHTS = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
WEIGHTING = ("FP8-equivalent FLOPs: BF16 x2, FP8 x1, FP4 x0.5; V4 core attention BF16, V4 indexer FP4, "
             "V3.2 indexer FP8, V3.2 / V3 / GQA-8 core attention BF16, all parameter matmuls FP8")


# ------------------------------------------------------------------------------------------------ input checks
def check_context(context: Any) -> int:
    """Return ``context`` as an int, or raise ``ValueError`` if it is not an integer >= 1."""
    if isinstance(context, bool) or not isinstance(context, numbers.Integral):
        if isinstance(context, numbers.Real) and not isinstance(context, bool) and float(context).is_integer():
            context = int(context)
        else:
            raise ValueError(f"context must be an integer number of tokens >= 1, got {context!r}")
    context = int(context)
    if context < 1:
        raise ValueError(f"context must be at least 1 token, got {context}")
    return context


def _check_dtype_bytes(dtype_bytes: Any) -> int:
    """``dtype_bytes`` (an int, or a torch / numpy dtype) as a positive number of bytes."""
    size = getattr(dtype_bytes, "itemsize", dtype_bytes)  # also a torch / numpy dtype
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"dtype_bytes must be None or a positive integer number of bytes, got {dtype_bytes!r}")
    return int(size)


# ------------------------------------------------------------------------------------------------------- KV cache
def entry_bytes(config: ModelConfig) -> int:
    """Bytes of one V4 KV entry in the report's layout: nope dims FP8, rope dims BF16 (576 at 512 / 64)."""
    rope = config.qk_rope_head_dim
    return (config.head_dim - rope) * 1 + rope * 2


def indexer_key_bytes(config: ModelConfig) -> int:
    """Bytes of one indexer key in the report's layout: FP4 values + one UE8M0 scale per 32 (68 at 128)."""
    return math.ceil(config.index_head_dim / 2) + math.ceil(config.index_head_dim / 32)


def layer_kv_entries(config: ModelConfig, layer_type: str, context: int) -> dict[str, int]:
    """How many entries one layer of ``layer_type`` holds at ``context``: window, compressed, indexer keys."""
    context = check_context(context)
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {layer_type!r}; allowed: {list(LAYER_TYPES)}")
    window = min(context, config.sliding_window)
    compressed = 0 if layer_type == SLIDING else context // config.compress_rate(layer_type)
    return {"window": window, "compressed": compressed, "indexer": compressed if layer_type == CSA else 0}


def layer_kv_bytes(config: ModelConfig, layer_type: str, context: int, dtype_bytes: Any = None) -> int:
    """KV-cache bytes of one layer of ``layer_type`` at ``context`` (layouts: see ``kv_cache_bytes``)."""
    n = layer_kv_entries(config, layer_type, context)
    if dtype_bytes is None:
        per_entry, per_key = entry_bytes(config), indexer_key_bytes(config)
    else:
        b = _check_dtype_bytes(dtype_bytes)
        per_entry, per_key = config.head_dim * b, config.index_head_dim * b
    return (n["window"] + n["compressed"]) * per_entry + n["indexer"] * per_key


def kv_cache_bytes(config: ModelConfig, context: int, dtype_bytes: Any = None) -> int:
    """KV-cache bytes of one sequence at ``context`` tokens, summed over the main layers (no MTP layer).

    ``dtype_bytes=None``: the report's precision layout (V4 entry = nope FP8 + rope BF16, indexer key = FP4 + UE8M0
    scales). An int (or a dtype with ``itemsize``): every stored element takes that many bytes; per layer that is
    ``min(L, sliding_window) * head_dim`` window elements, plus for CSA ``floor(L/m) * (head_dim + index_head_dim)``
    and for HCA ``floor(L/m') * head_dim``.
    """
    context = check_context(context)
    if dtype_bytes is not None:
        dtype_bytes = _check_dtype_bytes(dtype_bytes)
    return sum(layer_kv_bytes(config, lt, context, dtype_bytes) for lt in config.layer_types)


# -------------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class Cost:
    """Per-token decode cost of one model (or one group of its layers) at one context length."""

    name: str
    context: int
    kv_bytes: int
    core_attention_flops: int
    indexer_flops: int
    other_matmul_flops: int
    layers: int = 0
    core_precision: str = "bf16"
    indexer_precision: str = "fp4"
    matmul_precision: str = "fp8"

    @property
    def flops(self) -> int:
        return self.core_attention_flops + self.indexer_flops + self.other_matmul_flops

    @property
    def weighted_core_attention_flops(self) -> float:
        return self.core_attention_flops * PRECISION_WEIGHTS[self.core_precision]

    @property
    def weighted_indexer_flops(self) -> float:
        return self.indexer_flops * PRECISION_WEIGHTS[self.indexer_precision]

    @property
    def weighted_other_matmul_flops(self) -> float:
        return self.other_matmul_flops * PRECISION_WEIGHTS[self.matmul_precision]

    @property
    def weighted_flops(self) -> float:
        return self.weighted_core_attention_flops + self.weighted_indexer_flops + self.weighted_other_matmul_flops

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes / self.context

    def to_dict(self) -> dict:
        return {
            "name": self.name, "layers": self.layers, "kv_bytes": self.kv_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "flops": {"core_attention": self.core_attention_flops, "indexer": self.indexer_flops,
                      "other_matmul": self.other_matmul_flops, "total": self.flops},
            "weighted_flops": {"core_attention": self.weighted_core_attention_flops,
                               "indexer": self.weighted_indexer_flops,
                               "other_matmul": self.weighted_other_matmul_flops, "total": self.weighted_flops},
            "precision": {"core_attention": self.core_precision, "indexer": self.indexer_precision,
                          "other_matmul": self.matmul_precision},
        }


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters one decoded token multiplies through: activated params of the main model, MTP layer excluded.

    ``num_parameters(activated=True)`` counts the top-k experts only and a single vocab x hidden matrix (the LM head;
    the embedding is a table lookup), so nothing else is taken off.
    """
    return config.replace(num_nextn_predict_layers=0).num_parameters(activated=True)


def _layer_parameters(config: ModelConfig, layer_type: str) -> int:
    # num_parameters is a sum over layers plus a model-level part: the difference of a two-layer and a one-layer
    # model of this type is one layer's count (attention + activated FFN + mHC), whatever num_parameters counts.
    def one(n: int) -> int:
        return config.replace(num_hidden_layers=n, layer_types=[layer_type] * n, mlp_layer_types=[MOE] * n,
                              num_nextn_predict_layers=0).num_parameters(activated=True)
    return one(2) - one(1)


def layer_attention_flops(config: ModelConfig, layer_type: str, context: int) -> tuple[int, int]:
    """(core attention, indexer) FLOPs of one layer of ``layer_type`` for one token at ``context`` (spec 8)."""
    n = layer_kv_entries(config, layer_type, context)
    h, c = config.num_attention_heads, config.head_dim
    selected = min(config.index_topk, n["compressed"]) if layer_type == CSA else n["compressed"]
    core = 4 * h * c * (selected + n["window"])
    indexer = 2 * config.index_n_heads * config.index_head_dim * n["indexer"]
    return core, indexer


def v4_layer_costs(config: ModelConfig, context: int, activated_params: int | None = None) -> dict[str, Cost]:
    """Per-layer-type cost (every layer of that type together) plus ``"head"`` (LM head, mHC head: matmuls only).

    ``activated_params`` overrides the matmul parameter count (``matmul_parameters``); the override goes to the head
    row as the difference, so the totals follow it.
    """
    context = check_context(context)
    rows: dict[str, Cost] = {}
    layer_params = 0
    for lt in LAYER_TYPES:
        count = config.layer_types.count(lt)
        if not count:
            continue
        core, indexer = layer_attention_flops(config, lt, context)
        params = _layer_parameters(config, lt)
        layer_params += count * params
        rows[lt] = Cost(name=lt, context=context, layers=count,
                        kv_bytes=count * layer_kv_bytes(config, lt, context),
                        core_attention_flops=count * core, indexer_flops=count * indexer,
                        other_matmul_flops=count * 2 * params)
    total_params = matmul_parameters(config) if activated_params is None else int(activated_params)
    rows["head"] = Cost(name="head", context=context, kv_bytes=0, core_attention_flops=0, indexer_flops=0,
                        other_matmul_flops=2 * (total_params - layer_params))
    return rows


def sum_costs(name: str, parts: Iterable[Cost], context: int, **precisions: str) -> Cost:
    """One ``Cost`` holding the sum of ``parts`` (layers, KV bytes, each FLOP count) at ``context``."""
    parts = list(parts)
    return Cost(name=name, context=context, layers=sum(p.layers for p in parts),
                kv_bytes=sum(p.kv_bytes for p in parts),
                core_attention_flops=sum(p.core_attention_flops for p in parts),
                indexer_flops=sum(p.indexer_flops for p in parts),
                other_matmul_flops=sum(p.other_matmul_flops for p in parts), **precisions)


def v4_cost(config: ModelConfig, context: int, name: str = "V4", activated_params: int | None = None) -> Cost:
    """Total per-token decode cost of a V4 model (report precision layout for KV)."""
    return sum_costs(name, v4_layer_costs(config, context, activated_params).values(), check_context(context))


# ----------------------------------------------------------------------------------------- bytes read per token
def experts_touched(config: ModelConfig, batch: int) -> float:
    """Expected number of one layer's routed experts that ``batch`` tokens use between them, routing taken as
    uniform: a token misses a given expert with probability 1 - k / n."""
    n, k = config.n_routed_experts, config.num_experts_per_tok
    return n * (1 - (1 - k / n) ** batch)


def decode_read_bytes(config: ModelConfig, context: int, dtype_bytes: Any, batch: int = 1) -> dict[str, int]:
    """Bytes one decoding step of ``batch`` rows (one token each) reads when every stored element takes
    ``dtype_bytes``: ``weights`` (each matmul weight it uses once: ``matmul_parameters`` at batch 1, then every
    further routed expert the rows touch, ``experts_touched``) and ``attention`` (each row's cache that its attention
    uses: every layer's window, for CSA every indexer key, which the indexer scans, and the top-k entries, for HCA
    every entry).

    At batch 1 a decode step's matmuls are matrix-vector products, bound by these bytes on most hardware rather
    than by their FLOPs; ``decode_roofline_seconds`` weighs both.
    """
    context = check_context(context)
    b = _check_dtype_bytes(dtype_bytes)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    cache = 0
    for lt in config.layer_types:
        n = layer_kv_entries(config, lt, context)
        used = min(config.index_topk, n["compressed"]) if lt == CSA else n["compressed"]
        cache += (n["window"] + used) * config.head_dim + n["indexer"] * config.index_head_dim
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    more = config.num_hidden_layers * expert * (experts_touched(config, batch) - config.num_experts_per_tok)
    return {"weights": round(matmul_parameters(config) + more) * b, "attention": cache * batch * b}


def decode_roofline_seconds(config: ModelConfig, context: int, dtype_bytes: Any, flops_per_s: float,
                            bytes_per_s: float, batch: int = 1) -> float:
    """A roofline estimate of one decoding step of ``batch`` rows: the parameter matmuls and the attention (core
    and indexer) each take the longer of their FLOPs at ``flops_per_s`` and their bytes (``decode_read_bytes``) at
    ``bytes_per_s``. The hardware's share of the step; a framework's per-op overhead is not in it."""
    cost = v4_cost(config, context)
    read = decode_read_bytes(config, context, dtype_bytes, batch)
    attention_flops = cost.core_attention_flops + cost.indexer_flops
    return (max(batch * cost.other_matmul_flops / flops_per_s, read["weights"] / bytes_per_s)
            + max(batch * attention_flops / flops_per_s, read["attention"] / bytes_per_s))
