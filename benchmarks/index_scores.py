"""The indexer's scores of one prefill block: the fused kernel against chunk_scores' operators and the bare matmul.

    python benchmarks/index_scores.py [--queries 256] [--heads 8] [--dim 64] [--entries 1024,4096,8192]

For each entry count, a block of queries [1, Q, H, c], head weights and transposed keys [1, c, T] (random) are
scored by ``dsv4.model.fused.index_scores`` (one pass, no [Q H, T] dots written), by ``indexer.chunk_scores``'
operators (its matmul tile by tile, ReLU, the weighted head sum; taken here with the kernel turned off) and by the
matmul of the dots alone (a lower bound on the operators' time). Each figure is the best of 3 rounds of 3 calls,
the three alternating; GFLOP/s counts the dots' 2 Q H c T; ``matmul_peak_flops`` is measured before and after.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--entries", default="1024,4096,8192")
    args = p.parse_args()
    from dsv4.model import fused, indexer
    from dsv4.runtime import tune_allocator
    from dsv4.train.flops import matmul_peak_flops

    if not fused.available():
        raise SystemExit("the fused kernel is not built on this machine (python -m dsv4.model.fused says why)")
    tune_allocator()
    g = torch.Generator().manual_seed(0)
    nq, h, c = args.queries, args.heads, args.dim
    out = {"queries": nq, "heads": h, "dim": c, "threads": torch.get_num_threads(),
           "matmul_peak_flops_before": matmul_peak_flops(torch.float32), "runs": []}

    class KernelOff:  # indexer.chunk_scores' operators: fused.serves false for its (q, w, keys_t)
        def __getattr__(self, name):
            return getattr(fused, name)

        @staticmethod
        def serves(*tensors):
            return False

    def operators(q, w, kt):
        indexer.fused = KernelOff()
        try:
            return indexer.chunk_scores(q, w, kt)
        finally:
            indexer.fused = fused

    for t in [int(x) for x in args.entries.split(",")]:
        q, w = torch.randn(1, nq, h, c, generator=g), torch.rand(1, nq, h, generator=g)
        kt = torch.randn(1, c, t, generator=g)
        qf = q.reshape(nq * h, c)
        calls = {"fused": lambda: fused.index_scores(q, w, kt), "operators": lambda: operators(q, w, kt),
                 "matmul_only": lambda: torch.mm(qf, kt[0])}
        best = dict.fromkeys(calls, float("inf"))
        with torch.inference_mode():
            err = float((fused.index_scores(q, w, kt) - operators(q, w, kt)).abs().max())
            for _ in range(3):
                for name, fn in calls.items():
                    fn()
                    t0 = time.perf_counter()
                    for _ in range(3):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - t0) / 3)
        flops = 2 * nq * h * c * t
        out["runs"].append({"entries": t, **{f"{k}_ms": v * 1e3 for k, v in best.items()},
                            **{f"{k}_gflop_s": flops / v / 1e9 for k, v in best.items()},
                            "fused_vs_operators": best["operators"] / best["fused"], "max_abs_difference": err})
    out["matmul_peak_flops_after"] = matmul_peak_flops(torch.float32)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
