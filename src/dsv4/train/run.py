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
restarts without re-tokenizing. ``train(options)`` is the whole run as a function: ``dsv4 demo`` calls it too.

The options, their defaults and help texts are the fields of ``dsv4.train.options.TrainOptions``; the command line
is made from them. Progress is a tqdm bar on stderr where stderr is a terminal (none with ``--quiet`` or ``--json``,
whose stdout is the one JSON object).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4.atomic import atomic_directory
from dsv4.config import ModelConfig
from dsv4.train.options import TrainOptions, add_options
from dsv4.train.stages import StagedLoader, parse_stages

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``dsv4 train``: one per field of ``TrainOptions`` (``dsv4.train.options``)."""
    add_options(p, TrainOptions())


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


def prepare(options: TrainOptions | argparse.Namespace, log=print):
    """Tokenizer, shards, config, training loader and validation batches of a run (re-used on --resume)."""
    from dsv4.data import (VAL_FRACTION, PackedLoader, build_shards, load_tokenizer, open_corpus, train_bpe,
                           validation_batches)

    args = TrainOptions.from_args(options)
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
    stages = parse_stages(args.seq_len_stages) if args.seq_len_stages else [(0, args.seq_len)]
    longest = max(length for _, length in stages)
    config = base.replace(vocab_size=tokenizer.vocab_size,
                          max_position_embeddings=max(base.max_position_embeddings, longest + 1))
    if len(stages) == 1:
        train = PackedLoader(shards, "train", batch_size=args.batch_size, seq_len=stages[0][1], seed=args.seed)
    else:
        train = StagedLoader(lambda length, rank=0, world=1: PackedLoader(
            shards, "train", batch_size=args.batch_size, seq_len=length, seed=args.seed, rank=rank,
            world_size=world), stages)
    val = validation_batches(shards, seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.val_batches,
                             seed=args.seed)
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


def train(options: TrainOptions | argparse.Namespace, say=print) -> TrainResult:
    """The whole ``dsv4 train`` run: prepare, train (resuming with ``options.resume``), evaluate, save ``model/``.
    A parsed command line (``argparse.Namespace``) stands for the ``TrainOptions`` it holds."""
    from dsv4.data import VAL_FRACTION
    from dsv4.model import Transformer
    from dsv4.parallel import launch
    from dsv4.train.flops import matmul_peak_flops, train_flops_per_token
    from dsv4.train.loop import validation_loss
    from dsv4.train.tensorboard import RunEvents

    args = TrainOptions.from_args(options)
    args.validate()
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
    if args.fp4_qat:  # before the trainer: FSDP / expert parallelism wrap the same Experts
        from dsv4.train.qat import enable_fp4_qat, enable_indexer_fp4

        enable_fp4_qat(model)
        enable_indexer_fp4(model)
    say(f"model: {args.config or args.preset}, {model.num_parameters() / 1e6:.2f} M parameters, "
        f"vocab {config.vocab_size}, sequences of {args.seq_len} tokens, batch {args.batch_size}, "
        f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}")
    bf16 = use_bf16(args.bf16)
    cfg = args.train_config(bf16)
    token_bytes = tokenizer.token_bytes()
    trainer = launch.make_trainer(par, model, train_data, cfg, out, val_batches=val)  # Trainer in one process
    val, token_bytes = launch.to_device(par, val, token_bytes)
    resumed = trainer.resume() if args.resume else None
    if resumed is not None:
        say(f"resumed from step {resumed}")
    before = validation_loss(model, val, token_bytes)
    say(f"validation before: {before[0]:.4f} nats/token, {before[1]:.4f} bits/byte")
    peak = matmul_peak_flops(torch.bfloat16 if bf16 else torch.float32)
    # TensorBoard: rank 0 only; a resumed run drops what an earlier attempt logged past its checkpoint
    tb = RunEvents(out / "tb", purge_step=None if resumed is None else resumed + 1) if launch.is_main() else None
    if not args.resume and launch.is_main():
        metrics = out / "metrics.jsonl"
        if metrics.exists():  # left by an attempt that stopped before its first checkpoint: not this run's steps
            old = metrics.with_name(f"metrics-replaced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            metrics.rename(old)
            say(f"{metrics.name} of an earlier attempt without checkpoints moved to {old.name}")
        if math.isfinite(before[0]):  # the validation curve starts before training (metrics.jsonl: steps only)
            tb.scalar("train/val_loss", before[0], 0)

    if tb is not None:
        trainer.log = tb.record
    t0 = time.perf_counter()
    try:
        summary = trainer.run(tokens_per_step=args.batch_size * args.seq_len, progress=not (args.quiet or args.json))
    finally:
        if tb is not None:
            tb.close()
    elapsed = time.perf_counter() - t0
    after = validation_loss(model, val, token_bytes)
    model_dir = out / "model"
    # model/ is one atomic write (rank 0's): weights, tokenizer and training metadata replace the old ones together
    with atomic_directory(model_dir) if launch.is_main() else nullcontext(model_dir) as target:
        launch.save_pretrained(par, model, target)  # with par: gathered (every rank), written by rank 0
        if launch.is_main():
            from dsv4.evaluate import write_training_meta

            tokenizer.save(target / "tokenizer.json")
            write_training_meta(target, fp4_qat=args.fp4_qat,
                                data=args.data if args.data == "stdlib" else str(Path(args.data).resolve()),
                                seq_len=args.seq_len, batch_size=args.batch_size, val_fraction=VAL_FRACTION,
                                seed=args.seed, steps=summary["steps"], val_loss=after[0],
                                val_bits_per_byte=after[1])
    flops_per_token = train_flops_per_token(config, args.seq_len)
    summary.update({
        "fp4_qat": args.fp4_qat,
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
        summary = train(TrainOptions.from_args(args), say).summary
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
