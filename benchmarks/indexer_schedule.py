"""The sparse-attention schedule on the tiny preset: does the indexer learn, and does sparse attention cost quality?

    python benchmarks/indexer_schedule.py [--out runs/indexer] [--steps 220 --dense 100 --warmup 60] [--save]

Trains with dense CSA attention, then an indexer warm-up (the rest frozen), then top-k attention, and prints one JSON
object: the indexer's recall of the main attention's top-k at its initialization, at the end of the dense phase and
at the end of the warm-up (from metrics.jsonl), and the final model's validation loss with sparse attention against
the same model with dense CSA attention. Issue targets: recall >= 0.7 after the warm-up; sparse within 2% of dense.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # imported by tests too, not only run as a script
from run_all import report_experiment  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/indexer")
    p.add_argument("--steps", type=int, default=220)
    p.add_argument("--dense", type=int, default=100)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--save", action="store_true", help="also write the JSON to benchmarks/results/")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "dsv4", "train", "--preset", "tiny", "--data", "stdlib", "--steps", str(args.steps),
           "--dense-steps", str(args.dense), "--indexer-warmup", str(args.warmup), "--seq-len", "256",
           "--batch-size", "8", "--bias-speed", "1e-2", "--val-every", "50", "--ckpt-every", "1000", "--out",
           args.out, "--json", "--quiet"]
    train = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    import dsv4
    from dsv4.data import PackedLoader, load_shards, load_tokenizer
    from dsv4.train.loop import validation_loss

    out = Path(args.out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    recall = {r["step"]: r["indexer_recall"] for r in records}
    model = dsv4.from_pretrained(out / "model")
    val = PackedLoader(load_shards(out / "shards"), "val", batch_size=8, seq_len=256, shuffle=False)
    batches = [next(val) for _ in range(8)]
    token_bytes = load_tokenizer(out / "model" / "tokenizer.json").token_bytes()
    sparse = validation_loss(model, batches, token_bytes)
    model.set_indexer_phase(sparse=False, train_indexer=False)
    dense = validation_loss(model, batches, token_bytes)
    result = {
        "experiment": "indexer_schedule",
        "command": " ".join(["python", "benchmarks/indexer_schedule.py"] + sys.argv[1:]),
        "recall_at_init": recall.get(1), "recall_end_of_dense": recall.get(args.dense),
        "recall_end_of_warmup": recall.get(args.dense + args.warmup),
        "val_loss_sparse": sparse[0], "val_loss_dense_attention": dense[0],
        "sparse_vs_dense": sparse[0] / dense[0] - 1, "val_bits_per_byte": sparse[1], "train": train}
    report_experiment(result, "indexer", args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
