"""Speculative decoding with the MTP block against plain decoding, on a trained model.

    python benchmarks/speculative.py [--model runs/demo/model] [--tokens 200] [--runs 3] [--threads N] [--compile]
                                     [--parts] [--save]
    python benchmarks/speculative.py --preset small [--context 1024] [--threads N] [--save]

The model defaults to the one `make demo` trains (the tiny preset on the stdlib, about 4 minutes; the script runs
`dsv4 demo` first if it is missing). For temperature 0 and 0.8, the same prompt is continued by ``stream`` and by
``speculative_stream`` in alternating runs with the same seed, and one JSON object gives per temperature the median
tokens/s of each, their ratio, the share of drafts kept, the tokens per call of the model, and (temperature 0)
whether the two outputs are the same tokens, as they must be.

``--parts`` (and ``--preset``, on a model of random weights, which has no acceptance to measure) times the compiled
parts of one call on one row, in one process: the plain step (one token), the speculative check (the last token
and the draft) and the MTP block's draft, and gives the tokens a speculative call must yield to be as fast as plain
decoding: (check + draft) / step, the loops' own work aside. Speculative decoding pays where the check costs about
one step (a step bound by reading weights and cache, which a second token reads again for free), not where each
token costs its own work.
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


def parts(model, context: int, repeats: int = 200, seed: int = 0, compile: bool = True) -> dict:
    """The compiled parts of a call (eager ones without ``compile``) on one row holding ``context`` tokens of random
    ids (prefilled; the MTP block has read them too), each timed ``repeats`` times at that position (its length set
    back after each call): medians in ms of the plain step, the two-token check and the MTP block's draft, and
    ``break_even_tokens_per_call`` = (check + draft) / step."""
    import torch

    from dsv4.model.decode import DecodeState, DecodeStep, capacity_bucket
    from dsv4.model.speculative import SpeculativeStep

    capacity = capacity_bucket(context + 2, model.config.max_position_embeddings)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        spec_state, plain_state = DecodeState(model, 1, capacity, mtp=True), DecodeState(model, 1, capacity)
        spec = SpeculativeStep(model, spec_state, compile=compile)
        step = DecodeStep(model, plain_state, compile=compile)
        cache, mtp_cache = model.new_cache(1), model.mtp[0].attn.new_cache()
        streams, _ = model.hidden_streams(ids, cache)
        model.mtp[0].predict(streams[:, :-1], model.embed(ids[:, 1:]), torch.arange(context - 1), mtp_cache)
        spec_state.load_row(0, cache, mtp=(mtp_cache, 0))
        plain_state.load_row(0, cache)
        one, two = ids[0, -1:], ids[:, -2:]
        positions = torch.tensor([[context, context + 1]])

        def median_ms(call, state) -> float:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
                state.lengths[0] = context
            return statistics.median(times) * 1e3

        streams, _ = spec.verify(two)
        spec_state.lengths[0] = context
        out = {"context": context, "plain_step_ms": median_ms(lambda: step(one), plain_state),
               "check_ms": median_ms(lambda: spec.verify(two), spec_state),
               "draft_ms": median_ms(lambda: spec.draft(streams, two, positions), spec_state),
               "direct": {"plain": step.direct, **spec.direct}}
    out["break_even_tokens_per_call"] = (out["check_ms"] + out["draft_ms"]) / out["plain_step_ms"]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/demo/model")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="both with their compiled steps (the serving engine's; one untimed run of each compiles)")
    p.add_argument("--parts", action="store_true",
                   help="also time the compiled parts of one call (plain step, check, draft) at the prompt's length "
                        "plus half the tokens, and the tokens per call at which speculation breaks even")
    p.add_argument("--preset", default=None,
                   help="only the parts, on a model of this preset with random weights (no acceptance to measure)")
    p.add_argument("--context", type=int, default=1024, help="with --preset: the row's tokens before the call")
    p.add_argument("--save", action="store_true", help="also write the JSON to benchmarks/results/")
    args = p.parse_args()
    if args.tokens < 2 or args.runs < 1 or args.context < 2:
        p.error("--tokens and --context must be >= 2 and --runs >= 1")
    if args.preset is not None:
        return preset_parts(args)
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
    if args.parts:
        result["parts"] = parts(model, ids.shape[1] + args.tokens // 2)
    report_experiment(result, "speculative", args.save)
    return 0


def preset_parts(args) -> int:
    """``--preset``: the parts alone, on a model of random weights."""
    import torch

    from dsv4.bench import build
    from dsv4.runtime import tune_allocator

    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    config, model = build(args.preset, 0, torch.float32)
    if not config.num_nextn_predict_layers:
        raise SystemExit(f"--preset {args.preset}: its models have no MTP block to draft with")
    result = {"experiment": "speculative_parts", "command": " ".join(["python", "benchmarks/speculative.py"]
                                                                     + sys.argv[1:]),
              "preset": args.preset, "threads": torch.get_num_threads(), "parts": parts(model, args.context)}
    report_experiment(result, "speculative_parts", args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
