"""``dsv4 lab``: run one of the report's claims at small scale, or write ``docs/claims.md`` from saved results.

    dsv4 lab NAME [--quick] [--json] [--out DIR] [--save] [--seed S] [--threads T]
    dsv4 lab --list
    dsv4 lab --docs

A run prints its figures and verdict (with ``--json``: exactly one JSON object on stdout, progress on stderr),
draws its plots and writes its JSON into ``--out`` (default ``runs/lab``), and with ``--save`` also writes the JSON
to ``benchmarks/results/lab-NAME-<time>.json``. ``--docs`` regenerates ``docs/claims.md`` and its plots from the
newest saved result of every lab.
"""

from __future__ import annotations

import argparse
import json
import sys

from dsv4.lab import LABS, lab_module


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="NAME", help=f"the lab: {', '.join(LABS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (what the tests run)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--out", default="runs/lab", help="folder for plots, the JSON and the prepared data "
                                                     "(default: %(default)s)")
    p.add_argument("--save", action="store_true", help="also write the JSON to benchmarks/results/")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the lab's; 1 for the training labs, whose models are so "
                        "small that a second thread costs more than it brings on a busy CPU)")
    p.add_argument("--list", action="store_true", help="list the labs and their thresholds")
    p.add_argument("--docs", action="store_true", help="write docs/claims.md from the saved results")


def run(args: argparse.Namespace) -> int:
    from dsv4.lab.common import LabOptions, run_lab

    if args.list:
        for name in LABS:
            module = lab_module(name)
            print(f"{name}: {module.TITLE}\n    holds if {module.THRESHOLD}")
        return 0
    if args.docs:
        from dsv4.lab.docs import write_claims

        print(f"wrote {write_claims()}", file=sys.stderr)
        return 0
    if args.name is None:
        raise ValueError(f"name a lab ({', '.join(LABS)}), or pass --list or --docs")
    lab_module(args.name)  # an unknown name fails here, before any work
    options = LabOptions(quick=args.quick, out=args.out, save=args.save, json=args.json, seed=args.seed,
                         threads=args.threads)
    result = run_lab(args.name, options)
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            print(f"{key}: {value}")
    print(f"(the whole result, curves included: {options.out / (args.name + '.json')})")
    return 0
