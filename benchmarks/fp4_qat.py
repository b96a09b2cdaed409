"""FP4 quantization-aware training on the tiny preset: what real FP4 experts cost a model trained with and without it.

    python benchmarks/fp4_qat.py [--out runs/fp4] [--seeds 0,1] [--steps 200 --lr 1e-2 --seq-len 128 --batch-size 8]
                                 [--threads 1] [--save]

For each seed, trains the tiny preset on the stdlib twice with the same seed, data and steps: once with
``--fp4-qat`` and once without (``dsv4 train``), then evaluates each with real FP4 routed experts
(``dsv4 eval --fp4``: the whole validation split, the experts' weights MXFP4 quantize-dequantized once). Prints one
JSON object: per seed the QAT model's validation loss in training, as trained (QAT forward) and with real FP4 experts,
and the non-QAT model's float validation loss and post-hoc FP4 validation loss, each FP4 figure with its relative
difference; then a summary over the seeds. Issue targets: the QAT model with real FP4 experts within 1% of its loss
as trained; the non-QAT model measurably worse after post-hoc quantization (positive for every seed and above the
QAT model's largest |difference|).

For the non-QAT model the FP4 change is also split (``decompose``) into a first-order part, whose sign is set by the
run, and the second-order cost of an error that size, with the loss without routed experts for scale. Each model's
``fp4_kl`` / ``fp4_top1_agreement`` say how far real FP4 moves its predictions from the model as trained (zero and 1
for a QAT model, whose forward already ran the FP4 weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # imported by tests too, not only run as a script
from run_all import report_experiment  # noqa: E402


def summarize(seeds: list[dict]) -> dict:
    """Over the per-seed records: the non-QAT models' post-hoc FP4 relative differences (mean, min, max), the QAT
    models' largest |difference|, and ``non_qat_measurably_worse``: every non-QAT difference positive and above
    that largest |QAT difference|."""
    plain = [s["no_qat"]["fp4_rel_diff"] for s in seeds]
    qat = [abs(s["qat"]["fp4_rel_diff"]) for s in seeds]
    decomp = [s["no_qat"]["decomposition"] for s in seeds if "decomposition" in s["no_qat"]]
    return {
        "seeds": len(seeds),
        "no_qat_fp4_rel_diff_mean": sum(plain) / len(plain), "no_qat_fp4_rel_diff_min": min(plain),
        "no_qat_fp4_rel_diff_max": max(plain), "qat_fp4_rel_diff_abs_max": max(qat),
        "qat_within_1pct": max(qat) <= 0.01,
        "non_qat_measurably_worse": min(plain) > 0 and min(plain) > max(qat),
        # which FP4 model is the better one in the end (the QAT one, when the loss of QAT is small)
        # the non-QAT FP4 change split into its first-order part (sign set by the run) and its second-order cost
        **({"no_qat_first_order_rel": [d["first_order_rel"] for d in decomp],
            "no_qat_second_order_rel": [d["second_order_rel"] for d in decomp]} if decomp else {}),
        # how far real FP4 moves each model's predictions from the model as trained (KL per token, top-1 kept)
        **({"qat_fp4_kl_max": max(s["qat"]["fp4_kl"] for s in seeds),
            "no_qat_fp4_kl": [s["no_qat"]["fp4_kl"] for s in seeds],
            "no_qat_fp4_top1_agreement": [s["no_qat"]["fp4_top1_agreement"] for s in seeds]}
           if all("fp4_kl" in s[m] for s in seeds for m in ("qat", "no_qat")) else {}),
        "fp4_val_loss_qat_minus_no_qat_mean": sum(s["qat"]["fp4_val_loss"] - s["no_qat"]["fp4_val_loss"]
                                                  for s in seeds) / len(seeds),
    }


def decompose(model_dir: Path, max_batches: int | None, threads: int | None) -> dict:
    """Why post-hoc FP4 helps or hurts a non-QAT model: with e = fp4(w) - w for every routed-expert matrix, the loss
    at w + e (real FP4) and at w - e (the error reflected) split the change into a first-order part
    (L(w+e) - L(w-e)) / 2, whose sign depends on the run, and a second-order part (L(w+e) + L(w-e)) / 2 - L(w), the
    cost any quantization error of that size has; relative to L(w), on the batches ``dsv4 eval`` used. Also the loss
    with the routed experts removed (their weights zero): how much the experts matter at all."""
    import torch

    import dsv4
    from dsv4.data import load_shards, load_tokenizer
    from dsv4.evaluate import read_training_meta, validation_batches
    from dsv4.train.loop import validation_loss
    from dsv4.train.qat import expert_modules, fp4_expert_weights

    if threads:
        torch.set_num_threads(threads)
    model = dsv4.from_pretrained(model_dir)
    meta = read_training_meta(model_dir)
    batches = validation_batches(load_shards(model_dir.parent / "shards"), seq_len=meta["seq_len"],
                                 batch_size=meta["batch_size"], max_batches=max_batches, seed=meta["seed"])
    token_bytes = load_tokenizer(model_dir / "tokenizer.json").token_bytes()
    experts = expert_modules(model)
    masters = [[w.detach().clone() for w in (m.w1, m.w2, m.w3)] for m in experts]
    errors = [[q - w for q, w in zip(fp4_expert_weights(m), ws)] for m, ws in zip(experts, masters)]

    def loss_with(sign: float | None) -> float:
        with torch.no_grad():
            for m, ws, es in zip(experts, masters, errors):
                for p, w, e in zip((m.w1, m.w2, m.w3), ws, es):
                    p.copy_(torch.zeros_like(w) if sign is None else w + sign * e)
        return validation_loss(model, batches, token_bytes)[0]

    base = loss_with(0.0)
    plus, minus, zero = loss_with(1.0), loss_with(-1.0), loss_with(None)
    return {"decomposition_batches": len(batches), "float_val_loss": base, "fp4_rel_diff": plus / base - 1,
            "reflected_rel_diff": minus / base - 1, "first_order_rel": (plus - minus) / 2 / base,
            "second_order_rel": ((plus + minus) / 2 - base) / base, "no_routed_experts_rel_diff": zero / base - 1,
            "fp4_weight_rel_error": float(sum(e.norm() ** 2 for es in errors for e in es).sqrt()
                                          / sum(w.norm() ** 2 for ws in masters for w in ws).sqrt())}


def _run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reuse_data(src: Path, dst: Path, shards: bool) -> None:
    """Copy a finished run's tokenizer (and ``shards``) into a fresh run directory: ``dsv4 train`` re-uses them
    (checking that the shards match its corpus, tokenizer and seed), so a pair trains on identical tokens."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "tokenizer.json", dst / "tokenizer.json")
    if shards:
        shutil.copytree(src / "shards", dst / "shards")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/fp4")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; each trains one QAT and one non-QAT model")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bias-speed", type=float, default=1e-2)
    p.add_argument("--eval-batches", type=int, default=32, help="validation batches for dsv4 eval (0: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each train / eval process")
    p.add_argument("--save", action="store_true", help="also write the JSON to benchmarks/results/")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        p.error("--seeds: at least one seed")
    out = Path(args.out)
    threads = ["--threads", str(args.threads)] if args.threads else []
    t0 = time.perf_counter()
    per_seed = []
    first: Path | None = None  # the first run: its tokenizer is everyone's (BPE training is seed-independent)
    for seed in seeds:
        record: dict = {"seed": seed}
        for mode in ("qat", "no_qat"):
            run_dir = out / f"seed{seed}-{mode}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a fresh run each time: dsv4 train refuses old checkpoints
            if mode == "no_qat":
                _reuse_data(out / f"seed{seed}-qat", run_dir, shards=True)  # the QAT twin's tokens
            elif first is not None:
                _reuse_data(first, run_dir, shards=False)  # another seed: another split of the corpus
            train = _run_json([
                sys.executable, "-m", "dsv4", "train", "--preset", "tiny", "--data", "stdlib", "--steps",
                str(args.steps), "--lr", str(args.lr), "--seq-len", str(args.seq_len), "--batch-size",
                str(args.batch_size), "--bias-speed", str(args.bias_speed), "--seed", str(seed), "--val-every",
                str(args.steps), "--ckpt-every", str(args.steps + 1), "--out", str(run_dir), "--json", "--quiet",
                *threads, *(["--fp4-qat"] if mode == "qat" else [])])
            first = first or run_dir
            ev = _run_json([sys.executable, "-m", "dsv4", "eval", "--model", str(run_dir / "model"), "--fp4",
                            "--json", *threads,
                            *(["--batches", str(args.eval_batches)] if args.eval_batches else [])])
            fig = {"training_val_loss": train["val_loss"], "val_loss": ev["val_loss"],
                   "fp4_val_loss": ev["fp4_val_loss"], "fp4_rel_diff": ev["fp4_rel_diff"],
                   "fp4_kl": ev["fp4_kl"], "fp4_top1_agreement": ev["fp4_top1_agreement"],
                   "val_bits_per_byte": ev["val_bits_per_byte"], "fp4_val_bits_per_byte": ev["fp4_val_bits_per_byte"],
                   "eval_tokens": ev["tokens"], "train_seconds": train["seconds"],
                   "final_train_loss": train.get("final_loss")}
            if mode == "qat":
                fig["float_val_loss"] = ev["float_val_loss"]  # the masters without quantization
            if mode == "no_qat":
                fig["decomposition"] = decompose(run_dir / "model", args.eval_batches or None, args.threads)
            record[mode] = fig
            print(f"seed {seed} {mode}: val {fig['val_loss']:.4f}, real FP4 {fig['fp4_val_loss']:.4f} "
                  f"({100 * fig['fp4_rel_diff']:+.3f}%)", file=sys.stderr, flush=True)
        per_seed.append(record)
    result = {
        "experiment": "fp4_qat",
        "command": " ".join(["python", "benchmarks/fp4_qat.py"] + sys.argv[1:]),
        "preset": "tiny", "data": "stdlib", "steps": args.steps, "lr": args.lr, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "bias_speed": args.bias_speed, "per_seed": per_seed,
        **summarize(per_seed), "seconds": time.perf_counter() - t0}
    report_experiment(result, "fp4", args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
