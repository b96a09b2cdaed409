"""The TensorBoard scalars of a training run, written with TensorBoard's own writer.

``RunEvents(out / "tb")`` wraps ``torch.utils.tensorboard.SummaryWriter`` (event files
``events.out.tfevents.*`` in that folder). ``record(metrics)`` writes one step's record of ``dsv4.train.loop``
under the tags ``train/<key>`` for the keys of ``TB_KEYS`` (finite numbers only) and
``experts/max_load_ratio_<i>`` for each learned-routing layer; ``scalar`` writes one tag. A resumed run passes
``purge_step`` (the first step it trains) so that TensorBoard drops what an earlier attempt logged from that step
on. Read them back with TensorBoard, or ``tensorboard.backend.event_processing.event_accumulator``.
"""

from __future__ import annotations

import math
from pathlib import Path

TB_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "tokens_per_s", "grad_norm", "val_loss",
           "indexer_kl", "indexer_recall")


class RunEvents:
    """The TensorBoard event files of one run (see the module docstring)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(logdir)
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def record(self, record: dict) -> None:
        """The scalars of one step's record (``record["step"]``), flushed to disk."""
        step = record["step"]
        for key in TB_KEYS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.scalar(f"train/{key}", value, step)
        for i, ratio in enumerate(record.get("max_load_ratio", [])):
            self.scalar(f"experts/max_load_ratio_{i}", ratio, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
