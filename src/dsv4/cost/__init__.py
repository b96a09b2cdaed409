"""Analytic decode cost of DeepSeek-V4 (spec 8): arithmetic on a ``ModelConfig``, nothing runs a model.

``model``: V4's per-token FLOPs and KV-cache bytes at a context, and the bytes and roofline time of a decoding step
(``dsv4 bench decode``); ``baselines``: V3.2, V3 and GQA-8 at the same context; ``report``: the ``dsv4 cost``
command (table, JSON, plot); ``fit``: the memory of running a model or checkpoint at a context and batch size
(``dsv4 cost --fit``, ``plan_memory`` / ``plan_checkpoint``), with ``weights``: a checkpoint's or config's weights by
kind, from safetensors headers or the meta device.
"""

from __future__ import annotations

from dsv4.cost.baselines import gqa8_cost, v3_cost, v32_cost
from dsv4.cost.fit import MemoryPlan, plan_checkpoint, plan_memory
from dsv4.cost.model import (PRECISION_WEIGHTS, WEIGHTING, Cost, check_context, decode_read_bytes,
                             decode_roofline_seconds, entry_bytes, experts_touched, indexer_key_bytes, kv_cache_bytes,
                             layer_attention_flops, layer_kv_bytes, layer_kv_entries, matmul_parameters, sum_costs,
                             v4_cost, v4_layer_costs)
from dsv4.cost.report import cost_report, format_report, parse_context, plot_cost

__all__ = ["PRECISION_WEIGHTS", "WEIGHTING", "Cost", "MemoryPlan", "check_context", "cost_report", "decode_read_bytes",
           "decode_roofline_seconds", "entry_bytes", "experts_touched", "format_report", "gqa8_cost",
           "indexer_key_bytes", "kv_cache_bytes", "layer_attention_flops", "layer_kv_bytes", "layer_kv_entries",
           "matmul_parameters", "parse_context", "plan_checkpoint", "plan_memory", "plot_cost", "sum_costs",
           "v3_cost", "v32_cost", "v4_cost", "v4_layer_costs"]
