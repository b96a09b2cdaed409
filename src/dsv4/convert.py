"""``dsv4 convert``: rewrite a saved model in another checkpoint layout (spec 9).

    dsv4 convert --to official --model DIR --out DIR2 [--experts fp4|fp8] [--no-fp8] [--dtype bfloat16]
    dsv4 convert --to hf --model DIR --out DIR2 [--dtype bfloat16]

``--model`` is anything ``dsv4.from_pretrained`` reads (HF or official layout; a ``dsv4 train`` run directory stands
for its ``model/``). ``official`` writes DeepSeek's released layout with ``save_official``: FP8 E4M3 matrices with
128x128 power-of-two block scales and the routed experts packed MXFP4 (``--experts fp8``: FP8, as the Base releases;
``--no-fp8``: the non-expert matrices unquantized). ``hf`` writes what transformers writes, with ``save_pretrained``:
plain floats, so converting an FP4 checkpoint to HF keeps exactly its (dequantized) FP4 values.

The other top-level files of the source directory (``tokenizer.json``, ``training.json``, ...) are copied, weights
and ``config.json`` excepted. ``--out`` is replaced atomically, and may be ``--model`` itself; an existing ``--out``
that is neither empty nor a model directory is never replaced.

A model trained with FP4 QAT (``dsv4.train.qat``) exports its experts to exactly the weights its forward used:
``dsv4.from_pretrained`` of the official directory returns ``fake_quant_fp4`` of the masters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LAYOUTS = ("official", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
_NOT_COPIED = {"config.json", "model.safetensors.index.json"}


def model_dir(path: str | Path) -> Path:
    """A model directory, or the ``model/`` of a ``dsv4 train`` run directory."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return path / "model"
    return path


def side_files(path: Path) -> dict[str, bytes]:
    """The top-level files of a model directory that are neither weights nor its config, by name."""
    out = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in _NOT_COPIED \
                and not f.name.endswith(_WEIGHT_SUFFIXES):
            out[f.name] = f.read_bytes()
    return out


def convert(model: str | Path, out: str | Path, to: str = "official", fp8: bool = True, fp4_experts: bool = True,
            dtype: torch.dtype | None = None, max_shard_bytes: int = 4 << 30) -> Path:
    """Load ``model`` (HF or official layout) and write it to ``out`` in layout ``to`` (``"official"`` or ``"hf"``),
    copying its side files (tokenizer and the like). ``fp8`` / ``fp4_experts`` / ``dtype`` are ``save_official``'s
    (``dtype`` alone for ``"hf"``). Returns the directory written."""
    import dsv4
    from dsv4.weights import save_official, save_pretrained
    from dsv4.atomic import write_directory_atomically

    if to not in LAYOUTS:
        raise ValueError(f"unknown layout {to!r}; choose one of {list(LAYOUTS)}")
    src = model_dir(model)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a model directory")
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").exists())):
        raise ValueError(f"{out} exists and is not a model directory (no config.json); refusing to replace it")
    loaded = dsv4.from_pretrained(src)
    extra = side_files(src)  # read before writing: --out may be --model

    def write(tmp: Path) -> None:
        staged = tmp / "weights"
        if to == "official":
            save_official(loaded, staged, fp8=fp8, fp4_experts=fp4_experts, dtype=dtype,
                          max_shard_bytes=max_shard_bytes)
        else:
            save_pretrained(loaded, staged, dtype=dtype, max_shard_bytes=max_shard_bytes)
        for f in staged.iterdir():
            f.rename(tmp / f.name)
        staged.rmdir()
        for name, data in extra.items():
            (tmp / name).write_bytes(data)

    write_directory_atomically(out, write)
    return out


# ------------------------------------------------------------------------------------------------------- the CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, choices=LAYOUTS,
                   help="official: DeepSeek's released layout (FP8 + FP4 experts); hf: transformers' layout (floats)")
    p.add_argument("--model", required=True, help="model directory (HF or official layout) or a `dsv4 train` run")
    p.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    p.add_argument("--experts", choices=("fp4", "fp8"), default=None,
                   help="official layout: routed experts as packed MXFP4 (instruct releases; the default) or FP8 "
                        "(Base releases)")
    p.add_argument("--no-fp8", action="store_true",
                   help="official layout: leave the non-expert matrices unquantized instead of FP8")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the unquantized tensors (default: as loaded, float32); the mHC, sink, ape and "
                        "router-bias tensors stay float32")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="shard the weights above this size")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.to == "hf" and (args.no_fp8 or args.experts):
        raise ValueError("--experts and --no-fp8 apply to --to official only; the HF layout holds plain floats")
    args.experts = args.experts or "fp4"
    if args.to == "official" and args.no_fp8 and args.experts == "fp8":
        raise ValueError("--experts fp8 stores the experts as FP8, which --no-fp8 turns off; drop one of them")
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    out = convert(args.model, args.out, to=args.to, fp8=not args.no_fp8, fp4_experts=args.experts == "fp4",
                  dtype=DTYPES[args.dtype] if args.dtype else None,
                  max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    files = sorted(f.name for f in out.iterdir())
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    if args.to == "official":
        experts = args.experts
        matrices = "plain" if args.no_fp8 else "fp8"
    else:
        experts = matrices = "plain"
    record = {"to": args.to, "model": str(model_dir(args.model)), "out": str(out), "experts": experts,
              "matrices": matrices, "dtype": args.dtype, "files": files, "weight_bytes": size}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"wrote {out} ({args.to} layout; experts {experts}, matrices {matrices}; "
              f"{size / 2**20:.1f} MiB of weights): {', '.join(files)}")
    return 0
