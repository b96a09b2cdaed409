"""V4's post-training in miniature: specialists, then one student distilled from them on its own samples.

    python benchmarks/posttrain.py [--save] [-- dsv4 posttrain flags ...]

Runs `dsv4 posttrain --json` (by default: the tiny preset from scratch, specialists for `reverse` and `sort` by 100
SFT steps then 40 GRPO steps, a student by 150 on-policy distillation steps of 128 prompts; about 7 minutes on two
cores) and prints its JSON; with ``--save`` it also goes to benchmarks/results/, from which `run_all.py --docs`
writes the table: each model's greedy exact-match accuracy on held-out prompts of every domain.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import report_experiment  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--save", action="store_true", help="also write the JSON to benchmarks/results/")
    p.add_argument("flags", nargs="*", help="flags passed on to dsv4 posttrain (after --)")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "dsv4", "posttrain", "--json", *args.flags]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        return done.returncode
    result = json.loads(done.stdout)
    command = "python benchmarks/posttrain.py --save" + (" -- " + " ".join(args.flags) if args.flags else "")
    report_experiment(dict(result, experiment="posttrain", command=command), "posttrain", args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
