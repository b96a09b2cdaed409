"""The fused packed-weight kernel's speed on one decoding row, against the machine's copy bandwidth.

    python benchmarks/packed_kernel.py [--rows 32768] [--cols 4096] [--json]

For each stored format (BF16, FP8 E4M3 with 128x128 scales, FP4 E2M1 with 1x32 scales) a random [rows, cols]
matrix is multiplied by one activation row through ``dsv4.model.fused.packed_matmul``; the median of 5 calls gives
the stored bytes read per second, beside ``dsv4.bench.copy_bandwidth`` measured before and after (a one-row
product cannot go faster than reading its bytes once). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from dsv4 import quant
    from dsv4.bench import copy_bandwidth
    from dsv4.model import fused

    if not fused.available():
        raise SystemExit("the fused kernel is not built on this machine (python -m dsv4.model.fused says why)")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=g)
    stored = {"bf16": (w.bfloat16(), None), "fp8": quant.fp8_block_quant(w, 128), "fp4": quant.mxfp4_quant(w, 32)}
    del w
    x = torch.randn(1, args.cols, generator=g)
    out = {"rows": args.rows, "cols": args.cols, "threads": torch.get_num_threads(),
           "copy_gb_s_before": copy_bandwidth() / 1e9}
    for fmt, (weight, scale) in stored.items():
        fused.packed_matmul(x, weight, scale, fmt)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fused.packed_matmul(x, weight, scale, fmt)
            times.append(time.perf_counter() - t)
        out[f"{fmt}_gb_s"] = weight.numel() * weight.element_size() / sorted(times)[2] / 1e9
    out["copy_gb_s_after"] = copy_bandwidth() / 1e9
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                                                       for k, v in out.items()))


if __name__ == "__main__":
    main()
