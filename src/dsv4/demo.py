"""``dsv4 demo`` (``make demo``): pretrain the ``tiny`` preset on the built-in corpus for a few minutes, then sample.

It runs ``dsv4 train``'s own code path (``dsv4.train.run.train``) with settings sized for a couple of CPU cores:
a byte-level BPE tokenizer trained on the CPython standard library, token shards, the V4 recipe (Muon, MTP,
aux-loss-free balancing, indexer training), validation loss before and after (nats per token and bits per byte),
then

- the expert load of every learned-routing layer over the last (up to) 100 steps: busiest / mean expert of the
  loads summed over those steps, against the 1.5 target;
- a sample streamed from the saved model for a fixed Python prompt;
- two cheap checks on the trained model: the saved model loads back with identical tensors, and a cached prefill
  plus token-by-token decoding gives the logits of one full call.

The run directory (default ``runs/demo``) is the demo's own: a rerun starts training afresh there, deleting the
previous demo's checkpoints, metrics, events and model but keeping its tokenizer and shards when they were made from
the same corpus and settings (that saves the minute of tokenization). A non-empty directory that is not a demo run
is refused, so nothing else is ever deleted. ``dsv4 train``'s options (``--steps``, ``--seq-len``, ...) apply, less
those for resuming, JSON output and several processes: the fields of ``dsv4.train.options.TrainOptions`` with the
defaults of ``TrainOptions.preset_for_demo()`` (which says how they were sized).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dsv4.train.options import TrainOptions, add_options

BALANCE_WINDOW = 100  # steps
BALANCE_TARGET = 1.5  # busiest expert / mean load
MARKER = "demo.json"
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "model", "curves.png")
PREP_OUTPUTS = ("tokenizer.json", "shards")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``dsv4 train``'s options that the demo takes (``TrainOptions.demo_fields()``, with the demo's defaults), then
    the sample's."""
    add_options(p, TrainOptions.preset_for_demo(), only=TrainOptions.demo_fields())
    p.add_argument("--prompt", default="def ", help="the prompt of the sample (default: 'def ')")
    p.add_argument("--max-tokens", type=int, default=120, help="tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)


def _prep_key(args: argparse.Namespace) -> dict:
    """What the tokenizer and shards of a demo directory depend on."""
    from dsv4.config import ModelConfig
    from dsv4.data import open_corpus

    base = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset)
    return {"corpus": open_corpus(args.data).identity(), "tokenizer": args.tokenizer,
            "vocab_size": args.vocab_size or base.vocab_size, "seed": args.seed}


def prepare_dir(out: Path, args: argparse.Namespace) -> bool:
    """Make ``out`` ready for a fresh demo run; True when the previous tokenizer and shards are kept."""
    key = _prep_key(args)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    kept = False
    if out.is_dir() and any(out.iterdir()):
        marker = out / MARKER
        if not marker.is_file():
            raise ValueError(f"--out {out} is not empty and is not a demo run directory (no {MARKER}); "
                             "choose another --out")
        try:
            old = json.loads(marker.read_text()).get("prep")
        except json.JSONDecodeError:
            old = None
        kept = old == key
        for name in RUN_OUTPUTS + (() if kept else PREP_OUTPUTS):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"prep": key, "args": {k: v for k, v in vars(args).items()
                                                                  if not k.startswith("_")}}, indent=1))
    return kept


def auto_threads() -> tuple[int, str]:
    """Intra-op threads for the cores that other processes leave free (at least one), and why.

    The tiny model runs thousands of small ops per step, and at each one the threads wait for each other: where a
    thread shares its core with another busy process, a step slows down instead of speeding up (on the 2-core
    machine this was sized on, with a load average of 5, a step took 3-36 s with 2 threads and 1.4-4 s with 1).
    """
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return threads, ""
    cores = os.cpu_count() or threads
    free = max(1, int(cores - load + 0.5))
    if free >= threads:
        return threads, ""
    return free, f" (load average {load:.1f} on {cores} cores: {free} left free)"


def learned_layer_names(model) -> list[str]:
    names = [f"layer {i}" for i, layer in enumerate(model.layers) if not layer.ffn.gate.hashed]
    return names + [f"MTP {i}" for i, block in enumerate(model.mtp) if not block.ffn.gate.hashed]


@torch.no_grad()
def cache_matches_full_call(model, ids: torch.Tensor) -> float:
    """max |logit difference| between one full call and a cached prefill of half the tokens + one-token decoding."""
    model.eval()
    full = model(ids)
    cache = model.new_cache(ids.shape[0])
    half = ids.shape[1] // 2
    parts = [model(ids[:, :half], cache=cache)]
    parts += [model(ids[:, i:i + 1], cache=cache) for i in range(half, ids.shape[1])]
    return float((torch.cat(parts, dim=1) - full).abs().max())


def run(args: argparse.Namespace) -> int:
    import dsv4
    from dsv4.generate import print_stream
    from dsv4.train.plot import plot_run, read_metrics, window_load_ratios
    from dsv4.train.run import train

    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    t_start = time.perf_counter()
    why = ""
    if args.threads is None:
        args.threads, why = auto_threads()
    out = Path(args.out)
    kept = prepare_dir(out, args)
    base = dsv4.ModelConfig.from_json(args.config) if args.config else dsv4.ModelConfig.preset(args.preset)
    print(f"[1/5] pretraining the {args.config or repr(args.preset)} model on {args.data!r} for {args.steps} steps "
          f"of {args.batch_size} x {args.seq_len} tokens, into {out}/"
          + (" (re-using its tokenizer and shards)" if kept else ""))
    print(f"      {base.num_hidden_layers} layers ({', '.join(base.layer_types)}), hc_mult {base.hc_mult}, "
          f"{base.n_routed_experts} experts (top-{base.num_experts_per_tok}), MTP depth "
          f"{base.num_nextn_predict_layers}; Muon + AdamW, router-bias speed {args.bias_speed:g}; "
          f"{args.threads} thread{'s' if args.threads != 1 else ''}{why}")
    sys.stdout.flush()
    options = TrainOptions.from_args(args, base=TrainOptions.preset_for_demo())
    result = train(options, say=lambda *a: print("     ", *a, flush=True))
    s, model, tokenizer = result.summary, result.model, result.tokenizer
    print(f"[2/5] validation, nats per token: {s['val_loss_before']:.3f} -> {s['val_loss']:.3f}; bits per byte: "
          f"{s['val_bits_per_byte_before']:.3f} -> {s['val_bits_per_byte']:.3f}")
    print(f"      {s['steps']} steps in {s['seconds']:.0f} s, {s['tokens_per_s']:,.0f} tokens/s, MFU {s['mfu']:.3f} "
          f"(of a {s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s matmul peak measured on {s['threads']} "
          f"thread{'s' if s['threads'] != 1 else ''})")

    records = read_metrics(out)
    ratios, n = window_load_ratios(records, BALANCE_WINDOW)
    balanced = all(r <= BALANCE_TARGET for r in ratios)
    names = learned_layer_names(model)
    names = names if len(names) == len(ratios) else [f"routed layer {i}" for i in range(len(ratios))]
    print(f"[3/5] expert load of the learned-routing layers over the last {n} steps: busiest / mean expert of the "
          f"loads summed over those steps (target <= {BALANCE_TARGET})")
    print("      " + ", ".join(f"{name} {r:.2f}" for name, r in zip(names, ratios))
          + f": {'all within' if balanced else 'NOT all within'} {BALANCE_TARGET}")

    print(f"[4/5] a sample from the saved model (prompt {args.prompt!r}, temperature {args.temperature}, "
          f"seed {args.seed}):")
    model_dir = Path(s["model_dir"])
    loaded = dsv4.from_pretrained(model_dir).eval()
    print("-" * 72)
    print_stream(loaded, tokenizer, args.prompt, args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                 seed=args.seed)
    print("-" * 72)

    trained, reloaded = model.state_dict(), loaded.state_dict()
    same = trained.keys() == reloaded.keys() and all(torch.equal(trained[k], reloaded[k]) for k in trained)
    row = result.val[0].inputs[:1, :min(result.val[0].inputs.shape[1], 4 * base.sliding_window + 5)]
    diff = cache_matches_full_call(loaded, row)
    cache_ok = diff < 1e-3
    print(f"[5/5] checks: save -> load gives identical tensors: {same}; cached prefill of {row.shape[1] // 2} tokens "
          f"+ {row.shape[1] - row.shape[1] // 2} decode steps vs one full call: max |logit difference| "
          f"{diff:.1e} ({'ok' if cache_ok else 'TOO LARGE'})")

    curves = plot_run(out, out / "curves.png")
    print(f"saved in {out}/: model/ (HF layout + tokenizer.json; `dsv4 generate --model {model_dir} --prompt ...`), "
          f"checkpoints/, metrics.jsonl, tb/ (TensorBoard), {curves.name} (`dsv4 plot`), tokenizer.json, shards/")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0 if same and cache_ok else 1
