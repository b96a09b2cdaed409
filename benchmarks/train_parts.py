"""Where a training step's seconds go in attention: each attention kind's forward and backward, timed layer by layer.

    python benchmarks/train_parts.py [--preset small] [--context 2048] [--batch-size 2]

A model of the preset (random weights, float32) trains on synthetic rows of two documents each, as ``dsv4 bench
train`` does: one untimed step, then the best of two timed steps. Each attention layer is then run alone on the
inputs it met in the first step (its normed input, positions, the documents' packing), forward and backward of a
random projection of its output plus its indexer's KL loss where it trains one; the best of two runs. Prints one
JSON object: the step's seconds, each kind's seconds (``attention_csa``, ``attention_hca``, ``attention_window``),
and their share of the step.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args()
    from dsv4.bench import build
    from dsv4.data.packing import Batch
    from dsv4.train.loop import TrainConfig, Trainer

    config, model = build(args.preset, 0, torch.float32)
    seq, bsz = args.context, args.batch_size
    g = torch.Generator().manual_seed(0)

    class Synthetic:
        def __next__(self):
            tokens = torch.randint(0, config.vocab_size, (bsz, seq + 1), generator=g)
            docs = (torch.arange(seq + 1) >= seq // 2).long().expand(bsz, -1)  # two documents per row
            return Batch(tokens, docs, torch.zeros_like(tokens))

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    met: dict[int, tuple] = {}

    def keep(i):
        def hook(module, inputs, kwargs):
            met.setdefault(i, (inputs, kwargs))
        return hook

    hooks = [block.attn.register_forward_pre_hook(keep(i), with_kwargs=True) for i, block in enumerate(model.layers)]
    cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=1, val_every=0, ckpt_every=0)
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(model, Synthetic(), cfg, d)
        trainer.train_step()
        for h in hooks:
            h.remove()
        step = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            trainer.train_step()
            step = min(step, time.perf_counter() - t)
    seconds: dict[str, float] = {}
    for i, block in enumerate(model.layers):
        attn = block.attn
        kind = "window" if attn.compressor is None else "csa" if attn.indexer is not None else "hca"
        bound = inspect.signature(attn.forward).bind(*met[i][0], **met[i][1]).arguments
        x = bound.pop("x").detach().clone().requires_grad_()
        best = float("inf")
        for _ in range(2):
            kw = dict(bound, stats=[] if bound.get("stats") is not None else None)
            t = time.perf_counter()
            out = attn(x, **kw)
            loss = (out * torch.randn_like(out)).sum() + sum(st.kl for st in kw["stats"] or [])
            loss.backward()
            best = min(best, time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
            x.grad = None
        seconds[f"attention_{kind}"] = seconds.get(f"attention_{kind}", 0.0) + best
    print(json.dumps({"preset": args.preset, "context": seq, "batch_size": bsz, "step_seconds": step, **seconds,
                      "attention_share": sum(seconds.values()) / step}))


if __name__ == "__main__":
    main()
