"""``dsv4 plot``: loss and expert-load curves of a run, from its metrics.jsonl, to PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {path}")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i} is not JSON: {e}") from None
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def plot_run(run: str | Path, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run)
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(steps, [r["lm_loss"] for r in records], label="train (next token)", lw=1)
    ax1.plot(steps, [r["mtp_loss"] for r in records], label="train (MTP, token after next)", lw=1, alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax1.plot(*zip(*val), "o-", label="validation")
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats per token")
    ax1.set_title("loss")
    ax1.legend()
    ratios = [r.get("max_load_ratio", []) for r in records]
    for layer in range(max((len(x) for x in ratios), default=0)):
        ax2.plot(steps, [x[layer] if layer < len(x) else None for x in ratios], lw=1, label=f"routed layer {layer}")
    ax2.axhline(1.0, color="gray", lw=0.5)
    ax2.set_xlabel("step")
    ax2.set_ylabel("busiest expert / mean load")
    ax2.set_title("expert load (learned-routing layers)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(p) -> None:
    p.add_argument("run", help="a run directory of `dsv4 train` (or its metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/curves.png)")


def run(args) -> int:
    out = args.out or str(Path(args.run) / "curves.png") if Path(args.run).is_dir() else args.out or "curves.png"
    print(f"wrote {plot_run(args.run, out)}")
    return 0
