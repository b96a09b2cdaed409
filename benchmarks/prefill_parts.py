"""Where a long prefill's seconds go: each attention kind and each part of CSA, timed by wrappers and hooks.

    python benchmarks/prefill_parts.py [--preset small] [--context 32768] [--chunk 4096]

A model of the preset (random weights, float32) prefills ``context`` random tokens in ``chunk``-token calls through
its decode cache, as ``dsv4 bench prefill`` does. Timed: each attention layer by kind (``attention_csa``,
``attention_hca``, ``attention_window``), and inside CSA the indexer's scores (``chunk_scores``,
``fused.index_scores``), its top-k (``topk_lower_index``, ``select_topk``), the attention over the picks
(``fused.sparse_attend``), the compressors' entries and the indexer's keys and queries. A wrapped part's seconds
include the parts it calls (``chunk_scores`` holds ``index_scores``). Prints one JSON object: ``total_seconds``
and, per part, seconds and calls.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=4096)
    args = p.parse_args()
    from dsv4.bench import build
    from dsv4.model import fused
    from dsv4.model import prefill as prefill_module
    from dsv4.runtime import tune_allocator

    tune_allocator()
    fused.kernel()  # built before the clock starts
    config, model = build(args.preset, 0, torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    seconds, calls = collections.defaultdict(float), collections.Counter()

    def wrap(owner, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[key] += time.perf_counter() - t
                calls[key] += 1
        setattr(owner, name, timed)

    for name in ("chunk_scores", "topk_lower_index", "select_topk"):
        wrap(prefill_module, name, name)
    for name in ("sparse_attend", "index_scores"):
        wrap(fused, name, f"fused.{name}")
    started = {}

    def start(key):
        return lambda module, inputs: started.__setitem__(key, time.perf_counter())

    def stop(key):
        def hook(module, inputs, output):
            seconds[key] += time.perf_counter() - started[key]
            calls[key] += 1
        return hook

    for layer in model.layers:
        attn = layer.attn
        kind = "window" if attn.compressor is None else "csa" if attn.indexer is not None else "hca"
        attn.register_forward_pre_hook(start(f"attention_{kind}"))
        attn.register_forward_hook(stop(f"attention_{kind}"))
        if attn.compressor is not None:
            wrap(attn.compressor, "entries", f"compressor_{kind}.entries")
        if attn.indexer is not None:
            for name in ("keys", "queries"):
                wrap(attn.indexer, name, f"indexer.{name}")
    with torch.inference_mode():
        cache = model.new_cache(1)
        t = time.perf_counter()
        for a in range(0, args.context, args.chunk):
            model(ids[:, a:a + args.chunk], cache=cache, last_only=True)
        total = time.perf_counter() - t
    parts = {k: {"seconds": v, "calls": calls[k]} for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
    print(json.dumps({"preset": args.preset, "context": args.context, "chunk": args.chunk,
                      "threads": torch.get_num_threads(), "total_seconds": total, "parts": parts}))


if __name__ == "__main__":
    main()
