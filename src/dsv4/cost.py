"""Analytic decode cost: KV-cache bytes and FLOPs per generated token at context length L.

Facts: spec section 8 (the table and the [CALC] reproduction), sections 1-2 for the shapes. Everything here is
arithmetic on a ``ModelConfig``; nothing runs a model.

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

Baselines at the same context (spec 8):

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

import argparse
import json
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import CSA, LAYER_TYPES, MOE, SLIDING, ModelConfig

PRECISION_WEIGHTS = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
WEIGHTING = ("FP8-equivalent FLOPs: BF16 x2, FP8 x1, FP4 x0.5; V4 core attention BF16, V4 indexer FP4, "
             "V3.2 indexer FP8, V3.2 / V3 / GQA-8 core attention BF16, all parameter matmuls FP8")

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

MIB = 1 << 20
DEFAULT_CONTEXT = 1 << 20
PLOT_CONTEXTS = tuple(int(round(4096 * 2 ** (i / 4))) for i in range(33))  # 4K .. 1M, four points per octave


# ------------------------------------------------------------------------------------------------ input checks
def check_context(context) -> int:
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


def parse_context(text: str) -> int:
    """Parse a CLI context: ``1048576``, ``1_048_576``, ``1,048,576``, ``128K`` or ``1M`` (K = 1024, M = 1024**2)."""
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+)([kKmM]?)", s)
    if not m:
        raise ValueError(f"--context must be a positive integer (optionally with a K or M suffix), got {text!r}")
    value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return check_context(value)


def _check_dtype_bytes(dtype_bytes) -> int:
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


def layer_kv_bytes(config: ModelConfig, layer_type: str, context: int, dtype_bytes=None) -> int:
    """KV-cache bytes of one layer of ``layer_type`` at ``context`` (layouts: see ``kv_cache_bytes``)."""
    n = layer_kv_entries(config, layer_type, context)
    if dtype_bytes is None:
        per_entry, per_key = entry_bytes(config), indexer_key_bytes(config)
    else:
        b = _check_dtype_bytes(dtype_bytes)
        per_entry, per_key = config.head_dim * b, config.index_head_dim * b
    return (n["window"] + n["compressed"]) * per_entry + n["indexer"] * per_key


def kv_cache_bytes(config: ModelConfig, context: int, dtype_bytes=None) -> int:
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


def _sum(name: str, parts, context: int, **precisions) -> Cost:
    parts = list(parts)
    return Cost(name=name, context=context, layers=sum(p.layers for p in parts),
                kv_bytes=sum(p.kv_bytes for p in parts),
                core_attention_flops=sum(p.core_attention_flops for p in parts),
                indexer_flops=sum(p.indexer_flops for p in parts),
                other_matmul_flops=sum(p.other_matmul_flops for p in parts), **precisions)


def v4_cost(config: ModelConfig, context: int, name: str = "V4", activated_params: int | None = None) -> Cost:
    """Total per-token decode cost of a V4 model (report precision layout for KV)."""
    return _sum(name, v4_layer_costs(config, context, activated_params).values(), check_context(context))


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


# ----------------------------------------------------------------------------------------- bytes read per token
def experts_touched(config: ModelConfig, batch: int) -> float:
    """Expected number of one layer's routed experts that ``batch`` tokens use between them, routing taken as
    uniform: a token misses a given expert with probability 1 - k / n."""
    n, k = config.n_routed_experts, config.num_experts_per_tok
    return n * (1 - (1 - k / n) ** batch)


def decode_read_bytes(config: ModelConfig, context: int, dtype_bytes, batch: int = 1) -> dict[str, int]:
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


def decode_roofline_seconds(config: ModelConfig, context: int, dtype_bytes, flops_per_s: float,
                            bytes_per_s: float, batch: int = 1) -> float:
    """A roofline estimate of one decoding step of ``batch`` rows: the parameter matmuls and the attention (core
    and indexer) each take the longer of their FLOPs at ``flops_per_s`` and their bytes (``decode_read_bytes``) at
    ``bytes_per_s``. The hardware's share of the step; a framework's per-op overhead is not in it."""
    cost = v4_cost(config, context)
    read = decode_read_bytes(config, context, dtype_bytes, batch)
    attention_flops = cost.core_attention_flops + cost.indexer_flops
    return (max(batch * cost.other_matmul_flops / flops_per_s, read["weights"] / bytes_per_s)
            + max(batch * attention_flops / flops_per_s, read["attention"] / bytes_per_s))


# ------------------------------------------------------------------------------------------------------- report
def cost_report(config: ModelConfig, context: int, preset: str | None = None, config_path: str | None = None,
                activated_params: int | None = None) -> dict:
    """Everything ``dsv4 cost --json`` prints: the V4 breakdown, three baselines and the ratios (fractions)."""
    L = check_context(context)
    layers = v4_layer_costs(config, L, activated_params)
    total = _sum(preset or "V4", layers.values(), L)
    params = total.other_matmul_flops // 2
    base = {"v3.2": v32_cost(L), "v3": v3_cost(L), "gqa8": gqa8_cost(config, L, params)}

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    report = {
        "preset": preset,
        "config_path": config_path,
        "context": L,
        "weighting": WEIGHTING,
        "kv_layout": ("V4 entry (head_dim - rope) x FP8 + rope x BF16 = %d B; indexer key FP4 + UE8M0 per 32 = %d B; "
                      "window min(L, sliding_window) per layer; MTP layer not counted"
                      % (entry_bytes(config), indexer_key_bytes(config))),
        "activated_params": params,
        "activated_params_note": "num_parameters(activated=True) of the main model without MTP "
                                 "(top-k experts, LM head; the embedding lookup is not a matmul)",
        "kv_bytes": total.kv_bytes,
        "kv_bytes_per_token": total.kv_bytes_per_token,
        "kv_bytes_uniform": {"bf16": kv_cache_bytes(config, L, 2), "fp32": kv_cache_bytes(config, L, 4)},
        "flops": total.to_dict()["flops"],
        "weighted_flops": total.to_dict()["weighted_flops"],
        "layer_types": {k: v.to_dict() for k, v in layers.items()},
        "baselines": {k: v.to_dict() for k, v in base.items()},
    }
    for key, b in base.items():
        tag = key.replace(".", "")
        report[f"flops_vs_{tag}"] = ratio(total.weighted_flops, b.weighted_flops)
        report[f"plain_flops_vs_{tag}"] = ratio(total.flops, b.flops)
        report[f"kv_vs_{tag}"] = ratio(total.kv_bytes, b.kv_bytes)
    return report


def _si(x: float, unit: str = "") -> str:
    if x == 0:
        return "-"
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _bytes(x: float) -> str:
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:.0f} B"


def format_report(report: dict) -> str:
    """The text table of ``dsv4 cost``."""
    L = report["context"]
    who = report["preset"] or report["config_path"] or "config"
    lines = [f"dsv4 cost: {who}, decode of one token at context {L:,}",
             f"weighting: {report['weighting']}",
             f"KV layout: {report['kv_layout']}",
             f"matmul parameters: {_count(report['activated_params'])} ({report['activated_params_note']})",
             ""]
    head = (f"{'layer type':<30}{'layers':>7}{'KV cache':>12}{'KV B/tok':>10}{'core attn':>12}{'indexer':>12}"
            f"{'other mm':>12}{'FLOPs':>12}{'FP8-eq':>12}")
    lines += [head, "-" * len(head)]

    def row(label: str, d: dict) -> str:
        f, w = d["flops"], d["weighted_flops"]
        return (f"{label:<30}{d['layers'] or '':>7}{_bytes(d['kv_bytes']):>12}{d['kv_bytes_per_token']:>10,.1f}"
                f"{_si(f['core_attention'], 'F'):>12}{_si(f['indexer'], 'F'):>12}{_si(f['other_matmul'], 'F'):>12}"
                f"{_si(f['total'], 'F'):>12}{_si(w['total'], 'F'):>12}")

    for lt, d in report["layer_types"].items():
        lines.append(row("head (LM head, mHC head)" if lt == "head" else lt, d))
    lines.append("-" * len(head))
    total = {"layers": sum(d["layers"] for d in report["layer_types"].values()), "kv_bytes": report["kv_bytes"],
             "kv_bytes_per_token": report["kv_bytes_per_token"], "flops": report["flops"],
             "weighted_flops": report["weighted_flops"]}
    lines.append(row("total", total))
    lines.append(f"uniform-dtype KV cache (every element 2 / 4 bytes): {_bytes(report['kv_bytes_uniform']['bf16'])}"
                 f" / {_bytes(report['kv_bytes_uniform']['fp32'])}")
    lines.append("")
    lines.append("baselines at the same context" + " " * 17 + "V4 / baseline:")
    bhead = (f"{'model':<22}{'layers':>7}{'KV cache':>12}{'KV B/tok':>10}{'FLOPs':>12}{'FP8-eq':>12}"
             f"{'KV':>10}{'FP8-eq FLOPs':>14}{'plain FLOPs':>13}")
    lines += [bhead, "-" * len(bhead)]
    labels = {"v3.2": "V3.2 (MLA + DSA)", "v3": "V3 (dense MLA)", "gqa8": "GQA-8 BF16 (dim 128)"}
    for key, d in report["baselines"].items():
        tag = key.replace(".", "")
        lines.append(f"{labels[key]:<22}{d['layers']:>7}{_bytes(d['kv_bytes']):>12}{d['kv_bytes_per_token']:>10,.1f}"
                     f"{_si(d['flops']['total'], 'F'):>12}{_si(d['weighted_flops']['total'], 'F'):>12}"
                     f"{report[f'kv_vs_{tag}']:>10.2%}{report[f'flops_vs_{tag}']:>14.2%}"
                     f"{report[f'plain_flops_vs_{tag}']:>13.2%}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- plot
def plot_cost(path: str | Path, contexts=PLOT_CONTEXTS, extra: dict[str, ModelConfig] | None = None,
              mark_context: int | None = None) -> Path:
    """Two log-log panels against context: KV-cache bytes of one sequence, and FP8-equivalent FLOPs per token.

    Draws V4-Flash, V4-Pro, the configs in ``extra`` (label -> config), V3.2, V3 and the GQA-8 BF16 baseline in
    the Pro and Flash shapes. Needs matplotlib (imported here, Agg backend).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [check_context(c) for c in contexts]
    models = {"V4-Flash": ModelConfig.preset("v4-flash"), "V4-Pro": ModelConfig.preset("v4-pro")}
    models.update(extra or {})
    series: dict[str, tuple[list[Cost], str]] = {}
    for label, cfg in models.items():
        params = matmul_parameters(cfg)
        series[label] = ([v4_cost(cfg, L, label, params) for L in contexts], "-")
    series["V3.2"] = ([v32_cost(L) for L in contexts], "--")
    series["V3"] = ([v3_cost(L) for L in contexts], "--")
    for shape in ("V4-Pro", "V4-Flash"):
        cfg = models[shape]
        params = matmul_parameters(cfg)
        series[f"GQA-8 BF16 ({shape} shape)"] = ([gqa8_cost(cfg, L, params) for L in contexts], ":")

    fig, (ax_kv, ax_fl) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, (costs, style) in series.items():
        ax_kv.plot(contexts, [c.kv_bytes for c in costs], style, label=label)
        ax_fl.plot(contexts, [c.weighted_flops for c in costs], style, label=label)
    for ax, title, ylabel in ((ax_kv, "KV cache of one sequence", "bytes"),
                              (ax_fl, "decode FLOPs per generated token", "FP8-equivalent FLOPs")):
        ax.set_xscale("log", base=2)
        ticks = [t for t in (1 << k for k in range(10, 31)) if contexts[0] <= t <= contexts[-1]]
        ax.set_xticks(ticks, [f"{t >> 20}M" if t >= MIB else f"{t >> 10}K" for t in ticks])
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if mark_context is not None and contexts[0] <= mark_context <= contexts[-1]:
            ax.axvline(mark_context, color="grey", lw=0.8, ls="-.")
    ax_fl.legend(fontsize=8)
    fig.suptitle("DeepSeek-V4 analytic decode cost (" + WEIGHTING.split(";")[0] + ")", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="model preset: tiny, small, v4-flash, v4-pro (default v4-flash)")
    src.add_argument("--config", default=None, metavar="PATH", help="a config.json (or its directory) instead")
    parser.add_argument("--context", default=str(DEFAULT_CONTEXT), metavar="N",
                        help="context length in tokens, e.g. 1048576, 128K or 1M (K = 1024; default 1M)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw KV bytes and FLOPs against context (4K..1M) to FILE.png (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    if args.config:
        config, preset, config_path = ModelConfig.from_json(args.config), None, str(args.config)
    else:
        preset = args.preset or "v4-flash"
        config, config_path = ModelConfig.preset(preset), None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("dsv4 cost: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    report = cost_report(config, context, preset=preset, config_path=config_path)
    if not args.json:
        print(format_report(report))
    if args.plot:
        label = preset or Path(config_path).name
        extra = {} if preset in ("v4-flash", "v4-pro") else {label: config}
        path = plot_cost(args.plot, extra=extra, mark_context=context)
        report["plot"] = str(path)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))
    return 0
