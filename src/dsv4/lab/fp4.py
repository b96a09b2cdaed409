"""``dsv4 lab fp4``: does FP4 quantization-aware training keep the experts' quality with real FP4 weights?

The lab form of ``benchmarks/fp4_qat.py`` (whose full runs on the tiny preset are in ``docs/benchmarks.md``): a
small MoE model (2 layers of width 64, 4 routed experts; ``--quick``: 1 layer of width 32) is trained twice on the
same tokens from the same initial weights, with FP4 QAT of the routed experts (``dsv4.train.qat.enable_fp4_qat``:
MXFP4 fake-quantized weights in the forward, straight-through gradient) and without; then each is evaluated as
trained and with real FP4 routed experts (``dsv4.evaluate.evaluate_model(..., fp4=True)``: the weights MXFP4
quantized and dequantized once, what an official FP4 checkpoint holds).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4.lab.common import LabOptions, lab_data, save_figure, train_run, verdict

THREADS = 1  # a tiny model: a second thread costs more than it brings on a busy CPU
TITLE = "FP4 quantization-aware training keeps the experts' quality in real FP4"
SPEC = ("\"FP4 QAT (post-training stage): applied to (1) MoE expert weights, (2) the CSA indexer QK path ... "
        "Backward: gradient w.r.t. the same FP8 weights, applied directly to FP32 master (straight-through "
        "estimator)\" (docs/spec.md, section 6.4)")
THRESHOLD = ("the QAT model with real FP4 experts is within 1% of its validation loss as trained, and the model "
             "trained without QAT loses more to post-hoc FP4 quantization than that (its relative loss change positive "
             "and above the QAT model's |change|)")


def sizes(quick: bool) -> dict:
    if quick:
        return dict(layers=1, hidden=32, steps=4, batch_size=4, seq_len=32, vocab=384, val_batches=1, lr=1e-2)
    return dict(layers=2, hidden=64, steps=150, batch_size=8, seq_len=64, vocab=1024, val_batches=8, lr=1e-2)


def model_config(vocab: int, layers: int, hidden: int):
    from dsv4.config import MOE, SLIDING, ModelConfig

    return ModelConfig.preset("tiny").replace(
        vocab_size=vocab, hidden_size=hidden, moe_intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, head_dim=32, q_lora_rank=32, o_groups=1, o_lora_rank=32,
        layer_types=[SLIDING] * layers, mlp_layer_types=[MOE] * layers, n_routed_experts=4, num_experts_per_tok=2,
        sliding_window=32, num_nextn_predict_layers=0)


def run(options: LabOptions) -> dict:
    import dsv4
    from dsv4.evaluate import evaluate_model
    from dsv4.train.qat import enable_fp4_qat

    s = sizes(options.quick)
    data = lab_data(options, s["vocab"])
    val = data.val(s["batch_size"], s["seq_len"], s["val_batches"], options.seed)
    token_bytes = data.tokenizer.token_bytes()
    figs = {}
    for name, qat in (("qat", True), ("no_qat", False)):
        torch.manual_seed(options.seed)
        model = dsv4.Transformer(model_config(data.vocab_size, s["layers"], s["hidden"]))
        if qat:
            enable_fp4_qat(model)
        options.log(f"fp4 lab: {name} ({s['steps']} steps) ...")
        curves = train_run(model, data, steps=s["steps"], lr=s["lr"], batch_size=s["batch_size"],
                           seq_len=s["seq_len"], val_batches=s["val_batches"], seed=options.seed, bias_speed=1e-2)
        ev = evaluate_model(model, val, token_bytes, qat=qat, fp4=True)
        figs[name] = {"val_loss": ev["val_loss"], "fp4_val_loss": ev["fp4_val_loss"],
                      "fp4_rel_diff": ev["fp4_rel_diff"], "fp4_kl": ev.get("fp4_kl"),
                      "fp4_top1_agreement": ev.get("fp4_top1_agreement"), "loss": curves.loss}
        options.log(f"  val {ev['val_loss']:.4f}, real FP4 {ev['fp4_val_loss']:.4f} ({100 * ev['fp4_rel_diff']:+.3f}%)")
    qat_diff, plain_diff = figs["qat"]["fp4_rel_diff"], figs["no_qat"]["fp4_rel_diff"]
    within = abs(qat_diff) <= 0.01
    worse = plain_diff > 0 and plain_diff > abs(qat_diff)
    why = (f"real FP4 experts change the QAT model's validation loss by {100 * qat_diff:+.3f}% "
           f"({'within' if within else 'beyond'} 1%) and the model trained without QAT by {100 * plain_diff:+.3f}% "
           f"({'more' if worse else 'not more'} than the QAT model's)")
    return {"layers": s["layers"], "hidden_size": s["hidden"], "steps": s["steps"], "batch_size": s["batch_size"],
            "seq_len": s["seq_len"], "lr": s["lr"], "corpus": data.corpus,
            "qat_val_loss": figs["qat"]["val_loss"], "qat_fp4_val_loss": figs["qat"]["fp4_val_loss"],
            "qat_fp4_rel_diff": qat_diff, "no_qat_val_loss": figs["no_qat"]["val_loss"],
            "no_qat_fp4_val_loss": figs["no_qat"]["fp4_val_loss"], "no_qat_fp4_rel_diff": plain_diff,
            "no_qat_fp4_kl": figs["no_qat"]["fp4_kl"],
            "no_qat_fp4_top1_agreement": figs["no_qat"]["fp4_top1_agreement"],
            **verdict(within and worse, why), "runs": figs}


def plot(result: dict, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in result["runs"].items():
        axes[0].plot(range(1, len(r["loss"]) + 1), r["loss"], lw=1, label=name)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    diffs = [100 * result["qat_fp4_rel_diff"], 100 * result["no_qat_fp4_rel_diff"]]
    axes[1].bar(["QAT", "no QAT"], diffs, color=["tab:blue", "tab:orange"])
    axes[1].axhline(0, color="gray", lw=0.5)
    axes[1].set_title("validation loss change with real FP4 experts (%)")
    return [save_figure(fig, prefix, "fp4")]


def figures(result: dict) -> list[tuple[str, object]]:
    from dsv4.lab.docs import default_figures

    cost = result["qat_val_loss"] / result["no_qat_val_loss"] - 1
    return default_figures(result) + [
        ("QAT's cost as trained (its loss against the float model's)", f"{100 * cost:+.2f}% (QAT from scratch "
         "here; V4 applies it in a post-training stage)")]
