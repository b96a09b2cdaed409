"""``dsv4 cost``: V4's per-token decode FLOPs and KV-cache bytes at one context against V3.2, V3 and GQA-8, as a
text table, one JSON object (``cost_report``) or a plot against context (``plot_cost``, needs matplotlib). The
numbers are ``dsv4.cost.model``'s and ``dsv4.cost.baselines``'.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from dsv4.config import ModelConfig
from dsv4.cost.baselines import gqa8_cost, v3_cost, v32_cost
from dsv4.cost.model import (WEIGHTING, Cost, check_context, entry_bytes, indexer_key_bytes, kv_cache_bytes,
                             matmul_parameters, sum_costs, v4_cost, v4_layer_costs)

MIB = 1 << 20
DEFAULT_CONTEXT = 1 << 20
PLOT_CONTEXTS = tuple(int(round(4096 * 2 ** (i / 4))) for i in range(33))  # 4K .. 1M, four points per octave


def parse_context(text: str) -> int:
    """Parse a CLI context: ``1048576``, ``1_048_576``, ``1,048,576``, ``128K`` or ``1M`` (K = 1024, M = 1024**2)."""
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+)([kKmM]?)", s)
    if not m:
        raise ValueError(f"--context must be a positive integer (optionally with a K or M suffix), got {text!r}")
    value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return check_context(value)


# ------------------------------------------------------------------------------------------------------- report
def cost_report(config: ModelConfig, context: int, preset: str | None = None, config_path: str | None = None,
                activated_params: int | None = None) -> dict:
    """Everything ``dsv4 cost --json`` prints: the V4 breakdown, three baselines and the ratios (fractions)."""
    L = check_context(context)
    layers = v4_layer_costs(config, L, activated_params)
    total = sum_costs(preset or "V4", layers.values(), L)
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
def plot_cost(path: str | Path, contexts: Iterable[int] = PLOT_CONTEXTS, extra: dict[str, ModelConfig] | None = None,
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
    src.add_argument("--model", default=None, metavar="DIR",
                     help="a checkpoint directory (HF or official layout): its config.json, and with --fit its "
                          "safetensors headers (never the data)")
    parser.add_argument("--context", default=str(DEFAULT_CONTEXT), metavar="N",
                        help="context length in tokens, e.g. 1048576, 128K or 1M (K = 1024; default 1M)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw KV bytes and FLOPs against context (4K..1M) to FILE.png (needs matplotlib)")
    fit = parser.add_argument_group("memory plan (--fit)")
    fit.add_argument("--fit", action="store_true",
                     help="instead: weights, KV cache and working memory at --context and --batch-size, their total, "
                          "and whether it fits in memory")
    fit.add_argument("--batch-size", type=int, default=1, metavar="B", help="sequences decoded together (default 1)")
    fit.add_argument("--dtype", default=None, choices=["packed", "float32", "bfloat16"],
                     help="weights as stored and memory-mapped (packed: the default for an official-layout "
                          "checkpoint) or materialized (float32: the default otherwise)")
    fit.add_argument("--memory-gib", type=float, default=None, metavar="M",
                     help="memory to fit in, GiB (default: this machine's RAM)")
    fit.add_argument("--prefill-chunk", type=int, default=4096, metavar="N",
                     help="prompt tokens per prefill call (default 4096, as dsv4 generate)")
    fit.add_argument("--prompt", default=None, metavar="N",
                     help="prompt tokens, prefilled (default: the whole --context, the worst case); the rest of the "
                          "context is decoded a token at a time")
    fit.add_argument("--speculative", action="store_true",
                     help="decoding drafts with the MTP block (a packed model then touches its weights too)")
    fit.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                     help="the memory of one of N ranks sharing the routed experts (torchrun --nproc_per_node N -m "
                          "dsv4 generate; N divides the experts; default 1)")
    fit.add_argument("--all-logits", action="store_true",
                     help="prefill returns every position's logits (default: the last one's, as dsv4 generate)")


def run_fit(args: argparse.Namespace, context: int) -> int:
    """``dsv4 cost --fit``: the memory plan (``dsv4.cost.fit``) as text or one JSON object."""
    from dsv4.cost.fit import format_plan, plan_checkpoint, plan_memory

    memory = None
    if args.memory_gib is not None:
        if not args.memory_gib > 0:
            raise ValueError(f"--memory-gib must be positive, got {args.memory_gib}")
        memory = int(args.memory_gib * (1 << 30))
    prompt = None
    if args.prompt is not None:
        try:
            prompt = parse_context(args.prompt)
        except ValueError as e:
            raise ValueError(f"--prompt: {e}".replace("--context", "the prompt").replace("context", "the prompt"))
    kw = dict(context=context, batch=args.batch_size, prefill_chunk=args.prefill_chunk, prompt=prompt,
              all_logits=args.all_logits, speculative=args.speculative, memory_bytes=memory,
              expert_parallel=args.expert_parallel)
    if args.model:
        plan = plan_checkpoint(args.model, dtype=args.dtype, **kw)
    elif args.config:
        plan = plan_memory(ModelConfig.from_json(args.config), dtype=args.dtype or "float32",
                           source=str(args.config), **kw)
    else:
        preset = args.preset or "v4-flash"
        plan = plan_memory(ModelConfig.preset(preset), dtype=args.dtype or "float32", source=preset, **kw)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0


def run(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    if args.fit:
        if args.plot:
            raise ValueError("--plot draws the cost report, not --fit")
        return run_fit(args, context)
    if args.model:
        args.config = str(Path(args.model) / "config.json")
    if args.config:
        config, preset, config_path = ModelConfig.from_json(args.config), None, str(args.config)
    else:
        preset = args.preset or "v4-flash"
        config, config_path = ModelConfig.preset(preset), None
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
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
