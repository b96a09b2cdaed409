"""The two-layer V4-Flash slice of ``flash_slice.py`` with its routed experts spread over N ranks (issue 18 item 5).

    python benchmarks/expert_parallel_slice.py [--dir DIR] [--ranks 2] [--prompt-tokens 600] [--new-tokens 4]
                                               [--one-process] [--json]

Launches N ranks with ``torchrun --nproc_per_node N`` on this machine (gloo), each loading the packed checkpoint
through ``dsv4.parallel.inference`` (its 1/N of every layer's routed experts mapped, the rest replicated), then the
same work as ``flash_slice.py``: a prompt of random token ids (seed 0; nearly every expert touched), greedy decoding.
Prints one JSON object: per rank the load / prefill seconds, decode ms per token, peak resident set (``VmHWM``: the
file pages it touched included) and the routed-expert bytes it mapped; ``dsv4 cost --fit --expert-parallel N``'s
prediction of a rank's peak; the greedy tokens, and with ``--one-process`` whether one process gives the same ones
(it runs ``flash_slice.py``'s measurement first, in a fresh process). The checkpoint is written once if missing.

On one machine the ranks share the page cache: the replicated tensors' pages are counted in each rank's resident
set but held once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RANK = r"""
import json, os, sys, time
from dsv4.bench import greedy_run
from dsv4.parallel.inference import expert_ranks
from dsv4.model.packed import PackedExperts
path, prompt, new, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with expert_ranks() as ranks:
    t = time.perf_counter()
    model = ranks.from_pretrained(path)
    load_s = time.perf_counter() - t
    experts = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, PackedExperts)
                  for t in m.stored_tensors().values())
    figures = greedy_run(model, prompt, new)
    with open(os.path.join(out, f"rank{ranks.rank}.json"), "w") as f:
        json.dump({"rank": ranks.rank, "load_s": load_s, **figures, "expert_bytes_mapped": experts}, f)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(os.environ.get("DSV4_CACHE", "/tmp"), "dsv4-flash-slice"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=600)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--one-process", action="store_true", help="also decode in one process and compare the tokens")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from dsv4.cost.fit import plan_checkpoint
    from dsv4.weights.synthetic import flash_slice_config, write_synthetic

    path = Path(args.dir)
    if not (path / "config.json").exists():
        write_synthetic(flash_slice_config(), path)
    result = {"checkpoint_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")), "ranks": args.ranks}
    if args.one_process:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from flash_slice import _MEASURE

        run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(args.prompt_tokens),
                              str(args.new_tokens)], capture_output=True, text=True, check=True)
        result["one_process"] = json.loads(run.stdout.strip().splitlines()[-1])
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "rank.py"
        script.write_text(_RANK)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                        str(script), str(path), str(args.prompt_tokens), str(args.new_tokens), out],
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)), check=True,
                       stdout=subprocess.DEVNULL)
        result["wall_s"] = time.perf_counter() - t
        result["per_rank"] = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    plan = plan_checkpoint(path, context=args.prompt_tokens + args.new_tokens, batch=1, prompt=args.prompt_tokens,
                           expert_parallel=args.ranks)
    result["predicted_rank_peak_bytes"] = plan.peak_bytes
    result["predicted_over_measured"] = [plan.peak_bytes / r["peak_rss_bytes"] for r in result["per_rank"]]
    result["tokens"] = result["per_rank"][0]["tokens"]
    result["ranks_agree"] = all(r["tokens"] == result["tokens"] for r in result["per_rank"])
    if args.one_process:
        result["same_tokens_as_one_process"] = result["one_process"]["tokens"] == result["tokens"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result["command"] = " ".join(["python benchmarks/expert_parallel_slice.py", *sys.argv[1:]])
    result["commit"] = commit
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
