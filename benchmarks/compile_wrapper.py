"""A compiled decoding step with inductor's C++ wrapper (the CPU's default) against the Python wrapper.

    python benchmarks/compile_wrapper.py [--preset small] [--context 4096] [--reps 6] [--steps 15]

One row of the preset at the context (caches of random entries, as ``dsv4 bench decode --fill random``), two
``DecodeStep``s of the same model compiled in one process, one per wrapper (``decode.compile_step``'s
``DSV4_CPP_WRAPPER``), then (after 3 untimed steps each) ``--reps`` rounds that alternate them, ``--steps`` steps
each from the same context (the row's length is set back after a round); per round the median step, and the median
over rounds. Both steps run the same kernels, so their logits are compared too. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--steps", type=int, default=15)
    args = p.parse_args()
    from dsv4.bench import build, filled_cache
    from dsv4.model.decode import DecodeState, DecodeStep
    from dsv4.runtime import tune_allocator

    tune_allocator()
    _, model = build(args.preset, 0, torch.float32, "cpu")
    row = filled_cache(model, args.context, torch.Generator().manual_seed(0), args.steps + 1)
    steps, compile_s = {}, {}
    for name, flag in (("python", "0"), ("cpp", "1")):
        os.environ["DSV4_CPP_WRAPPER"] = flag
        state = DecodeState(model, 1, args.context + args.steps + 1)
        step = DecodeStep(model, state, compile=True, fullgraph=True)
        if not step.compiled:
            raise SystemExit(f"the decoding step did not compile with the {name} wrapper (see the warning above)")
        state.load_row(0, row)
        steps[name], compile_s[name] = step, step.compile_seconds
    token = torch.tensor([5])
    medians = {name: [] for name in steps}
    for step in steps.values():  # first calls untimed
        for _ in range(3):
            step(token)
        step.state.lengths[0] = args.context
    for _ in range(args.reps):
        for name, step in steps.items():
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step(token)
                times.append(time.perf_counter() - t)
            step.state.lengths[0] = args.context
            medians[name].append(1e3 * statistics.median(times))
    logits = {name: step(token) for name, step in steps.items()}
    ms = {name: statistics.median(v) for name, v in medians.items()}
    print(json.dumps({"bench": "compile_wrapper", "preset": args.preset, "context": args.context,
                      "threads": torch.get_num_threads(), "ms_per_step": ms, "per_round_ms": medians,
                      "cpp_speedup": ms["python"] / ms["cpp"], "compile_seconds": compile_s,
                      "max_abs_logit_diff": float((logits["python"] - logits["cpp"]).abs().max())}))


if __name__ == "__main__":
    main()
