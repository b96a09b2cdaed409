"""Speculative decoding with the MTP block against plain decoding, on a trained model.

    python benchmarks/speculative.py [--model runs/demo/model] [--tokens 200] [--runs 3] [--threads N] [--compile]
                                     [--save]

The model defaults to the one `make demo` trains (the tiny preset on the stdlib, about 4 minutes; the script runs
`dsv4 demo` first if it is missing). For temperature 0 and 0.8, the same prompt is continued by ``stream`` and by
``speculative_stream`` in alternating runs with the same seed, and one JSON object gives per temperature the median
tokens/s of each, their ratio, the share of drafts kept, the tokens per call of the model, and (temperature 0)
whether the two outputs are the same tokens, as they must be.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # imported by tests too, not only run as a script
from run_all import report_experiment  # noqa: E402

PROMPT = "def main(argv):\n    "


def measure(model, ids, tokens: int, temperature: float, runs: int, seed: int = 0, compile: bool = False) -> dict:
    """Alternating runs of plain and speculative decoding of ``tokens`` tokens; medians and the draft counts.
    ``compile``: both with their compiled steps (``stream(compile=True)``, ``speculative_stream(compile=True)``),
    after one untimed run of each that compiles them (inductor's cache serves the timed runs' own compilation)."""
    from dsv4.generate import speculative_stream, stream

    plain_s, spec_s, stats, same, info = [], [], {}, True, {"plain": {}, "speculative": {}}

    def run_plain():
        return [int(x) for x in stream(model, ids, tokens, temperature=temperature, top_p=1.0, seed=seed,
                                       compile=compile, info=info["plain"])]

    def run_spec():
        return [int(x) for x in speculative_stream(model, ids, tokens, temperature=temperature, top_p=1.0, seed=seed,
                                                   stats=stats, compile=compile, info=info["speculative"])]

    compile_s = {}
    if compile:
        for name, fn in (("plain", run_plain), ("speculative", run_spec)):
            t = time.perf_counter()
            fn()
            compile_s[name] = time.perf_counter() - t
    for _ in range(runs):
        t = time.perf_counter()
        plain = run_plain()
        plain_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        spec = run_spec()
        spec_s.append(time.perf_counter() - t)
        same = same and plain == spec
    plain_tps, spec_tps = len(plain) / statistics.median(plain_s), len(spec) / statistics.median(spec_s)
    out = {"temperature": temperature, "tokens": len(spec), "plain_tokens_per_s": plain_tps,
           "speculative_tokens_per_s": spec_tps, "speedup": spec_tps / plain_tps, "drafts": stats["drafts"],
           "accepted": stats["accepted"], "acceptance": stats["accepted"] / max(stats["drafts"], 1),
           "tokens_per_call": (len(spec) - 1) / max(stats["calls"], 1)}
    if temperature == 0:
        out["greedy_identical"] = same
    if compile:
        out["first_run_seconds"] = compile_s  # compiling included
        out["compiled"] = {k: v.get("compile_seconds") is not None for k, v in info.items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/demo/model")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="both with their compiled steps (the serving engine's; one untimed run of each compiles)")
    p.add_argument("--save", action="store_true", help="also write the JSON to benchmarks/results/")
    args = p.parse_args()
    if args.tokens < 2 or args.runs < 1:
        p.error("--tokens must be >= 2 and --runs >= 1")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        if model_dir != Path("runs/demo/model"):
            p.error(f"--model {model_dir}: no config.json there")
        subprocess.run([sys.executable, "-m", "dsv4", "demo"], check=True, stdout=subprocess.DEVNULL)

    import torch

    import dsv4
    from dsv4.data import load_tokenizer
    from dsv4.runtime import tune_allocator

    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = dsv4.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    ids = torch.tensor([tokenizer.encode(PROMPT, bos=tokenizer.bos_id is not None)])
    result = {"experiment": "speculative", "command": " ".join(["python", "benchmarks/speculative.py"] + sys.argv[1:]),
              "model": str(model_dir), "prompt": PROMPT, "threads": torch.get_num_threads(),
              "compile": args.compile,
              "per_temperature": [measure(model, ids, args.tokens, t, args.runs, compile=args.compile)
                                  for t in (0.0, 0.8)]}
    report_experiment(result, "speculative", args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
