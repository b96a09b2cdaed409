"""``dsv4 eval``: the validation loss of a saved model, and what real FP4 experts cost it.

    dsv4 eval --model DIR --data PATH|stdlib [--fp4] [--json]

The model directory (HF or official layout, or a ``dsv4 train`` run standing for its ``model/``) must hold the
``tokenizer.json`` it was trained with (or pass ``--tokenizer``). The corpus is tokenized into shards with the
validation split of ``dsv4 train`` (same ``val_fraction``, ``dsv4.data.VAL_FRACTION``, and ``seed``, so the same
held-out documents, ``dsv4.data.split_documents``): a
run directory's own ``shards/`` when they match, else a cache folder (``--cache``, default ``$DSV4_CACHE`` or
``~/.cache/dsv4``, then ``shards/<corpus>-<key>``). Every row of the split's first epoch is evaluated once, in batches
of ``--batch-size`` rows of ``--seq-len`` tokens packed with document boundaries (``--batches`` caps the count):
``dsv4.data.validation_batches``, what a training run validates on.

Figures: next-token cross-entropy in nats per token and bits per byte.
* ``val_loss``: the model as it was trained: float32 masters, through the FP4 QAT forward (``dsv4.train.qat``: FP4
  experts and the indexers' FP4 query / key path) when it was trained with QAT. That is read from the model's
  ``training.json`` (written by ``dsv4 train``, copied by ``dsv4 convert``); ``--qat on|off`` overrides it.
* with ``--fp4``, ``fp4_val_loss``: the routed experts' weights replaced by real FP4 (MXFP4 quantized and
  dequantized once: what an official FP4 checkpoint of this model holds), and ``fp4_rel_diff`` = fp4 / as trained
  - 1 (the same for bits per byte); and how far real FP4 moves the predictions of the model as trained:
  ``fp4_kl`` (mean KL(as trained || real FP4) per token, nats) and ``fp4_top1_agreement`` (tokens whose most likely
  next token stays). For a QAT model the masters without quantization are reported too (``float_val_loss``).

``seq_len``, ``batch_size``, ``val_fraction``, ``seed`` and ``data`` default to the values in ``training.json``,
else ``dsv4 train``'s defaults (``TrainOptions``, ``VAL_FRACTION``) and (``--data`` required).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from dsv4.atomic import write_atomically
from dsv4.data.packing import validation_batches
from dsv4.data.shards import VAL_FRACTION
from dsv4.train.options import TrainOptions

TRAINING_META = "training.json"
DEFAULTS = {"seq_len": TrainOptions.seq_len, "batch_size": TrainOptions.batch_size, "val_fraction": VAL_FRACTION,
            "seed": TrainOptions.seed}  # dsv4 train's, for a model without training.json


# --------------------------------------------------------------------------------------------- training metadata
def write_training_meta(model_dir: str | Path, **fields) -> Path:
    """Write ``training.json`` beside a saved model: how it was trained (``fp4_qat``, ``seq_len``, ``batch_size``,
    ``data``, ``val_fraction``, ``seed``, ``val_loss``, ...), which ``dsv4 eval`` reads for its defaults."""
    from dsv4.train.loop import strict_json

    path = Path(model_dir) / TRAINING_META
    fields = strict_json(fields)  # NaN / inf -> null
    text = json.dumps(fields, indent=2, sort_keys=True) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def read_training_meta(model_dir: str | Path) -> dict:
    """The ``training.json`` of a model directory, or ``{}`` when there is none."""
    path = Path(model_dir) / TRAINING_META
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(meta).__name__}")
    return meta


# ----------------------------------------------------------------------------------------------------- the data
def default_cache_root() -> Path:
    return Path(os.environ.get("DSV4_CACHE") or Path.home() / ".cache" / "dsv4")


def shard_cache_dir(corpus, tokenizer, val_fraction: float, seed: int, root: str | Path | None = None) -> Path:
    """``<root>/shards/<corpus name>-<key>``: one folder per (corpus, tokenizer, split) so nothing is overwritten."""
    ident = {"corpus": corpus.identity(), "tokenizer": tokenizer.sha256, "val_fraction": val_fraction, "seed": seed}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(corpus.name).name)[:48]
    return Path(root or default_cache_root()) / "shards" / f"{name}-{key}"


def validation_shards(data, tokenizer, *, val_fraction: float = VAL_FRACTION, seed: int = 0,
                      candidates: list[Path] = (), cache: str | Path | None = None):
    """Token shards of ``data`` with the validation split ``dsv4 train`` uses: the first of ``candidates`` built
    from the same inputs (never rebuilt or replaced), else built (once) in the cache."""
    from dsv4.data import build_shards, open_corpus

    corpus = open_corpus(data)
    for path in candidates:
        if (Path(path) / "index.json").is_file():
            try:
                return build_shards(corpus, tokenizer, path, val_fraction=val_fraction, seed=seed)
            except (ValueError, FileNotFoundError):
                continue  # other inputs: leave them alone
    return build_shards(corpus, tokenizer, shard_cache_dir(corpus, tokenizer, val_fraction, seed, cache),
                        val_fraction=val_fraction, seed=seed)


# ------------------------------------------------------------------------------------------------- the figures
def evaluate_model(model, batches, token_bytes: torch.Tensor | None = None, *, qat: bool = False,
                   fp4: bool = False) -> dict:
    """``val_loss`` / ``val_bits_per_byte`` of ``model`` as trained (with the FP4 QAT forward when ``qat``: FP4
    experts and the indexers' FP4 query / key path, as ``dsv4 train --fp4-qat`` runs them); with
    ``fp4`` also ``fp4_val_loss`` / ``fp4_val_bits_per_byte`` with real FP4 routed experts and ``fp4_rel_diff``,
    and for a QAT model ``float_val_loss`` / ``float_val_bits_per_byte`` of the unquantized masters (FP4 nowhere).
    Without ``qat`` nothing but the routed experts is ever quantized. The model's QAT switches are left as they
    were."""
    from dsv4.model.indexer import Indexer
    from dsv4.train.loop import validation_loss
    from dsv4.train.qat import (
        enable_fp4_qat,
        enable_indexer_fp4,
        expert_modules,
        real_fp4_experts,
    )

    flags = [m.fp4_qat for m in expert_modules(model)]
    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    indexer_flags = [m.fp4_qk for m in indexers]
    out: dict = {}
    try:
        if qat:  # what `dsv4 train --fp4-qat` ran: FP4 experts and the indexers' FP4 query / key path
            enable_fp4_qat(model, True)
            enable_indexer_fp4(model, True)
        else:
            for m in expert_modules(model):
                m.fp4_qat = False
            for m in indexers:
                m.fp4_qk = False
        out["val_loss"], out["val_bits_per_byte"] = validation_loss(model, batches, token_bytes)
        if fp4:
            with real_fp4_experts(model):
                out["fp4_val_loss"], out["fp4_val_bits_per_byte"] = validation_loss(model, batches, token_bytes)
            out["fp4_rel_diff"] = out["fp4_val_loss"] / out["val_loss"] - 1
            out["fp4_kl"], out["fp4_top1_agreement"] = prediction_shift(model, batches, real_fp4_experts)
            if qat:
                enable_fp4_qat(model, False)
                enable_indexer_fp4(model, False)
                out["float_val_loss"], out["float_val_bits_per_byte"] = validation_loss(model, batches, token_bytes)
    finally:
        for m, f in zip(expert_modules(model), flags):
            m.fp4_qat = f
        for m, f in zip(indexers, indexer_flags):
            m.fp4_qk = f
    return out


@torch.no_grad()
def prediction_shift(model, batches, change) -> tuple[float, float]:
    """How far ``change`` (a context manager taking the model, e.g. ``real_fp4_experts``) moves the model's
    next-token distributions over ``batches``: the mean per predicted token of KL(p as is || p changed) in nats, and
    the fraction of tokens whose most likely next token stays the same.

    The KL is zero only for a change that leaves every prediction as it was, and second order in a small change, so
    it shows what a loss difference cannot: a loss is first order in the change, with a sign set by the run."""
    from dsv4.data import IGNORE_INDEX
    from dsv4.train.loop import shifted_targets

    was_training = model.training
    model.eval()
    kl, same, count = 0.0, 0, 0
    try:
        for batch in batches:
            keep = (shifted_targets(batch, 1) != IGNORE_INDEX).flatten()
            before = model(batch.inputs, doc_ids=batch.input_doc_ids).flatten(0, 1)[keep]
            with change(model):
                after = model(batch.inputs, doc_ids=batch.input_doc_ids).flatten(0, 1)[keep]
            logp, logq = torch.log_softmax(before.float(), -1), torch.log_softmax(after.float(), -1)
            kl += float((logp.exp() * (logp - logq)).sum())
            same += int((before.argmax(-1) == after.argmax(-1)).sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        return float("nan"), float("nan")
    return kl / count, same / count


def _count_targets(batches) -> int:
    from dsv4.data import IGNORE_INDEX
    from dsv4.train.loop import shifted_targets

    return int(sum(int((shifted_targets(b, 1) != IGNORE_INDEX).sum()) for b in batches))


# ------------------------------------------------------------------------------------------------------- the CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF or official layout) or a `dsv4 train` run")
    p.add_argument("--data", default=None, help="the corpus: 'stdlib', a file, a folder, or a .jsonl file "
                                                "(default: the one in the model's training.json)")
    p.add_argument("--fp4", action="store_true",
                   help="also evaluate with real FP4 routed experts and report the relative difference")
    p.add_argument("--qat", choices=("auto", "on", "off"), default="auto",
                   help="evaluate 'as trained' with the FP4 QAT forward (auto: as training.json says)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the model)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per row (default: training's, else {DEFAULTS['seq_len']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"rows per batch (default: training's, else {DEFAULTS['batch_size']})")
    p.add_argument("--batches", type=int, default=None, help="evaluate at most this many batches (default: all)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"validation split (default: training's, else {DEFAULTS['val_fraction']})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"split seed (default: training's, else {DEFAULTS['seed']})")
    p.add_argument("--cache", default=None, help="folder for token shards (default: $DSV4_CACHE or ~/.cache/dsv4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def run(args: argparse.Namespace) -> int:
    import dsv4
    from dsv4.convert import model_dir
    from dsv4.generate import model_tokenizer

    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.threads:
        torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path}: config.json not found")
    meta = read_training_meta(path)
    pick = {k: getattr(args, k) if getattr(args, k) is not None else meta.get(k, DEFAULTS[k]) for k in DEFAULTS}
    for k in ("seq_len", "batch_size"):
        if not isinstance(pick[k], int) or isinstance(pick[k], bool) or pick[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer, got {pick[k]!r}")
    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    frac = pick["val_fraction"]
    if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < frac < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {frac!r}")
    data = args.data or meta.get("data")
    if not data:
        raise ValueError("--data is required (the model's training.json does not name its corpus)")
    qat = bool(meta.get("fp4_qat", False)) if args.qat == "auto" else args.qat == "on"
    tokenizer = model_tokenizer(path, args.tokenizer)
    tok_path = args.tokenizer or path / "tokenizer.json"

    t0 = time.perf_counter()
    model = dsv4.from_pretrained(path)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer at {tok_path} has {tokenizer.vocab_size} ids, more than the model's "
                         f"vocab_size {model.config.vocab_size}: not the model's tokenizer")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    candidates = [path.parent / "shards"] if path.name == "model" else []
    shards = validation_shards(data, tokenizer, val_fraction=pick["val_fraction"], seed=pick["seed"],
                               candidates=candidates, cache=args.cache)
    batches = [b.to(device) for b in validation_batches(shards, seq_len=pick["seq_len"],
                                                         batch_size=pick["batch_size"], max_batches=args.batches,
                                                         seed=pick["seed"])]
    say(f"evaluating {path} on {len(batches)} validation batch(es) of {pick['batch_size']} x {pick['seq_len']} "
        f"tokens from {data} ({'FP4 QAT forward' if qat else 'float experts'}"
        f"{', then real FP4 experts' if args.fp4 else ''}) ...")
    figures = evaluate_model(model, batches, tokenizer.token_bytes().to(device), qat=qat, fp4=args.fp4)
    record = {"model": str(path), "data": str(data), "split": "val", "shards": str(shards.path),
              "seq_len": pick["seq_len"], "batch_size": pick["batch_size"], "batches": len(batches),
              "tokens": _count_targets(batches), "fp4_qat": qat, **figures,
              "training_val_loss": meta.get("val_loss"), "seconds": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(record))
        return 0
    label = "as trained (FP4 QAT forward)" if qat else "as trained (float experts)"
    say(f"{label:<32} {figures['val_loss']:.4f} nats/token  {figures['val_bits_per_byte']:.4f} bits/byte")
    if args.fp4:
        say(f"{'real FP4 experts':<32} {figures['fp4_val_loss']:.4f} nats/token  "
            f"{figures['fp4_val_bits_per_byte']:.4f} bits/byte  ({100 * figures['fp4_rel_diff']:+.2f}%)")
        say(f"{'  its predictions moved':<32} KL {figures['fp4_kl']:.2e} nats/token from the model as trained, "
            f"top-1 kept on {100 * figures['fp4_top1_agreement']:.2f}% of tokens")
        if qat:
            say(f"{'float masters (no quantization)':<32} {figures['float_val_loss']:.4f} nats/token  "
                f"{figures['float_val_bits_per_byte']:.4f} bits/byte")
    say(f"({record['tokens']:,} target tokens, {record['seconds']:.1f} s)")
    return 0
