"""``dsv4 lab muon``: does Muon (V4's hybrid Newton-Schulz) reach AdamW's loss on fewer tokens?

A small model (2 layers of width 64, ``--quick``: 1 layer of width 32) is trained on the same tokens from the same
initial weights with the V4 optimizer pair (Muon for matrices, AdamW for embedding, head and vectors:
``dsv4.train.optim.build_optimizer``) and with plain AdamW on everything (``dsv4.lab.common.adamw_only``), each at
every learning rate of a small sweep, with the same warmup-stable-decay schedule. Each optimizer's best run is the
one with the lowest final validation loss (validation every ``val_every`` steps on ``val_batches`` batches).

The figure: the fewest tokens with which Muon, at its best learning rate, ends at or below the validation loss
AdamW's best run ends at. Muon is trained again on shorter budgets (``budgets``: fractions of AdamW's steps, the
largest first), each with its own full schedule (warmup, stable, decay), as a run of that length would be trained;
``token_ratio`` is the smallest budget that reaches AdamW's loss (the budgets stop at the first that does not).
When none does, the ratio is read off Muon's full-length run instead: the tokens at which its validation curve,
still before its decay, first reaches AdamW's final loss (linearly interpolated between validations), which is
conservative for Muon (``mid_schedule_ratio``, also reported when a budget reaches).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4.lab.common import LabOptions, adamw_only, lab_data, save_figure, train_run, verdict

THREADS = 1  # a tiny model: a second thread costs more than it brings on a busy CPU
TITLE = "Muon reaches AdamW's loss on fewer tokens"
SPEC = ("\"Muon params: everything else (attention/compressor/indexer matrices, router, experts, mHC fn matrices, MTP "
        "projections) ... update RMS rescaled to 0.18 (to reuse AdamW LR)\" (docs/spec.md, section 6.1): the report "
        "trains V4 with Muon for its faster convergence and stability.")
THRESHOLD = ("Muon's best run reaches the validation loss AdamW's best run ends at within 0.8x the tokens AdamW "
             "took (each at its best learning rate of the sweep)")


def sizes(quick: bool) -> dict:
    if quick:
        return dict(layers=1, hidden=32, steps=8, batch_size=4, seq_len=32, vocab=384, val_every=2, val_batches=1,
                    muon_lrs=(1e-2, 3e-2), adamw_lrs=(3e-3, 1e-2), budgets=(0.75, 0.5))
    return dict(layers=2, hidden=64, steps=300, batch_size=8, seq_len=64, vocab=1024, val_every=30, val_batches=16,
                muon_lrs=(1e-3, 3e-3, 1e-2), adamw_lrs=(3e-4, 1e-3, 3e-3, 1e-2), budgets=(0.8, 0.7, 0.6, 0.5))


def model_config(vocab: int, layers: int, hidden: int):
    from dsv4.config import HASH_MOE, MOE, SLIDING, ModelConfig

    return ModelConfig.preset("tiny").replace(
        vocab_size=vocab, hidden_size=hidden, moe_intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, head_dim=32, q_lora_rank=32, o_groups=1, o_lora_rank=32,
        layer_types=[SLIDING] * layers, mlp_layer_types=[HASH_MOE] + [MOE] * (layers - 1), n_routed_experts=4,
        num_experts_per_tok=2, sliding_window=32, num_nextn_predict_layers=0)


def tokens_to_reach(target: float, steps: list[int], losses: list[float], tokens_per_step: int) -> float | None:
    """The tokens after which a validation curve first reaches ``target``, linearly interpolated between the two
    validations around the crossing (from the untrained loss at step 0 for the first); None if it never does."""
    prev_step, prev = None, None
    for step, loss in zip(steps, losses):
        if loss is not None and loss <= target:
            if prev is None or prev_step is None:
                return float(step * tokens_per_step)
            frac = (prev - target) / (prev - loss) if prev != loss else 1.0
            return float((prev_step + frac * (step - prev_step)) * tokens_per_step)
        prev_step, prev = step, loss
    return None


def run(options: LabOptions) -> dict:
    import dsv4

    s = sizes(options.quick)
    data = lab_data(options, s["vocab"])
    config = model_config(data.vocab_size, s["layers"], s["hidden"])
    runs: dict[str, dict] = {}
    for name, lrs, factory in (("muon", s["muon_lrs"], None), ("adamw", s["adamw_lrs"], adamw_only)):
        for lr in lrs:
            torch.manual_seed(options.seed)
            model = dsv4.Transformer(config)
            options.log(f"muon lab: {name} at lr {lr:g} ({s['steps']} steps) ...")
            curves = train_run(model, data, steps=s["steps"], lr=lr, batch_size=s["batch_size"],
                               seq_len=s["seq_len"], val_batches=s["val_batches"], val_every=s["val_every"],
                               optimizer=factory, seed=options.seed)
            runs[f"{name}_{lr:g}"] = {"optimizer": name, "lr": lr, **curves.to_dict(),
                                      "final_val_loss": curves.val_loss[-1]}
            options.log(f"  val {curves.val_loss[-1]:.4f} ({curves.seconds:.0f} s)")

    def best(name):
        return min((r for r in runs.values() if r["optimizer"] == name),
                   key=lambda r: r["final_val_loss"] if r["final_val_loss"] is not None else float("inf"))

    muon, adamw = best("muon"), best("adamw")
    tps = s["batch_size"] * s["seq_len"]
    target = adamw["final_val_loss"]
    adamw_tokens = tokens_to_reach(target, adamw["val_steps"], adamw["val_loss"], tps)
    mid_tokens = tokens_to_reach(target, muon["val_steps"], muon["val_loss"], tps)
    mid_ratio = mid_tokens / adamw_tokens if mid_tokens is not None and adamw_tokens else None
    budgets, reached = {}, None  # reached: (fraction, final loss) of the smallest budget at or below the target
    for fraction in sorted(s["budgets"], reverse=True):  # the largest first; stop at the first that falls short
        steps = max(2, round(fraction * s["steps"]))
        torch.manual_seed(options.seed)
        model = dsv4.Transformer(config)
        options.log(f"muon lab: muon at lr {muon['lr']:g} on a budget of {steps} steps ({fraction:g}x) ...")
        curves = train_run(model, data, steps=steps, lr=muon["lr"], batch_size=s["batch_size"], seq_len=s["seq_len"],
                           val_batches=s["val_batches"], val_every=0, seed=options.seed)
        loss = curves.val_loss[-1]
        budgets[f"{fraction:g}"] = {"steps": steps, "tokens": steps * tps, "final_val_loss": loss,
                                    "seconds": curves.seconds}
        options.log(f"  val {loss:.4f} against AdamW's {target:.4f}")
        if loss is None or not loss <= target:  # a diverged (NaN) run falls short too
            break
        reached = (fraction, loss)
    ratio = reached[0] * s["steps"] * tps / adamw_tokens if reached and adamw_tokens else mid_ratio
    holds = ratio is not None and ratio <= 0.8
    shortest = min(budgets, key=float)
    if reached is not None:
        why = (f"Muon (lr {muon['lr']:g}) trained on {ratio:.2f}x AdamW's tokens ends at validation loss "
               f"{reached[1]:.4g}, at or below AdamW's {target:.4g} (lr {adamw['lr']:g}, {adamw_tokens:,.0f} tokens)")
    else:
        why = (f"Muon (lr {muon['lr']:g}) on {float(shortest):g}x AdamW's tokens ends at "
               f"{budgets[shortest]['final_val_loss']:.4g}, above AdamW's {target:.4g} (lr {adamw['lr']:g})")
        why += (f"; its full-length run's curve reaches AdamW's loss before its decay after {mid_ratio:.2f}x the "
                "tokens" if mid_ratio is not None else "; its full-length run never reaches AdamW's loss")
    why += f": {'at most' if holds else 'more than'} 0.8x"
    edges = [f"{r['optimizer']}'s best lr {r['lr']:g} is at the edge of its sweep" for r, lrs in
             ((muon, s["muon_lrs"]), (adamw, s["adamw_lrs"])) if r["lr"] in (min(lrs), max(lrs))]
    if edges:
        why += " (" + "; ".join(edges) + ")"
    return {"layers": s["layers"], "hidden_size": s["hidden"], "steps": s["steps"], "batch_size": s["batch_size"],
            "seq_len": s["seq_len"], "corpus": data.corpus, "muon_lrs": list(s["muon_lrs"]),
            "adamw_lrs": list(s["adamw_lrs"]), "muon_best_lr": muon["lr"], "adamw_best_lr": adamw["lr"],
            "muon_final_val_loss": muon["final_val_loss"], "adamw_final_val_loss": target,
            "target_val_loss": target, "adamw_tokens": adamw_tokens, "muon_tokens_to_target": mid_tokens,
            "mid_schedule_ratio": mid_ratio, "budgets": budgets, "token_ratio": ratio, **verdict(holds, why),
            "runs": runs}


def figures(result: dict) -> list[tuple[str, object]]:
    rows = [("model", f"{result['layers']} layers, width {result['hidden_size']}"),
            ("training", f"{result['steps']} steps of {result['batch_size']} x {result['seq_len']} tokens "
                         f"({result['corpus']})")]
    for r in result["runs"].values():
        rows.append((f"{r['optimizer']}, lr {r['lr']:g}", f"final validation loss {r['final_val_loss']:.4g}"))
    rows += [("target: AdamW's best final validation loss", result["target_val_loss"]),
             ("AdamW tokens", result["adamw_tokens"])]
    for fraction, b in result.get("budgets", {}).items():
        rows.append((f"muon on {fraction}x the steps ({b['tokens']:,} tokens, own schedule)",
                     f"final validation loss {b['final_val_loss']:.4g}"))
    rows += [("Muon's full run reaches the target before its decay after (tokens)", result["muon_tokens_to_target"]),
             ("ratio", result["token_ratio"])]
    return rows


def plot(result: dict, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    tps = result["batch_size"] * result["seq_len"]
    for r in result["runs"].values():
        best = r["lr"] == result[f"{r['optimizer']}_best_lr"]
        ax.plot([s * tps for s in r["val_steps"]], r["val_loss"], marker="o" if best else None, ms=3,
                color="tab:blue" if r["optimizer"] == "muon" else "tab:orange", alpha=1.0 if best else 0.35,
                label=f"{r['optimizer']} lr {r['lr']:g}" + (" (best)" if best else ""))
    ax.axhline(result["target_val_loss"], color="gray", ls=":", label="AdamW's final loss")
    if result["muon_tokens_to_target"] is not None:
        ax.axvline(result["muon_tokens_to_target"], color="tab:blue", ls=":")
    budgets = result.get("budgets", {}).values()
    if budgets:
        ax.plot([b["tokens"] for b in budgets], [b["final_val_loss"] for b in budgets], "D", color="tab:green",
                label="muon, shorter budgets (own schedule): final loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ratio = result["token_ratio"]
    ax.set_title("Muon vs AdamW: tokens to AdamW's final loss, ratio " + ("-" if ratio is None else f"{ratio:.3f}"))
    ax.legend(fontsize=7)
    return [save_figure(fig, prefix, "val")]
