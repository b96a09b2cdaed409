"""The options of a pretraining run, defined once: ``TrainOptions``.

Each field of ``TrainOptions`` is one option of ``dsv4 train``: its name is the option's (``seq_len`` is
``--seq-len``), its annotation the option's type (a ``bool`` is a flag), its default the option's default and
``metadata["help"]`` its help text (``metadata["choices"]``, ``["metavar"]`` and ``["required"]`` where an option
has them). ``add_options`` makes the command line from the fields and ``TrainOptions.from_args`` reads a parsed
command line back, so ``dsv4 train --help`` lists exactly these fields.

``dsv4 demo`` takes the same options with the defaults of ``TrainOptions.preset_for_demo()`` (sized for a couple
of CPU cores), less the fields marked ``metadata["demo"] = False`` (resuming, JSON output, several processes). Both
commands hand a ``TrainOptions`` to ``dsv4.train.run.train``, which gives the loop its settings through
``TrainOptions.train_config``; ``dsv4.train.loop.TrainConfig`` takes its defaults for the same settings from these
fields, and ``dsv4 eval`` its ``seq_len``, ``batch_size`` and ``seed`` defaults.

The validation split itself (which documents are held out, which rows are evaluated) is defined in ``dsv4.data``:
``VAL_FRACTION``, ``split_documents`` and ``validation_batches``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

if typing.TYPE_CHECKING:
    from dsv4.train.loop import TrainConfig


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A field of ``TrainOptions``: its default and the metadata ``add_options`` reads."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainOptions:
    """Everything a ``dsv4 train`` run is told on its command line (see the module docstring)."""

    preset: str = _opt("tiny", "model preset (tiny, small, v4-flash, v4-pro)")
    config: str | None = _opt(None, "a config.json instead of a preset")
    data: str = _opt("stdlib", "'stdlib', a file, a folder, or a .jsonl file with 'text'")
    steps: int = _opt(300, "optimizer steps")
    out: str | None = _opt(None, "run directory", required=True)
    resume: bool = _opt(False, "continue from the last checkpoint in --out", demo=False)
    json: bool = _opt(False, "print one JSON object at the end (and no progress bar)", demo=False)
    seed: int = _opt(0, "seed of the weights, data order and sampling")
    seq_len: int = _opt(256, "tokens per training row")
    batch_size: int = _opt(8, "rows per step (under torchrun: per rank)")
    lr: float = _opt(3e-3, "peak learning rate")
    warmup: int = _opt(30, "warm-up steps")
    bias_speed: float = _opt(1e-3, "aux-loss-free balancing: router-bias change per step (spec 4)")
    fp4_qat: bool = _opt(False, "FP4 quantization-aware training of the routed experts: MXFP4 fake-quantized "
                                "weights in the forward, straight-through gradient to the float32 masters (spec 6.4)")
    seq_len_stages: str | None = _opt(None, "sequence length in stages, e.g. 512,2048@300,8192@600 "
                                            "(overrides --seq-len)", metavar="L[,L@STEP...]")
    dense_steps: int = _opt(0, "first steps with dense CSA attention (every visible compressed entry; spec 6.2)")
    indexer_warmup: int = _opt(0, "then steps training only the lightning indexer (its KL), before sparse "
                                  "attention")
    vocab_size: int | None = _opt(None, "BPE vocabulary (default: the preset's)")
    tokenizer: str | None = _opt(None, "a tokenizer.json, or 'deepseek-v4'")
    val_every: int = _opt(100, "steps between validations")
    val_batches: int = _opt(8, "validation batches (at most: a small split gives fewer)")
    ckpt_every: int = _opt(100, "steps between checkpoints")
    bf16: str = _opt("off", "bf16 autocast with float32 masters (auto: where the CPU has fast bf16 matmuls)",
                     choices=("auto", "on", "off"))
    threads: int | None = _opt(None, "torch intra-op threads (default: PyTorch's; dsv4 demo: as many as other "
                                     "processes leave cores free)")
    quiet: bool = _opt(False, "no progress bar")
    ep: int | None = _opt(None, "expert-parallel degree: ranks the routed experts of each layer are spread over "
                                "(divides the world size and the expert count; default gcd(world, experts))",
                          demo=False)
    dp_shard: int | None = _opt(None, "FSDP2 shard degree of the dense parameters (divides the world size; default: "
                                      "all ranks; smaller = HSDP with world/dp-shard replicas)", demo=False)
    dist_timeout: float | None = _opt(None, "seconds a collective may wait for the other ranks before the run fails "
                                            "(default: dsv4.parallel.mesh.DEFAULT_TIMEOUT_S, 1800)", demo=False)

    # -------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset_for_demo(cls, **changes: Any) -> TrainOptions:
        """The options of ``dsv4 demo``: a run of a few minutes on a shared 2-core CPU, into ``runs/demo``.

        Sized on a shared 2-core AVX2 CPU: a step of 8 x 128 tokens took 1.6-2.5 s on one thread (a third to a half
        of it Muon's Newton-Schulz iterations, a fixed cost per step), so 100 steps plus the tokenizer and shards
        (~30 s) make 3-4 minutes in all. 100 steps: the load-balance target is stated over the last 100 steps. The
        router-bias speed is 10x the report's 1e-3: at 1e-3 the routers of a run this short collapse onto two
        experts within 20 steps and stay there (busiest / mean over the last 100 steps 1.5-3.1); at 1e-2 it is
        1.06-1.25, and validation loss is lower too (6.57 against 6.68 nats per token).
        """
        demo = dict(out="runs/demo", steps=100, seq_len=128, warmup=10, bias_speed=1e-2, val_every=50,
                    ckpt_every=50)
        return cls(**{**demo, **changes})

    @classmethod
    def demo_fields(cls) -> list[str]:
        """The fields ``dsv4 demo`` takes on its command line."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("demo", True)]

    # ---------------------------------------------------------------------------------------- the command line
    @classmethod
    def from_args(cls, args: argparse.Namespace | TrainOptions, base: TrainOptions | None = None) -> TrainOptions:
        """The options of a parsed command line (other attributes, e.g. ``dsv4 demo``'s ``--prompt``, are left
        out); fields it lacks keep their values in ``base`` (default: ``TrainOptions()``)."""
        if isinstance(args, cls):
            return args
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return dataclasses.replace(base or cls(), **given)

    def validate(self) -> None:
        """Refuse, before any work, values no run can use; the messages name the options."""
        for name in ("steps", "seq_len", "batch_size", "val_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.bias_speed >= 0:  # NaN too
            raise ValueError(f"--bias-speed must be >= 0, got {self.bias_speed}")
        if not self.lr > 0:  # NaN too
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.out is None:
            raise ValueError("--out is required: the run directory")

    # ---------------------------------------------------------------------------------------------- the loop
    def train_config(self, bf16: bool) -> TrainConfig:
        """The loop's settings for these options (``bf16``: autocast on, as ``--bf16`` resolved to)."""
        from dsv4.train.loop import TrainConfig

        return TrainConfig(steps=self.steps, lr=self.lr, warmup_steps=min(self.warmup, self.steps), seed=self.seed,
                           val_every=self.val_every, ckpt_every=self.ckpt_every, autocast_bf16=bf16,
                           bias_speed=self.bias_speed, dense_steps=self.dense_steps,
                           indexer_warmup_steps=self.indexer_warmup)


def option_name(name: str) -> str:
    """The command-line spelling of a field: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> type:
    """``int`` of ``int``, ``int | None`` and ``Optional[int]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (base,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return base
    return annotation


def add_options(parser: argparse.ArgumentParser, defaults: Any | None = None,
                only: Iterable[str] | None = None) -> None:
    """One argparse option per field of the dataclass of ``defaults`` (default: ``TrainOptions()``), with that
    instance's values as the defaults; ``only``: those fields alone.

    A ``bool`` field is a flag (``store_true``; ``--no-NAME`` turns off one that defaults to True), any other
    field takes a value of its type (``int | None`` -> ``int``). A help text gets " (default: ...)" appended unless
    the default is None or the help already says it. A field with ``metadata["required"]`` is required unless
    ``defaults`` gives it a value."""
    defaults = TrainOptions() if defaults is None else defaults
    hints = typing.get_type_hints(type(defaults))
    keep = None if only is None else set(only)
    for f in dataclasses.fields(defaults):
        if keep is not None and f.name not in keep:
            continue
        kind, value, meta = _base_type(hints[f.name]), getattr(defaults, f.name), f.metadata
        help_text = meta.get("help", "")
        if kind is bool:
            action = argparse.BooleanOptionalAction if value else "store_true"
            parser.add_argument(option_name(f.name), action=action, default=value, help=help_text)
            continue
        if value is not None and "default:" not in help_text:
            help_text += " (default: %(default)s)"
        kwargs: dict[str, Any] = {"type": kind, "default": value, "help": help_text}
        if meta.get("required") and value is None:
            kwargs["required"] = True
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        parser.add_argument(option_name(f.name), **kwargs)
