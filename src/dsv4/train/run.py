"""``dsv4 train``: pretrain a V4 model on a corpus, end to end.

    dsv4 train --preset tiny --data stdlib --steps 300 --out runs/tiny [--resume] [--seed 0] [--json]

The run directory holds ``tokenizer.json`` (trained on the corpus unless ``--tokenizer`` names one), ``shards/``
(token shards with a validation split), ``checkpoints/`` (resumable), ``metrics.jsonl``, TensorBoard events in
``tb/``, and at the end ``model/`` in HF layout (what ``dsv4 generate --model`` and ``dsv4.from_pretrained`` read).

Under ``torchrun --nproc_per_node=N`` the same command trains on N ranks (FSDP2 + expert parallelism, ``--ep``,
``--dp-shard``; ``--batch-size`` rows per rank): docs/distributed.md, ``dsv4.parallel`` (``dsv4.parallel.launch`` is
what this module calls).

A directory that already holds checkpoints is only continued with ``--resume`` (which then needs one); a
``tokenizer.json`` and ``shards/`` already there are re-used, so a run that stopped before its first checkpoint
restarts without re-tokenizing. ``train(args)`` is the whole run as a function: ``dsv4 demo`` calls it too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from dsv4.config import ModelConfig
from dsv4.train.stages import StagedLoader, parse_stages

TB_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "tokens_per_s", "grad_norm", "val_loss",
           "indexer_kl", "indexer_recall")


def add_arguments(p: argparse.ArgumentParser, demo: bool = False) -> None:
    """The options of ``dsv4 train``; ``demo``: those ``dsv4 demo`` shares (no --resume or --json, --out optional)."""
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, v4-flash, v4-pro)")
    p.add_argument("--config", default=None, help="a config.json instead of a preset")
    p.add_argument("--data", default="stdlib", help="'stdlib', a file, a folder, or a .jsonl file with 'text'")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--out", required=not demo, help="run directory" + (" (default: %(default)s)" if demo else ""))
    if not demo:
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
        p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and sampling")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training row (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps (default: %(default)s)")
    p.add_argument("--bias-speed", type=float, default=1e-3,
                   help="aux-loss-free balancing: router-bias change per step (spec 4; default: %(default)s)")
    p.add_argument("--fp4-qat", action="store_true",
                   help="FP4 quantization-aware training of the routed experts: MXFP4 fake-quantized weights in the "
                        "forward, straight-through gradient to the float32 masters (spec 6.4)")
    p.add_argument("--seq-len-stages", default=None, metavar="L[,L@STEP...]",
                   help="sequence length in stages, e.g. 512,2048@300,8192@600 (overrides --seq-len)")
    p.add_argument("--dense-steps", type=int, default=0,
                   help="first steps with dense CSA attention (every visible compressed entry; spec 6.2)")
    p.add_argument("--indexer-warmup", type=int, default=0,
                   help="then steps training only the lightning indexer (its KL), before sparse attention")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default: the preset's)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json, or 'deepseek-v4'")
    p.add_argument("--val-every", type=int, default=100, help="steps between validations (default: %(default)s)")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches (default: %(default)s)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="off",
                   help="bf16 autocast with float32 masters (auto: where the CPU has fast bf16 matmuls)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: " + ("as many as other processes leave cores free)"
                                                                if demo else "PyTorch's)"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if not demo:
        from dsv4.parallel import launch

        launch.add_arguments(p)  # --ep, --dp-shard, --dist-timeout


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse, before any work, a --resume with nothing to resume and a fresh run over existing checkpoints."""
    from dsv4.train.checkpoint import list_checkpoints, recover_checkpoints

    if resume:  # a checkpoint whose rewrite was killed between its two renames counts
        recover_checkpoints(out / "checkpoints")
    found = list_checkpoints(out / "checkpoints") if (out / "checkpoints").is_dir() else []
    if resume and not found:
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {out / 'checkpoints'}")
    if not resume and found:
        raise ValueError(f"{out} already holds checkpoints (last: {found[-1].name}): pass --resume to continue, "
                         "or use a new --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")


VAL_FRACTION = 0.02  # dsv4.evaluate.DEFAULTS["val_fraction"] must match


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
    if not (out / "shards").exists():
        log(f"tokenizing {corpus.name} into shards ...")
    shards = build_shards(corpus, tokenizer, out / "shards", val_fraction=VAL_FRACTION, seed=args.seed)
    stats = shards.split_stats("train")
    log(f"data: {corpus.name}: {stats['n_docs']:,} documents, {stats['n_tokens']:,} tokens "
        f"({shards.bytes_per_token('train'):.2f} bytes per token) for training")
    stages = parse_stages(args.seq_len_stages) if getattr(args, "seq_len_stages", None) else [(0, args.seq_len)]
    longest = max(length for _, length in stages)
    config = base.replace(vocab_size=tokenizer.vocab_size,
                          max_position_embeddings=max(base.max_position_embeddings, longest + 1))
    if len(stages) == 1:
        train = PackedLoader(shards, "train", batch_size=args.batch_size, seq_len=stages[0][1], seed=args.seed)
    else:
        train = StagedLoader(lambda length, rank=0, world=1: PackedLoader(
            shards, "train", batch_size=args.batch_size, seq_len=length, seed=args.seed, rank=rank,
            world_size=world), stages)
    val_loader = PackedLoader(shards, "val", batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                              shuffle=False)
    val = list(islice(val_loader, min(args.val_batches, max(1, val_loader.rows_in_epoch(0) // args.batch_size))))
    return tokenizer, shards, config, train, val


def use_bf16(choice: str) -> bool:
    if choice != "auto":
        return choice == "on"
    from dsv4.train.flops import bf16_is_fast

    return bf16_is_fast()


@dataclass
class TrainResult:
    """What a finished run leaves in memory: the summary ``--json`` prints, the trained model and its tokenizer."""

    summary: dict
    model: torch.nn.Module
    tokenizer: object
    val: list
    out: Path


def train(args: argparse.Namespace, say=print) -> TrainResult:
    """The whole ``dsv4 train`` run: prepare, train (resuming with ``args.resume``), evaluate, save ``model/``."""
    from dsv4.model import Transformer
    from dsv4.parallel import launch
    from dsv4.train.flops import matmul_peak_flops, train_flops_per_token
    from dsv4.train.loop import TrainConfig, evaluate
    from dsv4.train.tensorboard import EventWriter

    for name in ("steps", "seq_len", "batch_size", "val_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.bias_speed >= 0:  # NaN too
        raise ValueError(f"--bias-speed must be >= 0, got {args.bias_speed}")
    if not args.lr > 0:  # NaN too
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    out = Path(args.out)
    check_run_dir(out, args.resume)
    if args.threads:
        torch.set_num_threads(args.threads)
    par = launch.from_args(args)  # None in one process; else this rank of a torchrun launch
    say = launch.main_only(say)
    with launch.main_first(par):  # rank 0 builds the tokenizer and shards, then the others read them
        tokenizer, shards, config, train_data, val = prepare(args, say)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    if getattr(args, "fp4_qat", False):  # before the trainer: FSDP / expert parallelism wrap the same Experts
        from dsv4.train.qat import enable_fp4_qat, enable_indexer_fp4

        enable_fp4_qat(model)
        enable_indexer_fp4(model)
    say(f"model: {args.config or args.preset}, {model.num_parameters() / 1e6:.2f} M parameters, "
        f"vocab {config.vocab_size}, sequences of {args.seq_len} tokens, batch {args.batch_size}, "
        f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}")
    bf16 = use_bf16(args.bf16)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=min(args.warmup, args.steps), seed=args.seed,
                      val_every=args.val_every, ckpt_every=args.ckpt_every, autocast_bf16=bf16,
                      bias_speed=args.bias_speed, dense_steps=getattr(args, "dense_steps", 0),
                      indexer_warmup_steps=getattr(args, "indexer_warmup", 0))
    token_bytes = tokenizer.token_bytes()
    trainer = launch.make_trainer(par, model, train_data, cfg, out, val_batches=val)  # Trainer in one process
    val, token_bytes = launch.to_device(par, val, token_bytes)
    if args.resume:
        say(f"resumed from step {trainer.resume()}")
    before = evaluate(model, val, token_bytes)
    say(f"validation before: {before[0]:.4f} nats/token, {before[1]:.4f} bits/byte")
    peak = matmul_peak_flops(torch.bfloat16 if bf16 else torch.float32)
    tb = EventWriter(out / "tb") if launch.is_main() else launch.NullWriter()
    if not args.resume and launch.is_main():
        metrics = out / "metrics.jsonl"
        if metrics.exists():  # left by an attempt that stopped before its first checkpoint: not this run's steps
            old = metrics.with_name(f"metrics-replaced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            metrics.rename(old)
            say(f"{metrics.name} of an earlier attempt without checkpoints moved to {old.name}")
        if math.isfinite(before[0]):  # the validation curve starts before training (metrics.jsonl: steps only)
            tb.scalar("train/val_loss", before[0], 0)

    def log(record: dict) -> None:
        for key in TB_KEYS:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                tb.scalar(f"train/{key}", value, record["step"])
        for i, ratio in enumerate(record.get("max_load_ratio", [])):
            tb.scalar(f"experts/max_load_ratio_{i}", ratio, record["step"])

    trainer.log = log
    t0 = time.perf_counter()
    try:
        summary = trainer.run(tokens_per_step=args.batch_size * args.seq_len, progress=not args.quiet)
    finally:
        tb.close()
    elapsed = time.perf_counter() - t0
    after = evaluate(model, val, token_bytes)
    model_dir = out / "model"
    launch.save_pretrained(par, model, model_dir)  # with par: gathered, written by rank 0
    if launch.is_main():
        tokenizer.save(model_dir / "tokenizer.json")
        from dsv4.evaluate import write_training_meta

        write_training_meta(model_dir, fp4_qat=bool(getattr(args, "fp4_qat", False)),
                            data=args.data if args.data == "stdlib" else str(Path(args.data).resolve()),
                            seq_len=args.seq_len, batch_size=args.batch_size, val_fraction=VAL_FRACTION,
                            seed=args.seed, steps=summary["steps"], val_loss=after[0], val_bits_per_byte=after[1])
    flops_per_token = train_flops_per_token(config, args.seq_len)
    summary.update({
        "fp4_qat": bool(getattr(args, "fp4_qat", False)),
        "val_loss": after[0], "val_bits_per_byte": after[1], "val_loss_before": before[0],
        "val_bits_per_byte_before": before[1],
        "mfu": summary["tokens_per_s"] * flops_per_token / (peak * launch.world_size()),
        "train_flops_per_token": flops_per_token, "matmul_peak_flops": peak, "bf16": bf16,
        "threads": torch.get_num_threads(), "seconds": elapsed, "model_dir": str(model_dir),
    })
    return TrainResult(summary, model, tokenizer, val, out)


def json_safe(obj):
    """NaN and infinities -> None, so that the object is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    from dsv4.parallel import launch

    try:
        summary = train(args, say).summary
    except launch.DistributedError:  # a rank died or hung: already explained on stderr
        return 1
    if not launch.finish():  # ends the process group; ranks other than 0 report nothing
        return 0
    if args.json:
        print(json.dumps(json_safe(summary)))
    else:
        say(f"validation after: {summary['val_loss']:.4f} nats/token, {summary['val_bits_per_byte']:.4f} bits/byte "
            f"({summary['steps']} steps, {summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.4f})")
        say(f"saved to {summary['model_dir']}")
    return 0
