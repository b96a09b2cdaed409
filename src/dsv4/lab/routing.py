"""``dsv4 lab routing``: does V4's routing (sqrt-softplus affinities, hash-routed first layers, the aux-loss-free
bias) balance the experts without costing loss?

One small MoE model (4 layers of width 64, 8 routed experts of which 2 are chosen; ``--quick``: 2 layers, 4 experts)
is trained six times on the same tokens from the same initial weights: router affinities sqrt(softplus) (V4),
sigmoid (V3) and softmax, each with its first layer hash-routed (V4) and with every layer learned; always with the
aux-loss-free bias (at the 10x speed ``dsv4 demo`` uses for runs this short) and the sequence-wise balance loss.
Load balance: per learned-routing layer, the busiest expert's load over the mean load of each step
(``dsv4.train.balance.load_imbalance``), averaged over the last quarter of the steps, then over the layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4.lab.common import LabOptions, lab_data, save_figure, train_run, verdict

THREADS = 1  # a tiny model: a second thread costs more than it brings on a busy CPU
TITLE = "sqrt-softplus routing with hash-routed first layers balances the experts"
SPEC = ("\"Affinity s_i = sqrt(softplus(u . e_i)) (FP32) ... Hash layers (0,1,2): K = tid2eid[token_id] ... "
        "Aux-loss-free balancing: after each step, per expert b_i <- b_i + gamma . sign(mean_load - load_i)\" "
        "(docs/spec.md, section 4): V4 replaces V3's sigmoid affinities by sqrt(softplus) and routes its first layers "
        "by a hash of the token.")
THRESHOLD = ("V4's routing (sqrt-softplus, hash-routed first layer) is within 1% of the best validation loss of the "
             "six variants and within 1.1x of the best load balance (busiest over mean expert, last quarter of "
             "training)")
FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


def sizes(quick: bool) -> dict:
    if quick:
        return dict(layers=2, hidden=32, experts=4, steps=5, batch_size=4, seq_len=32, vocab=384, val_batches=1)
    return dict(layers=4, hidden=64, experts=8, steps=80, batch_size=8, seq_len=64, vocab=1024, val_batches=4)


def model_config(vocab: int, s: dict, func: str, hashed: bool):
    from dsv4.config import HASH_MOE, MOE, SLIDING, ModelConfig

    layers = s["layers"]
    return ModelConfig.preset("tiny").replace(
        vocab_size=vocab, hidden_size=s["hidden"], moe_intermediate_size=s["hidden"], num_hidden_layers=layers,
        num_attention_heads=2, head_dim=32, q_lora_rank=32, o_groups=1, o_lora_rank=32,
        layer_types=[SLIDING] * layers, mlp_layer_types=[HASH_MOE if hashed and i == 0 else MOE for i in range(layers)],
        n_routed_experts=s["experts"], num_experts_per_tok=2, sliding_window=32, num_nextn_predict_layers=0,
        scoring_func=func)


def run(options: LabOptions) -> dict:
    import dsv4

    s = sizes(options.quick)
    data = lab_data(options, s["vocab"])
    runs: dict[str, dict] = {}
    for func in FUNCS:
        for hashed in (True, False):
            key = f"{func}_{'hash' if hashed else 'learned'}"
            torch.manual_seed(options.seed)
            model = dsv4.Transformer(model_config(data.vocab_size, s, func, hashed))
            options.log(f"routing lab: {key} ({s['steps']} steps) ...")
            curves = train_run(model, data, steps=s["steps"], lr=3e-3, batch_size=s["batch_size"],
                               seq_len=s["seq_len"], val_batches=s["val_batches"], seed=options.seed,
                               bias_speed=1e-2, mtp_weight=0.0, anticipatory_routing=False)
            tail = curves.max_load_ratio[-max(1, len(curves.max_load_ratio) // 4):]
            per_layer = [sum(step[i] for step in tail) / len(tail) for i in range(len(tail[0]))]
            runs[key] = {"scoring_func": func, "hash_first_layer": hashed, "final_val_loss": curves.val_loss[-1],
                         "imbalance_by_layer": per_layer, "imbalance": sum(per_layer) / len(per_layer),
                         "imbalance_curve": [sum(x) / len(x) for x in curves.max_load_ratio], "loss": curves.loss,
                         "seconds": curves.seconds}
            options.log(f"  val {curves.val_loss[-1]:.4f}, busiest / mean {runs[key]['imbalance']:.3f}")
    v4 = runs["sqrtsoftplus_hash"]
    best_loss = min(r["final_val_loss"] for r in runs.values())
    best_balance = min(r["imbalance"] for r in runs.values())
    loss_ok = v4["final_val_loss"] <= best_loss * 1.01
    balance_ok = v4["imbalance"] <= best_balance * 1.1
    why = (f"V4's routing: validation loss {v4['final_val_loss']:.4g} against the best {best_loss:.4g} "
           f"({'within' if loss_ok else 'more than'} 1%), busiest / mean expert {v4['imbalance']:.3g} against the "
           f"best {best_balance:.3g} ({'within' if balance_ok else 'more than'} 1.1x)")
    return {"layers": s["layers"], "hidden_size": s["hidden"], "experts": s["experts"], "steps": s["steps"],
            "batch_size": s["batch_size"], "seq_len": s["seq_len"], "corpus": data.corpus,
            **{f"{k}_val_loss": r["final_val_loss"] for k, r in runs.items()},
            **{f"{k}_imbalance": r["imbalance"] for k, r in runs.items()},
            "best_val_loss": best_loss, "best_imbalance": best_balance,
            **verdict(loss_ok and balance_ok, why), "runs": runs}


def figures(result: dict) -> list[tuple[str, object]]:
    rows = [("model", f"{result['layers']} layers, width {result['hidden_size']}, {result['experts']} experts, "
                      f"top-2; {result['steps']} steps of {result['batch_size']} x {result['seq_len']} tokens")]
    for key, r in result["runs"].items():
        rows.append((key.replace("_", ", "), f"val loss {r['final_val_loss']:.4g}, busiest / mean expert "
                                             f"{r['imbalance']:.3g}"))
    return rows


def plot(result: dict, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sqrtsoftplus": "tab:blue", "sigmoid": "tab:green", "softmax": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, r in result["runs"].items():
        ls = "-" if r["hash_first_layer"] else "--"
        axes[0].plot(range(1, len(r["imbalance_curve"]) + 1), r["imbalance_curve"], color=colors[r["scoring_func"]],
                     ls=ls, lw=1, label=key)
        axes[1].plot(range(1, len(r["loss"]) + 1), r["loss"], color=colors[r["scoring_func"]], ls=ls, lw=1, label=key)
    axes[0].set_title("busiest / mean expert load (learned layers)")
    axes[1].set_title("training loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return [save_figure(fig, prefix, "balance")]
