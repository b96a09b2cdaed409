"""A two-layer slice of V4-Flash at its real width, packed, on this machine (issue 18's measurement).

    python benchmarks/flash_slice.py [--dir DIR] [--prompt-tokens 600] [--new-tokens 4] [--json]

Writes (once) a random checkpoint in the released layout (``dsv4.weights.synthetic.flash_slice_config``: a
hash-routed CSA layer, an HCA layer and the MTP block at hidden 4096, 256 experts of 2048, vocab 129,280: about 21 B
parameters, 12.9 GB), then in a fresh process loads it packed (``dsv4.from_pretrained``), prefills a prompt of random
token ids (so that nearly every expert is touched) and decodes greedily, and prints one JSON object: the
checkpoint's bytes, load / prefill seconds, decode ms per token, the process's peak resident set (file pages
included: ``VmHWM``) and its ratio to the checkpoint, ``dsv4 cost --fit``'s prediction of that peak, and the decoding
step's roofline (the stored bytes a token reads, at the measured copy bandwidth). The float32 model of the same slice
would need about 83 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_MEASURE = r"""
import json, sys, time
import dsv4
from dsv4.bench import greedy_run
from dsv4.runtime import tune_allocator
tune_allocator()  # as the dsv4 commands run (dsv4.cli): large buffers reused, not mapped and faulted in each step
path, prompt, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
model = dsv4.from_pretrained(path)
load_s = time.perf_counter() - t
print(json.dumps({"load_s": load_s, **greedy_run(model, prompt, new)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(os.environ.get("DSV4_CACHE", "/tmp"), "dsv4-flash-slice"))
    p.add_argument("--prompt-tokens", type=int, default=600)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from dsv4.bench import copy_bandwidth
    from dsv4.config import ModelConfig
    from dsv4.cost.fit import plan_checkpoint
    from dsv4.cost.weights import decode_bytes_per_token
    from dsv4.weights.files import read_headers
    from dsv4.weights.synthetic import flash_slice_config, write_synthetic

    path = Path(args.dir)
    write_s = None
    if not (path / "config.json").exists():
        t = time.perf_counter()
        write_synthetic(flash_slice_config(), path)
        write_s = time.perf_counter() - t
    ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(args.prompt_tokens), str(args.new_tokens)],
                         capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    config = ModelConfig.from_json(path / "config.json")
    token_bytes = decode_bytes_per_token(((name, info.nbytes) for name, (_, info) in read_headers(path).items()),
                                         config)
    bandwidth = copy_bandwidth()
    plan = plan_checkpoint(path, context=args.prompt_tokens + args.new_tokens, batch=1, prompt=args.prompt_tokens)
    result = {"checkpoint_bytes": ckpt_bytes, "parameters": config.num_parameters(), "write_s": write_s, **figures,
              "peak_over_checkpoint": figures["peak_rss_bytes"] / ckpt_bytes,
              "predicted_peak_bytes": plan.peak_bytes,
              "predicted_over_measured": plan.peak_bytes / figures["peak_rss_bytes"],
              "float32_bytes": 4 * config.num_parameters(), "decode_bytes_per_token": token_bytes,
              "copy_bandwidth_gb_s": bandwidth / 1e9, "roofline_ms_per_token": 1e3 * token_bytes / bandwidth}
    result["decode_over_roofline"] = result["decode_ms_per_token"] / result["roofline_ms_per_token"]
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
