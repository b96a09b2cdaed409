"""The ``dsv4`` command. Each subcommand lives in the module that owns its idea and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "demo": ("dsv4.demo",
             "pretrain the tiny preset on the stdlib for a few minutes, report validation and expert load, sample"),
    "train": ("dsv4.train.run", "pretrain a V4 model on a corpus (Muon, balancing, MTP, resumable)"),
    "generate": ("dsv4.generate", "sample from a saved model, streaming to the terminal"),
    "plot": ("dsv4.train.plot", "draw a run's loss and expert-load curves to PNG"),
    "bench": ("dsv4.bench", "prefill / decode benchmarks of V4 attention against dense attention (JSON)"),
    "convert": ("dsv4.convert", "rewrite a saved model in DeepSeek's official layout (FP8 + FP4 experts) or HF layout"),
    "eval": ("dsv4.evaluate", "validation loss of a saved model; --fp4: also with real FP4 routed experts"),
    "cost": ("dsv4.cost.report", "analytic per-token decode FLOPs and KV-cache bytes against V3.2, V3 and GQA-8"),
    "posttrain": ("dsv4.posttrain.run",
                  "specialists (SFT, GRPO) merged by on-policy distillation, on small verifiable domains"),
    "serve": ("dsv4.serve.cli", "the OpenAI API (chat and completions) on a saved model, with exact prefix reuse"),
    "chat": ("dsv4.serve.chat_cli", "a conversation with a saved model in the terminal, in V4's chat format"),
    "lab": ("dsv4.lab.cli", "the report's claims reproduced at small scale, each with its verdict (JSON, plots)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from dsv4.runtime import tune_allocator

    tune_allocator()
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
