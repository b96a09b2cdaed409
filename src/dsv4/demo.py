"""``dsv4 demo`` (``make demo``): build the tiny preset, save it, load it back, and generate through the cache."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--out", default=None, help="where to save the model (default: a temporary directory)")
    p.add_argument("--tokens", type=int, default=24, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import dsv4
    from dsv4.generate import generate

    torch.manual_seed(args.seed)
    config = dsv4.ModelConfig.preset(args.preset)
    print(f"[1/4] building the {args.preset!r} preset: {config.num_hidden_layers} layers "
          f"({', '.join(config.layer_types)}), hc_mult {config.hc_mult}, "
          f"{config.n_routed_experts} experts (top-{config.num_experts_per_tok}), MTP depth "
          f"{config.num_nextn_predict_layers}")
    model = dsv4.Transformer(config).eval()
    print(f"      {model.num_parameters() / 1e6:.2f} M parameters")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsv4-demo-"))
    model.save_pretrained(out)
    files = sorted(p.name for p in out.iterdir())
    print(f"[2/4] saved in HF layout to {out}: {files}")
    loaded = dsv4.from_pretrained(out)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    print(f"[3/4] loaded it back: every tensor identical = {same}")
    prompt = torch.randint(0, config.vocab_size, (1, 3 * config.sliding_window + 5))
    t0 = time.perf_counter()
    with torch.no_grad():
        full = loaded(prompt)
        cache = loaded.new_cache(1)
        half = prompt.shape[1] // 2
        parts = [loaded(prompt[:, :half], cache=cache)]
        parts += [loaded(prompt[:, i:i + 1], cache=cache) for i in range(half, prompt.shape[1])]
    diff = (torch.cat(parts, dim=1) - full).abs().max().item()
    print(f"      cached prefill of {half} tokens + {prompt.shape[1] - half} decode steps vs one full call: "
          f"max |logit difference| = {diff:.2e}; cache holds {cache.nbytes() / 1024:.1f} KiB")
    ids = generate(loaded, prompt, args.tokens, temperature=0.8, top_p=0.95, seed=args.seed)
    dt = time.perf_counter() - t0
    print(f"[4/4] generated {args.tokens} tokens through the cache (untrained weights, so the ids are noise): "
          f"{ids[0, prompt.shape[1]:].tolist()}")
    print(f"      done in {dt:.2f} s")
    return 0 if same and diff < 1e-3 else 1
