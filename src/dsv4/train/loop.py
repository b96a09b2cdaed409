"""The pretraining loop: the V4 recipe on packed documents (spec 4, 5, 6).

loss = CE(next token) + lambda_MTP * CE(token after next) + sum over learned-routing layers of the sequence-wise
balance loss; Muon + AdamW on a warmup-stable-decay schedule; gradient clipping; the aux-loss-free router-bias update
after every step; a non-finite loss or gradient is logged and its step skipped; periodic validation; atomic,
resumable checkpoints.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dsv4.data.packing import Batch
from dsv4.data.tokenizer import IGNORE_INDEX
from dsv4.model import Transformer
from dsv4.train.balance import expert_loads, load_imbalance, sequence_balance_loss, update_router_bias
from dsv4.train.anticipatory import AnticipatoryRouting
from dsv4.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dsv4.train.optim import build_optimizer
from dsv4.train.options import TrainOptions
from dsv4.train.schedule import WSDSchedule, mtp_weight

_OPTIONS = TrainOptions()  # the command line's defaults


class BatchSource(Protocol):
    """What the loop needs from the data side: an iterator of ``dsv4.data.Batch`` with a resumable position."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainConfig:
    """The loop's settings. Those a run is given on its command line take their defaults from
    ``dsv4.train.options.TrainOptions`` (``TrainOptions.train_config`` maps the options onto them); the others are
    the recipe's."""

    steps: int = _OPTIONS.steps
    lr: float = _OPTIONS.lr
    warmup_steps: int = _OPTIONS.warmup
    decay_fraction: float = 0.2  # last fraction of the steps: cosine decay to final_ratio * lr
    final_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_speed: float = _OPTIONS.bias_speed
    balance_alpha: float = 1e-4
    mtp_weight: float = 0.3
    mtp_weight_decay_phase: float = 0.1
    val_every: int = _OPTIONS.val_every
    ckpt_every: int = _OPTIONS.ckpt_every
    keep_checkpoints: int = 3
    autocast_bf16: bool = False
    seed: int = _OPTIONS.seed
    log_every: int = 1
    # the V4 sparse-attention schedule (spec 6.2, 6.6): dense CSA attention first, then a short indexer warm-up
    # with the rest of the model frozen, then top-k attention; the indexer learns by its KL loss throughout
    dense_steps: int = _OPTIONS.dense_steps
    indexer_warmup_steps: int = _OPTIONS.indexer_warmup
    train_indexer: bool = True
    indexer_loss_weight: float = 1.0
    # anticipatory routing after a loss spike (spec 6.5; dsv4.train.anticipatory documents the detector)
    anticipatory_routing: bool = True
    anticipatory_delay: int = 4
    anticipatory_duration: int = 50
    spike_sigma: float = 4.0

    def phase(self, step: int) -> str:
        """'dense', 'warmup' (indexer only) or 'sparse' at a step."""
        if step < self.dense_steps:
            return "dense"
        if step < self.dense_steps + self.indexer_warmup_steps:
            return "warmup"
        return "sparse"

    def schedule(self) -> WSDSchedule:
        decay = int(self.steps * self.decay_fraction)
        warm = min(self.warmup_steps, self.steps - decay)
        return WSDSchedule(peak_lr=self.lr, warmup_steps=warm, total_steps=self.steps, decay_steps=decay,
                           final_ratio=self.final_ratio)


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    skipped: bool
    loads: list[torch.Tensor] = field(default_factory=list)
    phase: str = "sparse"
    indexer_kl: float = float("nan")
    indexer_recall: float = float("nan")


def shifted_targets(batch: Batch, k: int) -> torch.Tensor:
    """[B, T - k + 1] targets k tokens ahead of each input, IGNORE_INDEX where that token is in another segment."""
    tokens, docs = batch.tokens, batch.doc_ids
    same = docs[:, k:] == docs[:, :docs.shape[1] - k]
    return torch.where(same, tokens[:, k:], IGNORE_INDEX)


def _token_mean(logits: torch.Tensor, target: torch.Tensor, total: Callable | None) -> torch.Tensor:
    """Mean CE over the targets that are not IGNORE_INDEX; with ``total``, this rank's share of the global mean."""
    if total is None:
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / total((target != IGNORE_INDEX).sum())


@dataclass
class Losses:
    """The losses of one batch; unpacks as (lm, mtp, balance, loads)."""

    lm: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor
    loads: list[torch.Tensor]
    indexer_kl: torch.Tensor | None = None  # with indexer training on: sum over CSA layers of the mean KL
    indexer_recall: float = float("nan")

    def __iter__(self):
        return iter((self.lm, self.mtp, self.balance, self.loads))


def lm_losses(model: Transformer, batch: Batch, alpha: float, total: Callable | None = None) -> Losses:
    """(next-token CE, MTP CE, balance loss, expert loads of the learned-routing layers) of one packed batch, plus
    the indexer's KL loss and recall when its training is on (``Transformer.set_indexer_phase``).

    No loss crosses a document: targets in another segment than their input are ignored (``dsv4.data.packing``).
    ``total`` (data parallel, ``dsv4.parallel.trainer``) sums a count over all ranks: each loss is then this rank's
    share of the mean over the global batch (token counts and sequence counts of all ranks), so that the shares of
    all ranks add up to the loss one process computes on the whole global batch.
    """
    inputs = batch.inputs
    out = model.forward_train(inputs, batch.input_doc_ids)
    lm = _token_mean(out.logits, shifted_targets(batch, 1), total)
    mtp = torch.zeros((), device=inputs.device)
    for k, logits in enumerate(out.mtp_logits, start=1):
        target = shifted_targets(batch, 1 + k)[:, :logits.shape[1]]
        valid = (target != IGNORE_INDEX).sum()
        if (valid if total is None else total(valid)) > 0:
            mtp = mtp + _token_mean(logits, target, total) / len(out.mtp_logits)
    balance = torch.zeros((), device=inputs.device)
    loads = []
    layers = list(model.layers) + list(model.mtp)
    share = 1.0  # with total: this rank's sequences over all ranks' (the balance loss is a mean over sequences)
    if total is not None:
        share = inputs.shape[0] / float(total(torch.tensor(inputs.shape[0], device=inputs.device)))
    for layer, route in zip(layers, out.routes):
        if layer.ffn.gate.hashed:
            continue
        balance = balance + sequence_balance_loss(route, inputs.shape[0], alpha) * share
        loads.append(expert_loads(route, model.config.n_routed_experts))
    kl = out.indexer_kl
    if total is not None and kl is not None:  # with total: each CSA layer's KL sum over all ranks' query count
        stats = out.indexer_stats
        counts = total(torch.tensor([st.kl_count for st in stats], device=inputs.device)).tolist()
        kl = sum(st.kl_sum / max(int(c), 1) for st, c in zip(stats, counts))
    return Losses(lm, mtp, balance, loads, kl, out.indexer_recall)


def learned_routers(model: Transformer) -> list:
    return [layer.ffn.gate for layer in list(model.layers) + list(model.mtp) if not layer.ffn.gate.hashed]


@torch.no_grad()
def validation_loss(model: Transformer, batches: Iterable[Batch], token_bytes: torch.Tensor | None = None
             ) -> tuple[float, float]:
    """(nats per token, bits per byte) of next-token prediction over ``batches``; bits per byte needs the byte
    length of every token id (``Tokenizer.token_bytes()``), else NaN."""
    was_training = model.training
    model.eval()
    nats, count, nbytes = 0.0, 0, 0
    for batch in batches:
        logits = model(batch.inputs, doc_ids=batch.input_doc_ids)
        targets = shifted_targets(batch, 1)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none")
        keep = targets.flatten() != IGNORE_INDEX
        nats += float(losses[keep].sum())
        count += int(keep.sum())
        if token_bytes is not None:
            nbytes += int(token_bytes[targets.flatten()[keep]].sum())
    model.train(was_training)
    if count == 0:
        return float("nan"), float("nan")
    bpb = nats / math.log(2) / nbytes if nbytes else float("nan")
    return nats / count, bpb


def strict_json(record: dict) -> dict:
    """NaN and infinities -> null, so that every line of metrics.jsonl is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class Trainer:
    def __init__(self, model: Transformer, data: BatchSource, cfg: TrainConfig, out: str | Path,
                 val_batches: Iterable[dict] = (), log: Callable[[dict], None] | None = None):
        self.model = model
        self.data = data
        self.cfg = cfg
        self.out = Path(out)
        self.val_batches = list(val_batches)
        self.schedule = cfg.schedule()
        self.optimizer = self.make_optimizer()
        self.step = 0
        self.skipped = 0
        self.log = log or (lambda record: None)
        self.metrics_path = self.out / "metrics.jsonl"
        routers = learned_routers(model)
        self.anticipatory = AnticipatoryRouting(routers, cfg.anticipatory_delay, cfg.anticipatory_duration,
                                                sigma=cfg.spike_sigma) if cfg.anticipatory_routing and routers else None

    # --------------------------------------------------- hooks (dsv4.parallel.DistributedTrainer overrides them)
    def make_optimizer(self):
        return build_optimizer(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def losses(self, batch: Batch) -> Losses:
        return lm_losses(self.model, batch, self.cfg.balance_alpha)

    def clip_gradients(self) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)

    def global_metrics(self, loss, lm, mtp, balance, loads):
        """Values of this process -> values of the whole global batch (identity in one process)."""
        return loss, lm, mtp, balance, loads

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        model, cfg = self.model, self.cfg
        model.train()
        batch = next(self.data)
        lr = self.schedule.lr(self.step)
        self.optimizer.set_lr(lr)
        lam = mtp_weight(self.step, self.schedule, cfg.mtp_weight, cfg.mtp_weight_decay_phase)
        phase = cfg.phase(self.step)
        model.set_indexer_phase(sparse=phase == "sparse", train_indexer=cfg.train_indexer)
        if self.anticipatory is not None:
            self.anticipatory.before_step()
        with torch.autocast(batch.tokens.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            losses = self.losses(batch)
        lm, mtp, balance, loads = losses
        kl = losses.indexer_kl
        if phase == "warmup":  # the indexer alone learns: its KL reaches nothing else (its inputs are detached)
            if kl is None:
                raise ValueError("an indexer warm-up needs CSA layers and train_indexer=True")
            loss = cfg.indexer_loss_weight * kl
        else:
            loss = lm + lam * mtp + balance
            if kl is not None:
                loss = loss + cfg.indexer_loss_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.clip_gradients()
        loss, lm, mtp, balance, seen = self.global_metrics(loss, lm, mtp, balance, loads)
        skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
        if self.anticipatory is not None:
            if phase != cfg.phase(max(self.step - 1, 0)):
                self.anticipatory.reset_history()
            lm_value = float(lm.detach())
            if phase != "warmup" and self.anticipatory.after_step(lm_value):
                tqdm.write(f"step {self.step + 1}: loss spike ({lm_value:.4g}): anticipatory routing for "
                           f"{cfg.anticipatory_duration} steps", file=sys.stderr)
        if skipped:  # a loss spike gone non-finite: log it and leave the weights as they were
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            if phase != "warmup":
                update_router_bias(learned_routers(model), loads, cfg.bias_speed)
        self.step += 1
        return StepResult(loss.item(), lm.item(), mtp.item(), balance.item(), grad_norm.item(), skipped, seen,
                          phase, float(kl.detach()) if kl is not None else float("nan"), losses.indexer_recall)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token cross-entropy (nats per token) over the validation batches."""
        return validation_loss(self.model, self.val_batches)[0]

    # -------------------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict:
        extra = {"anticipatory": self.anticipatory.state_dict()} if self.anticipatory is not None else {}
        return {**extra, "step": self.step, "skipped": self.skipped, "optimizer": self.optimizer.state_dict(),
                "data": self.data.state_dict(), "rng": torch.get_rng_state()}

    def checkpoint_meta(self) -> dict:
        from dsv4.train.qat import fp4_qat_enabled

        return {"train_config": asdict(self.cfg), "model_config": self.model.config.to_dict(),
                "phase": self.cfg.phase(self.step), "stage": getattr(self.data, "stage", None),
                "seq_len": getattr(self.data, "seq_len", None), "fp4_qat": fp4_qat_enabled(self.model)}

    def save(self) -> Path:
        return save_checkpoint(self.out / "checkpoints", self.step, self.model, self.trainer_state(),
                               self.checkpoint_meta(), keep=self.cfg.keep_checkpoints)

    def resume(self, path: str | Path | None = None) -> int:
        path = Path(path) if path is not None else latest_checkpoint(self.out / "checkpoints")
        state, _ = load_checkpoint(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        if self.anticipatory is not None and "anticipatory" in state:
            self.anticipatory.load_state_dict(state["anticipatory"])
        return self.step

    # ------------------------------------------------------------------------------------------------- the run
    def run(self, tokens_per_step: int, progress: bool = True) -> dict:
        """Train from ``self.step`` to ``cfg.steps``: each step's record to ``metrics.jsonl`` and ``self.log``,
        validation and checkpoints at their intervals and at the end. ``progress``: a tqdm bar on stderr, shown only
        where stderr is a terminal. Returns the run's summary."""
        self.out.mkdir(parents=True, exist_ok=True)
        window = []
        last = {}
        t0 = time.perf_counter()
        tokens_done = 0
        val_loss = float("nan")
        bar = tqdm(total=self.cfg.steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=None if progress else True)
        try:
            while self.step < self.cfg.steps:
                ts = time.perf_counter()
                r = self.train_step()
                dt = time.perf_counter() - ts
                tokens_done += tokens_per_step
                window.append(tokens_per_step / dt)
                window = window[-20:]
                tps = sum(window) / len(window)
                imbalance = [load_imbalance(x) for x in r.loads]
                last = {"step": self.step, "loss": r.loss, "lm_loss": r.lm_loss, "mtp_loss": r.mtp_loss,
                        "balance_loss": r.balance_loss, "grad_norm": r.grad_norm,
                        "lr": self.schedule.lr(self.step - 1), "tokens_per_s": tps, "skipped": r.skipped,
                        "max_load_ratio": imbalance, "phase": r.phase, "indexer_kl": r.indexer_kl,
                        "indexer_recall": r.indexer_recall,
                        "anticipatory_routing": bool(self.anticipatory is not None and self.anticipatory.active),
                        "expert_loads": [x.tolist() for x in r.loads]}
                if r.skipped:
                    tqdm.write(f"step {self.step}: non-finite loss or gradient, step skipped", file=sys.stderr)
                if self.cfg.val_every and (self.step % self.cfg.val_every == 0 or self.step == self.cfg.steps):
                    val_loss = self.validate()
                    last["val_loss"] = val_loss
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(strict_json(last)) + "\n")
                self.log(last)
                bar.set_postfix_str(f"loss {r.loss:.3f} lr {last['lr']:.2e} {tps:,.0f} tok/s"
                                    + (f" val {val_loss:.3f}" if not math.isnan(val_loss) else ""), refresh=False)
                bar.update(1)
                if self.cfg.ckpt_every and (self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps):
                    self.save()
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        return {"steps": self.step, "final_loss": last.get("loss"), "val_loss": val_loss,
                "tokens_per_s": tokens_done / elapsed if elapsed > 0 else 0.0, "skipped_steps": self.skipped}
