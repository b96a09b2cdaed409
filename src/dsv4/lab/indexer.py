"""``dsv4 lab indexer``: does the lightning indexer learn to pick what attention needs, so that sparse attention
costs no quality?

The lab form of ``benchmarks/indexer_schedule.py`` (its full run on the tiny preset is in ``docs/benchmarks.md``):
a small model with a CSA layer (compression rate 4, top-k 8 of the 32 compressed entries a 128-token row holds;
``--quick``: 64-token rows) is trained with V4's sparse-attention schedule (spec 6.2, 6.6): dense CSA attention while
the indexer learns by its KL to the main attention, then an indexer warm-up with the rest frozen, then top-k
attention. Figures: the indexer's recall of the main attention's top-k at the start, at the end of the dense phase
and at the end of the warm-up (``Losses.indexer_recall``), and the final model's validation loss with sparse
attention against the same model with dense CSA attention.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dsv4.lab.common import LabOptions, lab_data, save_figure, train_run, verdict

THREADS = 1  # a tiny model: a second thread costs more than it brings on a busy CPU
TITLE = "the lightning indexer learns the main attention's choice; sparse attention costs no quality"
SPEC = ("\"attention sparsity: dense attention for the first 1T tokens; sparse attention introduced at the 64K stage "
        "after a short lightning-indexer warm-up, then kept\" (docs/spec.md, section 6.2)")
THRESHOLD = ("the indexer's recall of the main attention's top-k is at least 0.7 after the warm-up, and the model's "
             "validation loss with sparse attention is within 2% of the same model with dense CSA attention")


def sizes(quick: bool) -> dict:
    if quick:
        return dict(dense=3, warmup=2, steps=6, batch_size=2, seq_len=64, vocab=384, val_batches=1, hidden=32)
    return dict(dense=80, warmup=40, steps=160, batch_size=8, seq_len=128, vocab=1024, val_batches=4, hidden=64)


def model_config(vocab: int, hidden: int):
    from dsv4.config import CSA, HASH_MOE, MOE, SLIDING, ModelConfig

    return ModelConfig.preset("tiny").replace(
        vocab_size=vocab, hidden_size=hidden, moe_intermediate_size=hidden, num_hidden_layers=2,
        num_attention_heads=2, head_dim=32, q_lora_rank=32, o_groups=1, o_lora_rank=32,
        layer_types=[SLIDING, CSA], mlp_layer_types=[HASH_MOE, MOE], n_routed_experts=4, num_experts_per_tok=2,
        sliding_window=16, compress_rates={CSA: 4}, index_n_heads=4, index_head_dim=32, index_topk=8,
        num_nextn_predict_layers=0)


def run(options: LabOptions) -> dict:
    import dsv4

    s = sizes(options.quick)
    data = lab_data(options, s["vocab"])
    torch.manual_seed(options.seed)
    model = dsv4.Transformer(model_config(data.vocab_size, s["hidden"]))
    recall: list[float] = []
    options.log(f"indexer lab: {s['dense']} dense, {s['warmup']} warm-up, {s['steps'] - s['dense'] - s['warmup']} "
                "sparse steps ...")
    curves = train_run(model, data, steps=s["steps"], lr=3e-3, batch_size=s["batch_size"], seq_len=s["seq_len"],
                       val_batches=s["val_batches"], seed=options.seed, bias_speed=1e-2,
                       dense_steps=s["dense"], indexer_warmup_steps=s["warmup"],
                       on_step=lambda trainer, step, r: recall.append(r.indexer_recall))
    val = data.val(s["batch_size"], s["seq_len"], s["val_batches"], options.seed)
    from dsv4.train.loop import validation_loss

    sparse = validation_loss(model, val)[0]
    model.set_indexer_phase(sparse=False, train_indexer=False)
    dense = validation_loss(model, val)[0]

    def at(step: int) -> float | None:
        x = recall[step - 1] if 0 < step <= len(recall) else float("nan")
        return x if math.isfinite(x) else None

    after_warmup = at(s["dense"] + s["warmup"])
    rel = sparse / dense - 1
    recall_ok = after_warmup is not None and after_warmup >= 0.7
    loss_ok = rel <= 0.02
    why = (f"the indexer's recall after the warm-up is {'-' if after_warmup is None else f'{after_warmup:.3f}'} "
           f"({'at least' if recall_ok else 'below'} 0.7); sparse attention's validation loss {sparse:.4g} against "
           f"dense CSA's {dense:.4g} ({100 * rel:+.2f}%, {'within' if loss_ok else 'beyond'} 2%)")
    return {"steps": s["steps"], "dense_steps": s["dense"], "indexer_warmup_steps": s["warmup"],
            "batch_size": s["batch_size"], "seq_len": s["seq_len"], "corpus": data.corpus,
            "recall_at_init": at(1), "recall_end_of_dense": at(s["dense"]), "recall_end_of_warmup": after_warmup,
            "val_loss_sparse": sparse, "val_loss_dense_attention": dense, "sparse_vs_dense": rel,
            **verdict(recall_ok and loss_ok, why), "recall": recall, "loss": curves.loss}


def plot(result: dict, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    recall = [float("nan") if x is None else x for x in result["recall"]]
    axes[0].plot(range(1, len(recall) + 1), recall, lw=1)
    axes[0].set_title("indexer recall of the main attention's top-k")
    axes[1].plot(range(1, len(result["loss"]) + 1), result["loss"], lw=1)
    axes[1].set_title("training loss (the warm-up trains the indexer alone)")
    for ax in axes:
        ax.axvline(result["dense_steps"], color="gray", ls=":")
        ax.axvline(result["dense_steps"] + result["indexer_warmup_steps"], color="gray", ls=":")
        ax.set_xlabel("step (dense | warm-up | sparse)")
    return [save_figure(fig, prefix, "recall")]
