"""Correctness on a GPU before its benchmarks: the tiny preset on CUDA against the same weights on the CPU.

    python benchmarks/gpu_check.py [--device cuda]

Float32, one batch of two rows: the fast path's logits on the device equal the CPU's within 1e-4, and equal the
device's own reference path; a chunked prefill then token-by-token decoding through the cache equals one call; one
training step's gradients (forward_train, fast path) equal the CPU's within 1e-3 relative; the compiled decoding
step (CUDA graphs on a GPU) equals the eager one within 1e-4 of the logits' magnitude over 40 steps, and whether its
graphs ran as CUDA graphs is reported. Prints one JSON object and exits 1 when a check fails. The CPU test suite
holds the same properties on the CPU; this is the GPU's share.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().float() - b.detach().cpu().float()).abs().max())


def check(device: torch.device, seq: int = 300) -> dict:
    from dsv4 import ModelConfig, Transformer

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here: no TF32 tensor-core rounding
    torch.backends.cudnn.allow_tf32 = False
    config = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    cpu = Transformer(config).eval()
    dev = Transformer(config).eval().to(device)
    dev.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    out: dict = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    with torch.no_grad():
        ref_cpu = cpu(ids)
        fast = dev(ids.to(device))
        out["fast_vs_cpu"] = _max_diff(fast, ref_cpu)
        out["fast_vs_reference"] = _max_diff(fast, dev.set_attention("reference")(ids.to(device)))
        dev.set_attention("fast")
        cache = dev.new_cache(2)
        split = seq // 3
        parts = [dev(ids[:, :split].to(device), cache=cache)]
        parts += [dev(ids[:, i:i + 1].to(device), cache=cache) for i in range(split, seq)]
        out["cached_decode_vs_one_call"] = _max_diff(torch.cat(parts, dim=1), fast)
    grads = []
    for model in (cpu, dev):
        model.train().zero_grad(set_to_none=True)
        model.forward_train(ids.to(model.device)).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    out["grad_rel_diff"] = max(_max_diff(grads[1][n], g) / max(float(g.abs().max()), 1e-12)
                               for n, g in grads[0].items())
    out["ok"] = (out["fast_vs_cpu"] < 1e-4 and out["fast_vs_reference"] < 1e-4
                 and out["cached_decode_vs_one_call"] < 1e-4 and out["grad_rel_diff"] < 1e-3)
    return out


def check_compiled(device: torch.device, steps: int = 40) -> dict:
    """The compiled decoding step (``DecodeStep``; on a GPU recorded as CUDA graphs and replayed) against the eager
    step, ``steps`` steps of two rows prefilled to 5 and 37 tokens (rings wrap, compressed blocks end): the largest
    difference of their logits relative to the logits' magnitude, the compile seconds, and whether every graph ran
    as CUDA graphs (inductor's count of graphs it skipped)."""
    from torch._dynamo.utils import counters

    from dsv4 import ModelConfig, Transformer
    from dsv4.model.decode import DecodeState, DecodeStep

    config = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    model = Transformer(config).eval().to(device)
    lengths = [5, 37]
    ids = torch.randint(0, config.vocab_size, (2, max(lengths) + steps), generator=torch.Generator().manual_seed(2))
    skipped = counters["inductor"]["cudagraph_skips"]
    with torch.inference_mode():
        eager = DecodeStep(model, DecodeState(model, 2, 128))
        compiled = DecodeStep(model, DecodeState(model, 2, 128), compile=True, fullgraph=True)
        for step in (eager, compiled):
            for r, n in enumerate(lengths):
                cache = model.new_cache(1)
                model(ids[r:r + 1, :n].to(device), cache=cache)
                step.state.load_row(r, cache)
        diff = 0.0
        for i in range(steps):
            tokens = torch.stack([ids[r, n + i] for r, n in enumerate(lengths)]).to(device)
            a, b = eager(tokens), compiled(tokens)
            diff = max(diff, _max_diff(a, b) / max(float(a.abs().max()), 1e-12))
    out = {"compiled_step_vs_eager": diff, "compiled_step_compiled": compiled.compiled,
           "compiled_step_compile_seconds": compiled.compile_seconds}
    if device.type == "cuda":
        out["compiled_step_cuda_graphs"] = counters["inductor"]["cudagraph_skips"] == skipped
    out["ok"] = compiled.compiled and diff < 1e-4
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    from dsv4.bench import resolve_device

    device = resolve_device(args.device)
    result = check(device)
    compiled = check_compiled(device)
    result.update(compiled, ok=result["ok"] and compiled["ok"])
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
