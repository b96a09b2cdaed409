"""``dsv4 train``: pretrain a V4 model on a corpus, end to end.

    dsv4 train --preset tiny --data stdlib --steps 300 --out runs/tiny [--resume] [--seed 0] [--json]

The run directory holds ``tokenizer.json`` (trained on the corpus unless ``--tokenizer`` names one), ``shards/``
(token shards with a validation split), ``checkpoints/`` (resumable), ``metrics.jsonl``, TensorBoard events in
``tb/``, and at the end ``model/`` in HF layout (what ``dsv4 generate --model`` and ``dsv4.from_pretrained`` read).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import islice
from pathlib import Path

import torch

from dsv4.config import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, v4-flash, v4-pro)")
    p.add_argument("--config", default=None, help="a config.json instead of a preset")
    p.add_argument("--data", default="stdlib", help="'stdlib', a file, a folder, or a .jsonl file with 'text'")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default: the preset's)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json, or 'deepseek-v4'")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="off",
                   help="bf16 autocast with float32 masters (auto: where the CPU has fast bf16 matmuls)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def prepare(args: argparse.Namespace, log=print):
    """Tokenizer, shards, config and loaders of a run (re-used on --resume)."""
    from dsv4.data import PackedLoader, build_shards, load_tokenizer, open_corpus, train_bpe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset)
    tok_path = out / "tokenizer.json"
    corpus = open_corpus(args.data)
    if tok_path.exists():
        tokenizer = load_tokenizer(tok_path)
    elif args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer.save(tok_path)
    else:
        vocab = args.vocab_size or base.vocab_size
        log(f"training a byte-level BPE tokenizer (vocab {vocab}) on {corpus.name} ...")
        tokenizer = train_bpe(corpus, vocab, save_to=tok_path)
    shards = build_shards(corpus, tokenizer, out / "shards", val_fraction=0.02, seed=args.seed)
    stats = shards.split_stats("train")
    log(f"data: {corpus.name}: {stats}")
    config = base.replace(vocab_size=tokenizer.vocab_size,
                          max_position_embeddings=max(base.max_position_embeddings, args.seq_len + 1))
    train = PackedLoader(shards, "train", batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    val_loader = PackedLoader(shards, "val", batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                              shuffle=False)
    val = list(islice(val_loader, min(args.val_batches, max(1, val_loader.rows_in_epoch(0) // args.batch_size))))
    return tokenizer, shards, config, train, val


def use_bf16(choice: str) -> bool:
    if choice != "auto":
        return choice == "on"
    from dsv4.train.flops import bf16_is_fast

    return bf16_is_fast()


def run(args: argparse.Namespace) -> int:
    from dsv4.model import Transformer
    from dsv4.train.flops import matmul_peak_flops, train_flops_per_token
    from dsv4.train.loop import Trainer, TrainConfig, evaluate
    from dsv4.train.tensorboard import EventWriter

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    tokenizer, shards, config, train, val = prepare(args, say)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    say(f"model: {args.config or args.preset}, {model.num_parameters() / 1e6:.2f} M parameters, "
        f"vocab {config.vocab_size}, sequences of {args.seq_len} tokens, batch {args.batch_size}")
    bf16 = use_bf16(args.bf16)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=min(args.warmup, args.steps), seed=args.seed,
                      val_every=args.val_every, ckpt_every=args.ckpt_every, autocast_bf16=bf16)
    tb = EventWriter(Path(args.out) / "tb")
    token_bytes = tokenizer.token_bytes()

    def log(record: dict) -> None:
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "tokens_per_s", "grad_norm", "val_loss"):
            if key in record and record[key] is not None and math.isfinite(record[key]):
                tb.scalar(f"train/{key}", record[key], record["step"])
        for i, ratio in enumerate(record.get("max_load_ratio", [])):
            tb.scalar(f"experts/max_load_ratio_{i}", ratio, record["step"])

    trainer = Trainer(model, train, cfg, args.out, val_batches=val, log=log)
    if args.resume:
        step = trainer.resume()
        say(f"resumed from step {step}")
    elif (Path(args.out) / "checkpoints").exists() and any((Path(args.out) / "checkpoints").iterdir()):
        raise ValueError(f"{args.out} already holds checkpoints: pass --resume to continue, or use a new --out")
    before = evaluate(model, val, token_bytes)
    say(f"validation before: {before[0]:.4f} nats/token, {before[1]:.4f} bits/byte")
    peak = matmul_peak_flops(torch.bfloat16 if bf16 else torch.float32)
    t0 = time.perf_counter()
    summary = trainer.run(tokens_per_step=args.batch_size * args.seq_len, progress=not args.quiet)
    elapsed = time.perf_counter() - t0
    after = evaluate(model, val, token_bytes)
    tb.close()
    model.save_pretrained(Path(args.out) / "model")
    tokenizer.save(Path(args.out) / "model" / "tokenizer.json")
    flops_per_token = train_flops_per_token(config, args.seq_len)
    summary.update({
        "val_loss": after[0], "val_bits_per_byte": after[1], "val_loss_before": before[0],
        "val_bits_per_byte_before": before[1], "mfu": summary["tokens_per_s"] * flops_per_token / peak,
        "train_flops_per_token": flops_per_token, "matmul_peak_flops": peak, "bf16": bf16,
        "seconds": elapsed, "model_dir": str(Path(args.out) / "model"),
    })
    if args.json:
        print(json.dumps(summary))
    else:
        say(f"validation after: {after[0]:.4f} nats/token, {after[1]:.4f} bits/byte "
            f"({summary['steps']} steps, {summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.3f})")
        say(f"saved to {summary['model_dir']}")
    return 0
