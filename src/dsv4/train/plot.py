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
    return latest_per_step(records)


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last written, in step order: a run resumed from a checkpoint older than its last
    logged step writes those steps again, and the resumed values are the ones its weights come from."""
    by_step = {}
    for r in records:
        if "step" not in r:
            raise ValueError(f"metrics record without a step: {str(r)[:80]}")
        by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def window_load_ratios(records: list[dict], window: int = 100) -> tuple[list[float], int]:
    """Per learned-routing layer, busiest / mean expert load of the loads summed over the last ``window`` steps
    (fewer when the run is shorter), and the number of steps used."""
    records = [r for r in latest_per_step(records) if r.get("expert_loads")]
    if not records:
        raise ValueError("no step recorded expert loads (no learned-routing layer?)")
    last = [r for r in records if r["step"] > records[-1]["step"] - window]
    n_layers = len(last[-1]["expert_loads"])
    ratios = []
    for layer in range(n_layers):
        totals = [sum(col) for col in zip(*(r["expert_loads"][layer] for r in last))]
        mean = sum(totals) / len(totals)
        ratios.append(max(totals) / mean if mean > 0 else 0.0)
    return ratios, len(last)


def plot_run(run: str | Path, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = read_metrics(run)
    records = [r for r in everything if "lm_loss" in r]  # training steps (step 0 holds the first validation)
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(steps, [r["lm_loss"] for r in records], label="train (next token)", lw=1)
    if any("mtp_loss" in r for r in records):
        ax1.plot(steps, [r.get("mtp_loss") for r in records], label="train (MTP, token after next)", lw=1,
                 alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in everything if r.get("val_loss") is not None]
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
    run_path = Path(args.run)
    out = args.out or (run_path / "curves.png" if run_path.is_dir() else run_path.with_name("curves.png"))
    print(f"wrote {plot_run(args.run, out)}")
    return 0
