"""What every lab shares: its options, the data it trains on, a training run through the project's loop, the verdict,
and where results go (see ``dsv4.lab`` for what a lab module defines).

Data: the built-in corpus (``dsv4.data``'s ``stdlib``), a byte-level BPE tokenizer and token shards with the usual
validation split, prepared once under ``<out>/data/`` and re-used by every lab run with the same ``--out``. A quick
run uses one package of the standard library (``QUICK_PACKAGE``, about 0.4 MB of text) and a small vocabulary, so
that the tokenizer and shards take well under a second.

Training: ``train_run`` drives ``dsv4.train.loop.Trainer`` step by step (the V4 recipe: next-token + MTP + balance
loss, the aux-loss-free bias, gradient clipping at 1.0, warmup-stable-decay, non-finite steps skipped) and keeps the
curves a lab needs in memory; nothing is written to disk.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dsv4.lab import lab_module

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "benchmarks" / "results"  # where --save writes; tests never do
HOLDS = "holds"
DOES_NOT_HOLD = "does not hold at this scale"
QUICK_PACKAGE = "email"  # the standard-library package a --quick run trains on


@dataclass
class LabOptions:
    """The options of ``dsv4 lab NAME`` (``dsv4.lab.cli``)."""

    quick: bool = False
    out: Path = Path("runs/lab")
    save: bool = False
    json: bool = False
    seed: int = 0
    threads: int | None = None
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True), repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")

    def command(self, name: str) -> str:
        """The command line that reproduces a run with these options (less --out, --json, --save)."""
        return " ".join(["dsv4 lab", name] + (["--quick"] if self.quick else [])
                        + ([f"--seed {self.seed}"] if self.seed else [])
                        + ([f"--threads {self.threads}"] if self.threads else []))


def verdict(holds: bool, reason: str) -> dict:
    """The ``verdict`` and ``reason`` fields of a lab's result."""
    return {"verdict": HOLDS if holds else DOES_NOT_HOLD, "reason": reason}


def json_safe(obj: Any) -> Any:
    """NaN and infinities -> None, tuples -> lists, tensors -> numbers / lists: strict JSON."""
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def commit() -> str | None:
    """The checkout's short commit (None outside a git checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def run_lab(name: str, options: LabOptions, results_dir: Path | None = None) -> dict:
    """Run lab ``name``: its result with the lab's name, claim, threshold, command, commit, date and seconds added,
    its plots drawn into ``options.out``, the JSON written to ``<out>/<name>.json`` and, with ``options.save``, to
    ``<results_dir>/lab-<name>-<time>.json`` (default ``benchmarks/results``)."""
    module = lab_module(name)
    threads, code = torch.get_num_threads(), commit()  # the code the run starts with
    # a lab's own default (its THREADS: the training labs' models are so small that one thread is fastest on a busy
    # CPU), else PyTorch's
    want = options.threads or getattr(module, "THREADS", None)
    if want:
        torch.set_num_threads(want)
    options.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    t0 = time.perf_counter()
    try:
        figures = module.run(options)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    if figures.get("verdict") not in (HOLDS, DOES_NOT_HOLD) or not figures.get("reason"):
        raise RuntimeError(f"lab {name} returned no verdict ({HOLDS!r} or {DOES_NOT_HOLD!r}) with a reason")
    result = json_safe({"lab": name, "title": module.TITLE, "spec": module.SPEC, "threshold": module.THRESHOLD,
                        "command": options.command(name), "quick": options.quick, "seed": options.seed, **figures,
                        "seconds": seconds, "threads": used, "commit": code,
                        "date": time.strftime("%Y-%m-%d", time.gmtime()),
                        "load_average_at_end": os.getloadavg()[0]})
    if hasattr(module, "plot"):
        result["plots"] = [str(p) for p in module.plot(result, options.out / name)]
    (options.out / f"{name}.json").write_text(json.dumps(result) + "\n")
    if options.save:
        save_result(result, results_dir or RESULTS)
    return result


def save_result(result: dict, results_dir: Path) -> Path:
    """Write a lab's result to ``<results_dir>/lab-<name>-<time>.json`` (never over an earlier one)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = results_dir / f"lab-{result['lab']}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = results_dir / f"lab-{result['lab']}-{stamp}-{n}.json"
    path.write_text(json.dumps(result) + "\n")
    return path


def saved_results(name: str, results_dir: Path | None = None) -> list[dict]:
    """The saved results of lab ``name``, newest first."""
    found = sorted((results_dir or RESULTS).glob(f"lab-{name}-*.json"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    return [json.loads(p.read_text()) for p in found]


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class LabData:
    """A tokenizer and token shards of the built-in corpus (``lab_data``)."""

    tokenizer: Any
    shards: Any
    corpus: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def loader(self, batch_size: int, seq_len: int, seed: int = 0):
        from dsv4.data import PackedLoader

        return PackedLoader(self.shards, "train", batch_size=batch_size, seq_len=seq_len, seed=seed)

    def val(self, batch_size: int, seq_len: int, batches: int, seed: int = 0) -> list:
        from dsv4.data import validation_batches

        return validation_batches(self.shards, seq_len=seq_len, batch_size=batch_size, max_batches=batches,
                                  seed=seed)


def lab_data(options: LabOptions, vocab_size: int) -> LabData:
    """The built-in corpus tokenized with a BPE vocabulary of ``vocab_size``: the whole standard library, or with
    ``options.quick`` its ``QUICK_PACKAGE`` package; made once under ``<out>/data/`` and re-used."""
    from dsv4.data import VAL_FRACTION, build_shards, load_tokenizer, open_corpus, train_bpe
    from dsv4.data.corpus import stdlib_root

    if options.quick:
        corpus, tag = open_corpus(stdlib_root() / QUICK_PACKAGE), f"stdlib-{QUICK_PACKAGE}"
    else:
        corpus, tag = open_corpus("stdlib"), "stdlib"
    where = options.out / "data" / f"{tag}-v{vocab_size}-s{options.seed}"
    where.mkdir(parents=True, exist_ok=True)
    tok_path = where / "tokenizer.json"
    if tok_path.exists():
        tokenizer = load_tokenizer(tok_path)
    else:
        options.log(f"training a BPE tokenizer (vocab {vocab_size}) on {tag} ...")
        tokenizer = train_bpe(corpus, vocab_size, save_to=tok_path)
    shards = build_shards(corpus, tokenizer, where / "shards", val_fraction=VAL_FRACTION, seed=options.seed)
    return LabData(tokenizer, shards, tag)


# ------------------------------------------------------------------------------------------------------ training
@dataclass
class RunCurves:
    """What ``train_run`` keeps of a run: per step the language-model loss, the gradient norm (before clipping)
    and the busiest-over-mean expert load of each learned-routing layer; validation losses at their steps."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    max_load_ratio: list[list[float]] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    skipped: int = 0
    tokens_per_step: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"loss": self.loss, "grad_norm": self.grad_norm, "val_steps": self.val_steps,
                "val_loss": self.val_loss, "skipped_steps": self.skipped, "tokens_per_step": self.tokens_per_step,
                "seconds": self.seconds}


def adamw_only(model: torch.nn.Module, lr: float, weight_decay: float = 0.1):
    """Plain AdamW over every parameter (betas 0.9 / 0.95, eps 1e-8; weight decay on matrices, embedding and head,
    none on vector-like parameters), with the ``set_lr`` the loop calls: the baseline Muon is measured against."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return _SettableAdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, betas=(0.9, 0.95), eps=1e-8)


class _SettableAdamW(torch.optim.AdamW):
    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr


def train_run(model, data: LabData, *, steps: int, lr: float, batch_size: int, seq_len: int, val_batches: int = 4,
              val_every: int = 0, optimizer: Callable | None = None, on_step: Callable | None = None,
              seed: int = 0, **config: Any) -> RunCurves:
    """Train ``model`` for ``steps`` steps of ``batch_size`` x ``seq_len`` tokens at peak ``lr`` with the project's
    loop (``Trainer.train_step``); ``config``: more ``TrainConfig`` fields (``warmup_steps``, ``bias_speed``,
    ``mtp_weight``, ``anticipatory_routing``, ...). ``optimizer(model, lr)`` replaces the V4 Muon + AdamW pair;
    ``on_step(trainer, step, step_result)`` is called after every step. Validation every ``val_every`` steps (0:
    only at the end) on ``val_batches`` batches of the validation split."""
    from dsv4.train.balance import load_imbalance
    from dsv4.train.loop import TrainConfig, Trainer

    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, val_every=0, ckpt_every=0,
                      **{"warmup_steps": min(10, steps // 5), **config})

    class LabTrainer(Trainer):
        def make_optimizer(self):
            return optimizer(self.model, self.cfg.lr) if optimizer is not None else super().make_optimizer()

    trainer = LabTrainer(model, data.loader(batch_size, seq_len, seed), cfg, out=os.devnull,
                         val_batches=data.val(batch_size, seq_len, val_batches, seed))
    curves = RunCurves(tokens_per_step=batch_size * seq_len)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        r = trainer.train_step()
        curves.loss.append(r.lm_loss)
        curves.grad_norm.append(r.grad_norm)
        curves.max_load_ratio.append([load_imbalance(x) for x in r.loads])
        curves.skipped += int(r.skipped)
        if on_step is not None:
            on_step(trainer, step, r)
        if step == steps or (val_every and step % val_every == 0):
            curves.val_steps.append(step)
            curves.val_loss.append(trainer.validate())
    curves.seconds = time.perf_counter() - t0
    return curves


def save_figure(fig, prefix: str, name: str, dpi: int = 80) -> Path:
    """A lab's figure laid out, written to ``<prefix>-<name>.png`` and closed; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(f"{prefix}-{name}.png")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def spikes(losses: list[float], window: int = 20, sigma: float = 4.0) -> int:
    """Loss spikes: steps whose loss is non-finite or more than ``sigma`` standard deviations above the mean of the
    ``window`` finite losses before it (the detector of ``dsv4.train.anticipatory``, its baseline formed anew after
    each spike)."""
    from dsv4.train.anticipatory import AnticipatoryRouting

    detector = AnticipatoryRouting([], window=window, sigma=sigma, min_history=min(window, 10))
    return sum(detector.after_step(x if x is not None else float("nan")) for x in losses)
