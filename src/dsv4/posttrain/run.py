"""``dsv4 posttrain``: V4's post-training pipeline in miniature (spec 7), on small verifiable domains.

From one base model: a specialist per domain (SFT on the domain, then optionally GRPO with the domain's verifiable
reward), then one student distilled from all specialists by on-policy distillation (each prompt from its domain's
specialist, reverse KL over the full vocabulary on the student's own samples). Every model is scored on every
domain by greedy exact-match accuracy on held-out prompts; the JSON gives the table. Each stage shows a tqdm bar
on stderr where stderr is a terminal (none with ``--json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4.posttrain.grpo import grpo_loss, group_advantages, token_logprobs
from dsv4.posttrain.opd import opd_loss
from dsv4.posttrain.rollout import sample
from dsv4.posttrain.sft import sft_loss
from dsv4.posttrain.tasks import EOS, TASKS, VOCAB_USED, Task, task

EVAL_SEED = 12345  # held-out prompts: drawn from a generator of their own, apart from the training stream


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="reverse,sort", help=f"comma-separated domains, of {sorted(TASKS)}")
    p.add_argument("--preset", default="tiny", help="model preset of the base (default tiny)")
    p.add_argument("--config", default=None, help="config.json of a fresh base (instead of --preset)")
    p.add_argument("--base", default=None, help="start from this saved model instead of a fresh one")
    p.add_argument("--sft-steps", type=int, default=100, help="SFT steps per specialist")
    p.add_argument("--rl-steps", type=int, default=40, help="GRPO steps per specialist after SFT")
    p.add_argument("--opd-steps", type=int, default=150, help="on-policy distillation steps of the student")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per SFT step (GRPO: prompts x --group)")
    p.add_argument("--opd-batch-size", type=int, default=128,
                   help="prompts per distillation step, shared equally by the domains (the tiny preset: 100 "
                        "steps of 128 distilled more than 400 of 32, in less time)")
    p.add_argument("--teacher-weights", default=None,
                   help="comma-separated weight of each domain's teacher in the distillation loss (default: 1 each)")
    p.add_argument("--group", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of SFT and distillation")
    p.add_argument("--rl-lr", type=float, default=1e-4,
                   help="learning rate of GRPO (Muon's updates have a set size: at 1e-3 the tiny preset's reward "
                        "collapsed; at 3e-4 a sort specialist lost 5 points in one run)")
    p.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts per domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="save the specialists and the student here (HF layout)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (and no progress bars)")


def accuracy(model, t: Task, n: int) -> float:
    """Greedy exact-match accuracy of ``model`` on ``n`` held-out prompts of ``t``."""
    prompts, _ = t.sample(n, torch.Generator().manual_seed(EVAL_SEED))
    return float(t.reward(prompts, sample(model, prompts, t.answer_len, temperature=0, eos=EOS).tokens).mean())


def _optimizer(model, lr: float):
    from dsv4.train.optim import build_optimizer

    return build_optimizer(model, lr=lr, weight_decay=0.0)


def _step(opt, loss: torch.Tensor) -> float:
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_sft(model, t: Task, steps: int, batch: int, lr: float, generator: torch.Generator,
              progress: bool = False) -> list[float]:
    """SFT of ``model`` on domain ``t``; the loss of each step. ``progress``: a bar on stderr (``_progress``)."""
    model.train()
    opt = _optimizer(model, lr)
    losses = []
    with _progress(f"sft {t.name}", steps, progress) as bar:
        for _ in range(steps):
            losses.append(_step(opt, sft_loss(model, *t.sample(batch, generator))))
            _advance(bar, f"loss {losses[-1]:.3f}")
    return losses


def train_grpo(model, t: Task, steps: int, prompts: int, group: int, lr: float, generator: torch.Generator,
               progress: bool = False) -> list[float]:
    """GRPO of ``model`` on ``t``'s verifiable reward against a frozen copy of itself; the mean reward of each
    step's samples (one gradient step per batch of samples, so the sampling policy is the current one)."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    opt = _optimizer(model, lr)
    rewards = []
    with _progress(f"grpo {t.name}", steps, progress) as bar:
        for _ in range(steps):
            p, _ = t.sample(prompts, generator)
            rollout = sample(model, p.repeat_interleave(group, 0), t.answer_len, eos=EOS, generator=generator)
            r = t.reward(rollout.prompts, rollout.tokens)
            with torch.no_grad():
                ref = token_logprobs(reference, rollout)
            loss, _ = grpo_loss(model, rollout, group_advantages(r, group), ref_logprobs=ref)  # sampled by model
            _step(opt, loss)
            rewards.append(float(r.mean()))
            _advance(bar, f"reward {rewards[-1]:.3f}")
    return rewards


def train_opd(student, teachers: list, tasks: list[Task], steps: int, batch: int, lr: float,
              generator: torch.Generator, weights: list[float] | None = None,
              progress: bool = False) -> list[float]:
    """On-policy distillation of ``student`` from ``teachers[i]`` on prompts of ``tasks[i]`` (an equal share of
    each step's prompts per domain, all sampled together), teacher i's KL weighted by ``weights[i]`` (default 1);
    the loss of each step."""
    for t in teachers:
        t.eval().requires_grad_(False)
    student.train()
    opt = _optimizer(student, lr)
    share = max(1, batch // len(tasks))
    owner = torch.arange(len(tasks)).repeat_interleave(share)
    longest = max(t.answer_len for t in tasks)
    losses = []
    with _progress("distillation", steps, progress) as bar:
        for _ in range(steps):
            prompts = [p for t in tasks for p in t.sample(share, generator)[0]]
            rollout = sample(student, prompts, longest, eos=EOS, generator=generator)
            losses.append(_step(opt, opd_loss(student, teachers, rollout, owner, weights)[0]))
            _advance(bar, f"loss {losses[-1]:.3f}")
    return losses


def _progress(stage: str, steps: int, enabled: bool) -> tqdm:
    """The progress bar of one stage: tqdm on stderr, shown only when ``enabled`` and stderr is a terminal."""
    return tqdm(total=steps, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled else True)


def _advance(bar: tqdm, what: str) -> None:
    bar.set_postfix_str(what, refresh=False)
    bar.update(1)


def run(args: argparse.Namespace) -> int:
    from dsv4.config import ModelConfig
    from dsv4.model import Transformer
    from dsv4.atomic import write_atomically

    names = [n for n in args.tasks.split(",") if n]
    tasks = [task(n) for n in names]
    if not tasks:
        raise ValueError("--tasks names no domain")
    if len(set(names)) < len(names):
        raise ValueError(f"--tasks names a domain twice: {args.tasks!r}")
    weights = None
    if args.teacher_weights is not None:
        try:
            weights = [float(w) for w in args.teacher_weights.split(",")]
        except ValueError:
            raise ValueError(f"--teacher-weights must be numbers, got {args.teacher_weights!r}") from None
        if len(weights) != len(tasks) or any(not w >= 0 for w in weights):
            raise ValueError(f"--teacher-weights needs one weight >= 0 per domain ({len(tasks)}), "
                             f"got {args.teacher_weights!r}")
    for flag in ("sft_steps", "rl_steps", "opd_steps"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("batch_size", "opd_batch_size", "group", "eval_prompts"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.base and args.config:
        raise ValueError("--base and --config both name the base model; give one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.base:
        from dsv4.weights import from_pretrained

        base = from_pretrained(args.base, dtype=torch.float32)
    else:
        base = Transformer(ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset))
    if base.config.vocab_size < VOCAB_USED:
        raise ValueError(f"the base's vocabulary ({base.config.vocab_size}) is smaller than the tasks' "
                         f"{VOCAB_USED} token ids")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    def log(text: str) -> None:  # milestones: to stderr when stdout carries the JSON
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    progress = not args.json  # bars on stderr (where it is a terminal): not with --json

    models, curves, table = {}, {}, {}

    def score(name: str, model) -> None:  # every model on every domain; greedy, so no generator is drawn from
        table[name] = {t.name: accuracy(model, t, args.eval_prompts) for t in tasks}

    score("base", base)
    for t in tasks:
        spec = copy.deepcopy(base)
        curves[f"sft-{t.name}"] = train_sft(spec, t, args.sft_steps, args.batch_size, args.lr, gen, progress)
        if args.rl_steps:  # what GRPO adds shows against the same specialist before it
            score(f"specialist-{t.name} after SFT", spec)
            prompts = max(1, args.batch_size // args.group)
            curves[f"grpo-{t.name}"] = train_grpo(spec, t, args.rl_steps, prompts, args.group, args.rl_lr, gen,
                                                  progress)
        models[f"specialist-{t.name}"] = spec
        score(f"specialist-{t.name}", spec)
        log(f"specialist {t.name}: {time.time() - t0:.0f} s")
    student = copy.deepcopy(base)
    teachers = [models[f"specialist-{t.name}"] for t in tasks]
    curves["opd"] = train_opd(student, teachers, tasks, args.opd_steps, args.opd_batch_size, args.lr, gen,
                              weights, progress)
    models["student"] = student
    score("student", student)
    log(f"student: {time.time() - t0:.0f} s")
    result = {"tasks": names, "preset": None if args.base or args.config else args.preset, "base": args.base,
              "sft_steps": args.sft_steps, "rl_steps": args.rl_steps, "opd_steps": args.opd_steps,
              "batch_size": args.batch_size, "opd_batch_size": args.opd_batch_size, "group": args.group,
              "lr": args.lr, "rl_lr": args.rl_lr, "teacher_weights": weights, "seed": args.seed,
              "accuracy": table,
              "opd_loss_first": curves["opd"][0] if curves["opd"] else None,
              "opd_loss_last": curves["opd"][-1] if curves["opd"] else None,
              "seconds": time.time() - t0}
    if args.rl_steps:  # each specialist's mean sampled reward at its first and last GRPO step
        result["grpo_reward_first_last"] = {t.name: [curves[f"grpo-{t.name}"][0], curves[f"grpo-{t.name}"][-1]]
                                            for t in tasks}
    if out is not None:
        for name, m in models.items():
            m.save_pretrained(out / name)
        write_atomically(out / "posttrain.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, table)) + 2
        print(f"{'model':<{width}}" + "".join(f"{n:>10}" for n in names))
        for name, row in table.items():
            print(f"{name:<{width}}" + "".join(f"{row[n]:>10.3f}" for n in names))
    return 0
