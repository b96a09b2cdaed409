"""Run the benchmarks and regenerate docs/benchmarks.md and its plots from their JSON; no figure is typed by hand.

    python benchmarks/run_all.py            # run everything listed in PLAN (long on a 2-core CPU), then write docs
    python benchmarks/run_all.py --quick    # small contexts only, minutes
    python benchmarks/run_all.py --docs     # only rewrite docs/benchmarks.md + plots from benchmarks/results/
    python benchmarks/run_all.py --only "decode"   # only the plan's commands containing this text, then docs
    python benchmarks/run_all.py --gpu      # the GPU plan (see benchmarks/gpu.sh, which runs it on a lent GPU)
    python benchmarks/run_all.py --sweep    # the plot's curves: decode 4K to 1M, prefill 4K to 131K (about an hour)

Each measurement runs as its own process (``python -m dsv4 bench ... --json``) so that its peak RSS is its own.
Results go to ``benchmarks/results/<machine>.jsonl``, one JSON object per line, with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"

PLAN = [
    ["prefill", "--preset", "small", "--context", "4096"],
    ["prefill", "--preset", "small", "--context", "4096", "--threads", "1"],
    ["prefill", "--preset", "small", "--context", "32768", "--repeats", "2"],
    ["prefill", "--preset", "small", "--context", "32768", "--repeats", "1", "--threads", "1"],
    ["prefill", "--preset", "small", "--context", "131072", "--repeats", "1", "--no-dense"],
    ["decode", "--preset", "small", "--context", "131072", "--repeats", "1"],
    ["decode", "--preset", "small", "--context", "131072", "--repeats", "1", "--batch-size", "16"],
    ["decode", "--preset", "small", "--context", "131072", "--repeats", "1", "--compile"],
    ["decode", "--preset", "small", "--context", "4096", "--tokens", "16", "--compile"],
    ["train", "--preset", "small", "--context", "2048", "--batch-size", "2", "--steps", "2"],
    ["serve", "--preset", "small"],
]
# the same benchmarks on a GPU (benchmarks/gpu.sh runs them on a lent machine); no transformers comparison there
GPU_PLAN = [
    ["prefill", "--preset", "small", "--context", "4096", "--device", "cuda", "--no-hf"],
    ["prefill", "--preset", "small", "--context", "32768", "--device", "cuda"],
    ["prefill", "--preset", "small", "--context", "131072", "--repeats", "1", "--device", "cuda"],
    ["decode", "--preset", "small", "--context", "131072", "--repeats", "1", "--device", "cuda"],
    ["decode", "--preset", "small", "--context", "131072", "--repeats", "1", "--batch-size", "16", "--device", "cuda"],
    ["train", "--preset", "small", "--context", "2048", "--batch-size", "2", "--steps", "3", "--device", "cuda"],
    # the compiled decoding step as CUDA graphs, against dense decoding compiled the same way; last: the slowest to
    # compile, so that a timeout loses only it
    ["decode", "--preset", "small", "--context", "131072", "--tokens", "16", "--fill", "random", "--compile",
     "--no-4k", "--device", "cuda"],
]
# the curves of docs/bench-<machine>.png. Decode at 4K to 1M from V4 caches of random entries of the right shapes and
# bytes (--fill random: seconds to fill where a 1M prefill takes over half an hour), eager and compiled, V4 and dense,
# one process per context; each compiles two steps (V4 and dense, of capacity context + tokens: a compiled step's
# attention runs over all its capacity's entry slots, so a shared bigger bucket would time a longer context). The last
# context is 1M less the decoded tokens (max_position_embeddings is 1M). Prefill at 4K to 131K, dense to 32K; 4K, 32K
# and 131K as PLAN runs them, so that their runs count together.
SWEEP_TOKENS = 16
SWEEP_CONTEXTS = [4096, 16384, 65536, 131072, 524288, (1 << 20) - SWEEP_TOKENS]
SWEEP = [["decode", "--preset", "small", "--context", str(n), "--tokens", str(SWEEP_TOKENS), "--fill", "random",
          "--compile", "--no-4k"] for n in SWEEP_CONTEXTS] + [
    ["prefill", "--preset", "small", "--context", "4096"],
    ["prefill", "--preset", "small", "--context", "16384", "--repeats", "2"],
    ["prefill", "--preset", "small", "--context", "32768", "--repeats", "2"],
    ["prefill", "--preset", "small", "--context", "131072", "--repeats", "1", "--no-dense"],
]
QUICK = [
    ["prefill", "--preset", "small", "--context", "2048", "--repeats", "1"],
    ["prefill", "--preset", "small", "--context", "8192", "--repeats", "1", "--no-hf"],
    ["decode", "--preset", "small", "--context", "8192", "--repeats", "1", "--tokens", "4"],
    ["train", "--preset", "tiny", "--context", "256", "--batch-size", "4"],
]


COMPILED_NOTE = """`dsv4 bench decode --compile`: the compiled decoding step (`dsv4.model.decode.DecodeStep`, one
graph, on a decode state of capacity context + tokens, as `dsv4 generate --compile` and `dsv4 serve` run it) and
dense decoding compiled the same way (`bench_baselines.DenseDecodeState`), their steps alternating with the eager
ones in one process. Compile s: compiling and warming up, with whatever inductor's cache held. Rows before commit
2e38744: at one row the compiled step ran all routed experts (the MoE's static form), the eager one only the picked
ones; since, a step of few rows gathers each token's own experts."""

DECODE_NOTE = """Medians of the command's `--tokens` steps (32 unless it names another); a step decodes one
token for each of the batch's rows (ms/token: the step's time). The steps of V4 at the context, V4 at 4K
(unless `--no-4k`) and dense alternate, so that a drift of the machine's speed weighs on both sides of each
ratio. Fill: V4's cache after a real prefill of the context, or (`--fill random`) filled with random entries
of the same shapes and bytes (window rings, compressed entries, indexer keys, incomplete blocks); the
dense baseline's cache is random in both. Runs: how many runs of the command at its
newest commit; the row is their median by speedup (of two, the lower). Predicted ratio: the cost
model's FLOPs per token at the context over those at 4K. Roofline: the step's parameter matmuls
and its attention, each at the longer of its FLOPs at the matmul peak and its bytes read (weights
and the experts the rows touch; each row's cache) at the copy bandwidth, both measured in the
run: what the step would cost without per-op overhead. Dense decoding folds the query heads into
queries of its one K=V head, so SDPA reads each key once per step (not once per head)."""

SPECULATIVE_NOTE = """The model that `make demo` trains (tiny preset), continuing one prompt by plain decoding and
by `speculative_stream` (the MTP block drafts one token, the model checks it with the pending
ones in one call) in alternating runs; medians. Kept: drafts that passed speculative sampling's
test. Compiled (`--compile`): both decode with their compiled steps (`stream(compile=True)`, and
`SpeculativeStep`: the last token and the draft in one call, a rejected draft rolled back), after
one untimed run of each. Repeated runs on the 2-core machine spread by about 0.15 in speedup.
Eager, and compiled before commit 2e38744 (when a compiled step of few rows ran every routed
expert), speculative decoding was level with plain decoding (0.71-1.08x). Since, compiled and
greedy it was faster: 1.11x saved at 4779534, 1.23x and 1.22x in two more runs of `--runs 5` (0.96x in
one run while other jobs were paused around it); sampled at temperature 0.8, 0.94-1.12x. Since commit f06744c the
plain compiled step is called without dynamo (about 5x faster on this model), and since 490caa3 both speculative
parts are too: speculative decoding is then 0.6-0.7x of plain, its two-token check costing about twice a
one-token step on a model whose weights stay in cache. At a1bb71b the check's products of two rows are fused into
inductor's kernels (0.73 against 0.90 ms in one process) and a mark is one batched copy: 0.69x (greedy) and 0.62x
(0.8), within the machine's spread; the parts below say why it cannot reach 1x."""


SPECULATIVE_PARTS_NOTE = """`benchmarks/speculative.py --parts` (the trained model, at the prompt plus half the
tokens) and `--preset` (random weights): the compiled parts of one call on one row, timed in one process.
Break-even: the tokens a speculative call must yield to be as fast as plain decoding, (check + draft) / step, the
loops' own work aside. One draft a call yields at most 2 tokens: where the break-even is above 2, as on this CPU for
the demo model and the small preset, no MTP block however accurate makes one-token speculation pay (the loops
aside). The check costs 1.5-1.8 steps: the demo model's step is bound by its operators' own overheads (a few tens
of microseconds of arithmetic in a 0.5 ms step), which a second token adds to again, and the small preset's routed
experts and per-token work double with the tokens while its other weights are read once. Speculation pays only
where a second token costs little next to a step: a step bound by reading weights and cache, which these models on
this CPU are not."""


SERVE_NOTE = """Live `dsv4 serve` processes on localhost, driven by HTTP clients of the same script (random
weights: speed, not text). Concurrent: 16 clients at once, prompts of 256 to 1,024 tokens, 256
output tokens each (EOS ignored), against the same requests one at a time on a server that
decodes one row (the 16-row server compiles its decoding step, dsv4 serve's default there; the
one-row servers decode eager, their faster form). Agent: one session whose every turn resends the conversation plus a tool result
of about 400 tokens, to 32K tokens; TTFT is the mean over every 8th turn and the last, against the
same turns on a server without the prefix cache; after restart: the next turn on a new server over
the same --kv-cache-dir, against that turn served cold."""


def machine_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return "gpu-" + torch.cuda.get_device_name(0).replace(" ", "-").lower()
    except ImportError:
        pass
    return f"cpu-{platform.machine()}"


def commit() -> str | None:
    """The checkout's short commit: the code a result was measured with."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                          check=False)
    return head.stdout.strip() or None


def run_one(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dsv4", "bench", *args, "--json"]
    t = time.time()
    load = os.getloadavg()[0]  # other work on the machine at the start: a reader's check on the figures
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["command"] = "dsv4 bench " + " ".join(args) + " --json"
    result["commit"] = commit()  # the code that was measured
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime(t))
    result["load_average_at_start"] = load
    return result


def load_results() -> dict[str, list[dict]]:
    """Per machine, one result per command: of its runs at the commit of its newest run, the median run (by speedup
    against dense, else by time; of an even number, the lower-speedup one of the middle two), with ``runs`` set to
    how many there were."""
    out = {}
    for f in sorted(RESULTS.glob("*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        by_command = {}
        for r in rows:
            by_command.setdefault(r["command"], []).append(r)
        out[f.stem] = [median_run(runs) for runs in by_command.values()]
    return out


def median_run(runs: list[dict]) -> dict:
    """The median of a command's runs at its newest run's commit (see ``load_results``)."""
    same = [r for r in runs if r.get("commit") == runs[-1].get("commit")]
    if "speedup_vs_dense" in same[-1]:
        same = sorted(same, key=lambda r: r.get("speedup_vs_dense") or 0.0)
    else:
        same = sorted(same, key=lambda r: -(r.get("ms_per_token") or r.get("seconds") or 0.0))
    return dict(same[(len(same) - 1) // 2], runs=len(same))


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def report_experiment(result: dict, kind: str, save: bool) -> None:
    """Print an experiment's JSON (benchmarks/indexer_schedule.py, fp4_qat.py); with ``save`` also write it to
    ``benchmarks/results/experiment-<kind>-<time>.json``, where ``--docs`` finds it."""
    result = dict(result, commit=commit(), date=time.strftime("%Y-%m-%d", time.gmtime()))
    print(json.dumps(result))
    if save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"experiment-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result))


def experiments() -> list[dict]:
    """Results of the training experiments (benchmarks/indexer_schedule.py ... --save), newest first."""
    found = []
    for f in sorted(RESULTS.glob("experiment-*.json"), reverse=True):
        found.append(json.loads(f.read_text()))
    return found


def write_docs(results: dict[str, list[dict]]) -> None:
    DOCS.mkdir(exist_ok=True)
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/run_all.py --docs` from `benchmarks/results/*.jsonl`; every row names",
             "the command that produced it. Ratios compare runs of the same process (V4 attention against dense",
             "causal MQA with PyTorch's SDPA on the same model shape). `load` is the machine's 1-minute load average",
             "when the run started: on a 2-core machine anything above ~0.5 means the figures are pessimistic.", ""]
    for machine, rows in results.items():
        lines += [f"## {machine}", ""]
        # the prefill's roofline: its useful FLOPs at the matmul peak (rows from before the key carry both)
        pre = sorted((dict(r, roofline_seconds=r.get("roofline_seconds") or r["useful_flops"] / r["matmul_peak_flops"])
                      if "useful_flops" in r else r for r in rows if r["bench"] == "prefill"), key=lambda r: r["context"])
        lines += _table("### Prefill", pre, [
            ("context", "context"), ("threads", "threads"), ("V4 s", "seconds"), ("dense s", "dense_seconds"),
            ("speedup vs dense", "speedup_vs_dense"), ("vs HF eager", "speedup_vs_hf_eager"),
            ("logit diff vs HF before 1st tie", "max_abs_logit_diff_vs_hf_before_first_tie"),
            ("peak RSS GiB", "peak_rss_gib"), ("MFU", "mfu"), ("roofline s", "roofline_seconds"),
            ("cache bytes", "kv_bytes"),
            ("cost-model bytes", "cost_model_kv_bytes"), ("dense cache bytes", "dense_kv_bytes"),
            ("runs", "runs"), ("load", "load_average_at_start")])
        # decode rows from before --fill were prefilled
        dec = sorted((dict(r, fill=r.get("fill", "prefill")) for r in rows if r["bench"] == "decode"),
                     key=lambda r: r["context"])
        lines += _table("### Decode\n\n" + DECODE_NOTE, dec, [
            ("context", "context"), ("batch", "batch_size"), ("threads", "threads"), ("fill", "fill"),
            ("ms/token", "ms_per_token"), ("tokens/s", "tokens_per_s"),
            ("ms/token at 4K", "ms_per_token_4k"), ("dense ms/token", "dense_ms_per_token"),
            ("speedup vs dense", "speedup_vs_dense"), ("cache ratio vs dense", "cache_ratio_vs_dense"),
            ("ratio vs 4K", "ratio_vs_4k"), ("predicted ratio vs 4K", "predicted_ratio_vs_4k"),
            ("roofline ms/token", "roofline_ms_per_token"), ("roofline ratio vs 4K", "roofline_ratio_vs_4k"),
            ("runs", "runs"), ("load", "load_average_at_start")])
        lines += _table("### Compiled decode\n\n" + COMPILED_NOTE,
                        [r for r in dec if "compiled_ms_per_token" in r], [
            ("context", "context"), ("batch", "batch_size"), ("fill", "fill"), ("eager ms/token", "ms_per_token"),
            ("compiled ms/token", "compiled_ms_per_token"), ("roofline ms/token", "roofline_ms_per_token"),
            ("eager / roofline", "vs_roofline"), ("compiled / roofline", "compiled_vs_roofline"),
            ("compiled at 4K ms/token", "compiled_ms_per_token_4k"), ("eager at 4K", "ms_per_token_4k"),
            ("compiled speedup vs eager", "compiled_speedup_vs_eager"),
            ("dense compiled ms/token", "dense_compiled_ms_per_token"),
            ("speedup vs dense compiled", "compiled_speedup_vs_dense_compiled"),
            ("compile s", "compile_seconds"), ("dense compile s", "dense_compile_seconds"),
            ("capacity", "capacity"), ("runs", "runs"), ("load", "load_average_at_start")])
        serve = [r for r in rows if r["bench"] == "serve"]
        lines += _table("### Serving\n\n" + SERVE_NOTE, [_serve_row(r, "concurrent") for r in serve
                                                        if "concurrent" in r], [
            ("requests", "requests"), ("output tokens/s", "tps"), ("one at a time", "tps_alone"),
            ("speedup", "speedup"), ("TTFT p50 / p99 s", "ttft"), ("ITL p50 / p99 s", "itl"),
            ("one at a time: TTFT / ITL p50 s", "alone_latency"), ("commit", "commit")])
        lines += _table("### Agent sessions with the prefix cache", [_serve_row(r, "agent") for r in serve
                                                                     if "agent" in r], [
            ("turns", "turns"), ("final context", "final_context"), ("TTFT s", "ttft"),
            ("no prefix cache", "ttft_cold"), ("speedup", "speedup"), ("all turns 2+ s", "ttft_all"),
            ("hit rate", "hit_rate"), ("after restart s", "restart"), ("cold s", "cold"),
            ("restart speedup", "restart_speedup"), ("disk bytes / token", "disk_per_token"), ("commit", "commit")])
        lines += _table("### Training", [r for r in rows if r["bench"] == "train"], [
            ("preset", "preset"), ("threads", "threads"), ("seq", "seq_len"), ("batch", "batch_size"),
            ("tokens/s", "tokens_per_s"),
            ("MFU", "mfu"), ("load", "load_average_at_start")])
        if pre or dec:
            plot = DOCS / f"bench-{machine}.png"
            one_row = [r for r in dec if r.get("batch_size", 1) == 1]  # batches: in the table only
            _plot(pre, one_row, plot)
            lines += [f"![prefill and decode on {machine}]({plot.name})", "", *_plot_note(pre, one_row), ""]
    exps = [e for e in experiments() if e.get("experiment") == "indexer_schedule"]
    lines += _table("## Sparse-attention schedule (tiny preset)\n\n"
                    "Dense CSA attention, then an indexer warm-up with the rest frozen, then top-k attention. Recall: the\n"
                    "indexer's top-k among the main attention's top-k compressed entries; losses on the validation split.",
                    exps, [("recall at init", "recall_at_init"), ("after dense", "recall_end_of_dense"),
                           ("after warm-up", "recall_end_of_warmup"), ("val loss, sparse", "val_loss_sparse"),
                           ("same model, dense CSA", "val_loss_dense_attention"),
                           ("sparse vs dense", "sparse_vs_dense")])
    spec = [dict(r, command=e["command"], model=e["model"], commit=e.get("commit"), threads=e.get("threads"),
                 steps="compiled" if e.get("compile") else "eager")
            for e in experiments() if e.get("experiment") == "speculative" for r in e["per_temperature"]]
    lines += _table("## Speculative decoding with the MTP block\n\n" + SPECULATIVE_NOTE, spec, [
        ("model", "model"), ("steps", "steps"), ("threads", "threads"), ("temperature", "temperature"),
        ("tokens", "tokens"),
        ("plain tokens/s", "plain_tokens_per_s"), ("speculative tokens/s", "speculative_tokens_per_s"),
        ("speedup", "speedup"), ("kept", "acceptance"), ("tokens per call", "tokens_per_call"),
        ("greedy identical", "greedy_identical"), ("commit", "commit")])
    parts = [dict(e["parts"], model=e.get("model") or f"{e['preset']} (random weights)", command=e["command"],
                  commit=e.get("commit"), threads=e.get("threads"))
             for e in experiments() if e.get("experiment") in ("speculative", "speculative_parts") and "parts" in e]
    lines += _table("### The parts of a speculative call\n\n" + SPECULATIVE_PARTS_NOTE, parts, [
        ("model", "model"), ("threads", "threads"), ("context", "context"), ("plain step ms", "plain_step_ms"),
        ("check ms", "check_ms"), ("draft ms", "draft_ms"),
        ("break-even tokens per call", "break_even_tokens_per_call"), ("commit", "commit")])
    fp4 = [_fp4_row(e) for e in experiments() if e.get("experiment") == "fp4_qat"]
    lines += _table("## FP4 quantization-aware training (tiny preset)\n\n"
                    "The tiny preset trained twice per seed, same data and steps, with and without `--fp4-qat`, then\n"
                    "evaluated with real FP4 routed experts (`dsv4 eval --fp4`, on `--eval-batches` validation batches,\n"
                    "default 32). QAT: its loss as trained (the QAT forward, what `dsv4 train` validated) against real\n"
                    "FP4 experts. Without QAT: the float model against the same model quantized afterwards, that\n"
                    "difference split into a first-order part (its sign set by the run) and the second-order cost of\n"
                    "an error that size (from the loss at the masters minus the FP4 error). Relative differences, one\n"
                    "per seed; the validation split depends on the seed. KL: the mean per token of KL(model as\n"
                    "trained || real FP4), in nats; top-1 kept: tokens whose most likely next token stays.",
                    fp4, [("steps", "steps"), ("lr", "lr"), ("seeds", "seeds"), ("QAT val loss", "qat_val"),
                          ("QAT, real FP4", "qat_fp4"), ("QAT diff", "qat_diff"), ("no QAT val loss", "plain_val"),
                          ("no QAT, real FP4", "plain_fp4"), ("no QAT diff", "plain_diff"),
                          ("of which 1st order", "plain_first"), ("2nd order", "plain_second"),
                          ("QAT KL", "qat_kl"), ("no QAT KL", "plain_kl"), ("no QAT top-1 kept", "plain_top1"),
                          ("no QAT worse", "worse")])
    post = next((_posttrain_rows(e) for e in experiments() if e.get("experiment") == "posttrain"), [])
    lines += _table("## Post-training: specialists merged by on-policy distillation (tiny preset)\n\n"
                    "From one base: a specialist per domain (SFT on the domain's answers, then GRPO on its verifiable\n"
                    "reward), then a student distilled from all of them (reverse KL over the full vocabulary on the\n"
                    "student's own samples, each prompt from its domain's specialist). Accuracy: greedy exact match\n"
                    "on held-out prompts of each domain. The newest run (earlier ones stay in benchmarks/results/).",
                    post,
                    [("model", "model"), ("accuracy", "accuracy"), ("steps (SFT / GRPO / OPD)", "steps"),
                     ("GRPO lr", "rl_lr"), ("commit", "commit")])
    (DOCS / "benchmarks.md").write_text("\n".join(lines) + "\n")


def _serve_row(r: dict, workload: str) -> dict:
    """One row of a serving table from a ``dsv4 bench serve`` result."""
    w = r[workload]

    def pair(d: dict) -> str:
        return f"{_fmt(d['p50'])} / {_fmt(d['p99'])}"

    base = {"command": r["command"], "commit": r.get("commit")}
    if workload == "concurrent":
        one, alone = w["concurrent"], w["one_at_a_time"]
        return dict(base, requests=w["requests"], tps=one["output_tokens_per_s"],
                    tps_alone=alone["output_tokens_per_s"], speedup=w["speedup"], ttft=pair(one["ttft_s"]), itl=pair(one["itl_s"]),
                    alone_latency=f"{_fmt(alone['ttft_s']['p50'])} / {_fmt(alone['itl_s']['p50'])}")
    return dict(base, turns=w["turns"], final_context=w["final_context"], ttft=w["ttft_mean_s"],
                ttft_cold=w["ttft_mean_no_prefix_cache_s"], speedup=w["ttft_speedup"],
                ttft_all=w["ttft_mean_all_turns_after_first_s"], hit_rate=w["hit_rate"],
                restart=w["restart_ttft_s"], cold=w["cold_ttft_s"], restart_speedup=w["restart_speedup"],
                disk_per_token=w["disk_bytes_per_cached_token"])


def _posttrain_rows(e: dict) -> list[dict]:
    """The post-training section's rows of one run of benchmarks/posttrain.py: per model, its accuracy per domain."""
    steps = f"{e['sft_steps']} / {e['rl_steps']} / {e['opd_steps']}"
    return [{"model": name, "accuracy": ", ".join(f"{t} {a:.3f}" for t, a in row.items()), "steps": steps,
             "rl_lr": e.get("rl_lr", "-"), "commit": e.get("commit"), "command": e["command"]}
            for name, row in e["accuracy"].items()]


def _fp4_row(e: dict) -> dict:
    """One row of the FP4 QAT section: per-seed figures joined with '/', in seed order."""
    per = e["per_seed"]

    def join(mode: str, key: str, pct: bool = False) -> str:
        return " / ".join(f"{100 * s[mode][key]:+.3f}%" if pct else f"{s[mode][key]:.4f}" for s in per)

    def shift(mode: str, key: str, fmt: str) -> str:
        if not all("fp4_kl" in s[mode] for s in per):
            return "-"
        return " / ".join(format(s[mode][key], fmt) for s in per)

    def decomp(key: str) -> str:
        if not all("decomposition" in s["no_qat"] for s in per):
            return "-"
        return " / ".join(f"{100 * s['no_qat']['decomposition'][key]:+.3f}%" for s in per)

    return {"command": e["command"], "steps": e["steps"], "lr": e["lr"],
            "seeds": ", ".join(str(s["seed"]) for s in per),
            "qat_val": join("qat", "val_loss"), "qat_fp4": join("qat", "fp4_val_loss"),
            "qat_diff": join("qat", "fp4_rel_diff", True), "plain_val": join("no_qat", "val_loss"),
            "plain_fp4": join("no_qat", "fp4_val_loss"), "plain_diff": join("no_qat", "fp4_rel_diff", True),
            "plain_first": decomp("first_order_rel"), "plain_second": decomp("second_order_rel"),
            "qat_kl": shift("qat", "fp4_kl", ".1e"), "plain_kl": shift("no_qat", "fp4_kl", ".1e"),
            "plain_top1": shift("no_qat", "fp4_top1_agreement", ".2%"),
            "worse": "yes" if e["non_qat_measurably_worse"] else "no"}


def _table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """A markdown section: the title, then one row per result (columns named, then the command that made it)."""
    if not rows:
        return []
    heads = [h for h, _ in columns] + ["command"]
    out = [*title.split("\n"), "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k, "-")) for _, k in columns) + f" | `{r['command']}` |")
    return out + [""]


# the plot's curves: (label, the row's key, line style)
PREFILL_CURVES = [("V4", "seconds", "o-"), ("dense", "dense_seconds", "s--"), ("V4 roofline", "roofline_seconds", ":")]
DECODE_CURVES = [("V4 eager", "ms_per_token", "o-"), ("V4 compiled", "compiled_ms_per_token", "o-"),
                 ("dense eager", "dense_ms_per_token", "s--"),
                 ("dense compiled", "dense_compiled_ms_per_token", "s--"),
                 ("V4 roofline", "roofline_ms_per_token", ":")]


def _decode_curve_rows(dec: list[dict]) -> tuple[list[dict], list[dict]]:
    """The decode rows the curves draw (from caches of random entries, the sweep's, where there are any; else all)
    and those drawn as single points beside them (V4 eager from prefilled caches)."""
    random = [r for r in dec if r.get("fill") == "random"]
    if not random:
        return dec, []
    return random, [r for r in dec if r.get("fill", "prefill") == "prefill"]


def _plot(pre: list[dict], dec: list[dict], path: Path) -> None:
    """Prefill seconds and decode ms/token against context, log axes: a curve per benchmark and thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    _panel(a, pre, PREFILL_CURVES, "prompt tokens", "prefill seconds")
    curves, points = _decode_curve_rows(dec)
    _panel(b, curves, DECODE_CURVES, "context tokens", "ms per generated token")
    for tag, runs in _series(points):
        b.plot([r["context"] for r in runs], [r["ms_per_token"] for r in runs], "kx", label="V4 eager, prefilled" + tag)
    if points:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _series(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The rows by thread count (runs at other counts are not comparable), each sorted by context, with its tag."""
    out = []
    for threads in sorted({r.get("threads") for r in rows}, key=str):
        runs = sorted((r for r in rows if r.get("threads") == threads), key=lambda r: r["context"])
        out.append((f", {threads} thread{'s' if threads != 1 else ''}" if threads is not None else "", runs))
    return out


def _panel(ax, rows: list[dict], curves: list[tuple[str, str, str]], xlabel: str, ylabel: str) -> None:
    """Each curve against context, one per thread count; log axes."""
    for tag, runs in _series(rows):
        for label, key, style in curves:
            have = [r for r in runs if r.get(key) is not None]
            if have:
                ax.plot([r["context"] for r in have], [r[key] for r in have], style, label=label + tag)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if rows:
        ax.legend(fontsize=7)


def _plot_note(pre: list[dict], dec: list[dict]) -> list[str]:
    """The commands behind the plot's curves: each command with its context as N, and the Ns it ran at."""
    curves, points = _decode_curve_rows(dec)

    def commands(rows: list[dict]) -> list[str]:
        by = {}
        for r in rows:
            by.setdefault(r["command"].replace(f"--context {r['context']} ", "--context N "), []).append(r["context"])
        return [f"  - `{c}`, N = {', '.join(f'{n:,}' for n in sorted(ns))}" for c, ns in by.items()]

    out = ["Log axes; every point is a row of the tables above.", "",
           "- Prefill (seconds: V4, dense, V4's roofline):", *commands(pre),
           "- Decode (ms/token: V4 eager and compiled, dense eager and compiled, V4's roofline):", *commands(curves)]
    if points:
        out += ["- Crosses: V4 eager from a prefilled cache:", *commands(points)]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--docs", action="store_true", help="only regenerate the docs from saved results")
    p.add_argument("--runs", type=int, default=1, help="run each chosen command this many times (the docs show the "
                   "median run)")
    p.add_argument("--gpu", action="store_true", help="run GPU_PLAN (--device cuda) instead of the CPU plan")
    p.add_argument("--sweep", action="store_true", help="run SWEEP (the plot's curves: decode 4K to 1M, prefill 4K "
                   "to 131K) instead of the CPU plan")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="run only the plan's commands containing TEXT (e.g. 'prefill --preset small --context "
                        "4096'), or the one command equal to it; repeatable")
    args = p.parse_args()
    if not args.docs:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{machine_name()}.jsonl"
        plan = GPU_PLAN if args.gpu else SWEEP if args.sweep else QUICK if args.quick else PLAN
        if args.only:
            exact = [b for b in plan if " ".join(b) in args.only]  # a whole command: that one only
            plan = exact or [b for b in plan if any(text in " ".join(b) for text in args.only)]
            if not plan:
                p.error(f"no benchmark of the plan matches {args.only}")
        for bench in [b for b in plan for _ in range(args.runs)]:
            print("running dsv4 bench", " ".join(bench), flush=True)
            result = run_one(bench)
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
    write_docs(load_results())
    print(f"wrote {DOCS / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
