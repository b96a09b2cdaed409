"""``dsv4 lab distill``: do specialists merge into one model by on-policy distillation?

The lab form of ``dsv4 posttrain`` (``benchmarks/posttrain.py``; its full run is in ``docs/benchmarks.md``): from one
base model (the tiny preset), a specialist per domain (``reverse``, ``sort``: SFT, then GRPO on the verifiable
reward), then one student distilled from both on its own samples (reverse KL over the full vocabulary). Every model
is scored by greedy exact-match accuracy on held-out prompts of every domain. ``--quick``: a few steps of each
stage and a few prompts, the pipeline end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

from dsv4.lab.common import LabOptions, verdict

THREADS = 1  # the tiny preset: a second thread costs more than it brings on a busy CPU
TITLE = "specialists merge into one model by on-policy distillation"
SPEC = ("\"On-policy distillation (OPD) replaces V3.2's mixed-RL stage: L_OPD(theta) = sum_i w_i . KL(pi_theta || "
        "pi_E_i) - reverse KL, trajectories sampled from the student, full-vocabulary KL at every token position\" "
        "(docs/spec.md, section 7)")
THRESHOLD = "the distilled student reaches at least 0.9x each specialist's accuracy on that specialist's own domain"
TASKS = ("reverse", "sort")


def flags(quick: bool) -> list[str]:
    if quick:
        return ["--sft-steps", "2", "--rl-steps", "1", "--opd-steps", "2", "--batch-size", "4",
                "--opd-batch-size", "4", "--group", "2", "--eval-prompts", "4"]
    return []  # dsv4 posttrain's defaults: 100 SFT, 40 GRPO, 150 distillation steps


def run(options: LabOptions) -> dict:
    from dsv4.posttrain import run as posttrain

    parser = argparse.ArgumentParser()
    posttrain.add_arguments(parser)
    args = parser.parse_args(["--tasks", ",".join(TASKS), "--json", "--seed", str(options.seed),
                              *flags(options.quick)])
    options.log(f"distill lab: dsv4 posttrain {' '.join(flags(options.quick)) or '(defaults)'} ...")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        posttrain.run(args)
    result = json.loads(out.getvalue())
    acc = result["accuracy"]
    kept = {t: (acc["student"][t] / acc[f"specialist-{t}"][t] if acc[f"specialist-{t}"][t] else None)
            for t in TASKS}
    holds = all(k is not None and k >= 0.9 for k in kept.values())
    why = "; ".join(f"{t}: student {acc['student'][t]:.3f} against its specialist's {acc[f'specialist-{t}'][t]:.3f}"
                    + (f" ({kept[t]:.2f}x)" if kept[t] is not None else " (the specialist solves none)")
                    for t in TASKS) + f" ({'every one' if holds else 'not every one'} at least 0.9x)"
    return {"tasks": list(TASKS), "sft_steps": result["sft_steps"], "rl_steps": result["rl_steps"],
            "opd_steps": result["opd_steps"],
            **{f"specialist_{t}_accuracy": acc[f"specialist-{t}"][t] for t in TASKS},
            **{f"student_{t}_accuracy": acc["student"][t] for t in TASKS},
            **{f"student_over_specialist_{t}": kept[t] for t in TASKS},
            **verdict(holds, why), "accuracy": acc, "opd_loss_first": result["opd_loss_first"],
            "opd_loss_last": result["opd_loss_last"]}
