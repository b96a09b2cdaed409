"""``dsv4 lab mhc``: does mHC keep a deep residual stack stable where unconstrained hyper-connections do not?

A deep, thin model (32 sliding-window layers of width 32, four residual streams, two routed experts of which one is
chosen, and a shared one; 30 steps; ``--quick``: 6 layers, 8 steps) is trained three times on the same tokens from
the same initial weights, with AdamW (Muon's many small Newton-Schulz products per step would take most of the time
of so deep a model on two cores): with mHC (V4), with unconstrained hyper-connections (``hc_mode="hc"``: the same
streams, parameters and mixing without the Sinkhorn projection and the sigmoid bounds, started at mHC's initial
mixing) and with a plain residual; each at a normal and at a high learning rate (10x). Per run: the training loss
and gradient norm (before clipping) at every step, loss spikes (``dsv4.lab.common.spikes``), whether it diverged
(its last tenth of steps no lower than its first loss, or non-finite), the final validation loss, and the gain of
the composite residual mapping through depth on a fixed batch during training: the product, over the 2 L mixing
units, of each unit's comb^T (X_{l+1} = comb^T X_l + ...), per token; its forward gain is the largest absolute row
sum, its backward gain the largest absolute column sum (the mHC paper's "Amax gain magnitude"), the maximum over the
batch's tokens. Doubly-stochastic mixings keep both at 1; the report shows them exploding for hyper-connections.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dsv4.lab.common import LabOptions, adamw_only, lab_data, save_figure, spikes, train_run, verdict

THREADS = 1  # a tiny model: a second thread costs more than it brings on a busy CPU
TITLE = "mHC keeps a deep stack's residual mapping bounded"
SPEC = ("\"Paper form: X_{l+1} = B_l X_l + C_l F_l(A_l X_l) with B_l = comb^T doubly stochastic (spectral norm <= 1, "
        "closed under products)\" (docs/spec.md, section 3): the report's mHC constrains the residual mixing so that "
        "its composite through depth cannot grow, which broke unconstrained hyper-connection stacks.")
THRESHOLD = ("the gain of the composite residual mapping (forward or backward, the largest over training) of "
             "unconstrained hyper-connections exceeds mHC's tenfold at either learning rate, or hyper-connections "
             "diverge at a learning rate where mHC trains")
MODES = ("mhc", "hc", "residual")


def sizes(quick: bool) -> dict:
    if quick:
        return dict(layers=6, hidden=32, steps=8, batch_size=4, seq_len=32, vocab=384, lrs=(3e-3, 3e-2),
                    gain_every=4, val_batches=1)
    return dict(layers=32, hidden=32, steps=30, batch_size=4, seq_len=64, vocab=1024, lrs=(3e-3, 3e-2),
                gain_every=5, val_batches=2)


def model_config(vocab: int, layers: int, hidden: int, mode: str):
    from dsv4.config import MOE, SLIDING, ModelConfig

    return ModelConfig.preset("tiny").replace(
        vocab_size=vocab, hidden_size=hidden, moe_intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, head_dim=32, q_lora_rank=32, o_groups=1, o_lora_rank=32,
        layer_types=[SLIDING] * layers, mlp_layer_types=[MOE] * layers, n_routed_experts=2, num_experts_per_tok=1,
        sliding_window=32, num_nextn_predict_layers=0, hc_mode=mode)


@torch.no_grad()
def composite_gains(model, input_ids: torch.Tensor) -> dict:
    """The composite residual mapping's gains on ``input_ids``: per depth (after each mixing unit) the forward gain
    (largest absolute row sum) and backward gain (largest absolute column sum), the maximum over tokens, in float64."""
    from dsv4.model.hyper import HyperConnection

    combs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: combs.append(out[2].detach().double()))
             for layer in model.layers for m in layer.modules() if isinstance(m, HyperConnection)]
    was_training = model.training
    model.eval()
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = model.config.hc_mult
    total = torch.eye(n, dtype=torch.float64).expand(*combs[0].shape[:-2], n, n)
    forward, backward = [], []
    for comb in combs:
        total = comb.transpose(-1, -2) @ total
        a = total.abs()
        forward.append(float(a.sum(-1).amax()))
        backward.append(float(a.sum(-2).amax()))
    return {"forward": forward, "backward": backward}


def diverged(losses: list[float]) -> bool:
    """Non-finite at the end, or the last tenth of the steps no lower on average than the first step's loss."""
    tail = losses[-max(1, len(losses) // 10):]
    if any(x is None or not math.isfinite(x) for x in tail) or not math.isfinite(losses[0]):
        return True
    return sum(tail) / len(tail) >= losses[0]


def run(options: LabOptions) -> dict:
    s = sizes(options.quick)
    data = lab_data(options, s["vocab"])
    probe = data.val(s["batch_size"], s["seq_len"], 1, options.seed)[0].inputs  # the batch the gains are taken on
    runs: dict[str, dict] = {}
    for lr_name, lr in zip(("normal", "high"), s["lrs"]):
        for mode in MODES:
            torch.manual_seed(options.seed)
            import dsv4

            model = dsv4.Transformer(model_config(data.vocab_size, s["layers"], s["hidden"], mode))
            gains = {"steps": [0], "forward": [], "backward": []}
            first = composite_gains(model, probe)
            gains["forward"].append(first["forward"][-1])
            gains["backward"].append(first["backward"][-1])

            def on_step(trainer, step, r, gains=gains):
                if step % s["gain_every"] == 0 or step == s["steps"]:
                    g = composite_gains(trainer.model, probe)
                    gains["steps"].append(step)
                    gains["forward"].append(g["forward"][-1])
                    gains["backward"].append(g["backward"][-1])

            options.log(f"mhc lab: {mode} at lr {lr:g} ({s['layers']} layers, {s['steps']} steps) ...")
            curves = train_run(model, data, steps=s["steps"], lr=lr, batch_size=s["batch_size"],
                               seq_len=s["seq_len"], val_batches=s["val_batches"], on_step=on_step,
                               seed=options.seed, optimizer=adamw_only, anticipatory_routing=False)
            depth = composite_gains(model, probe)
            key = f"{mode}_{lr_name}"
            runs[key] = {"mode": mode, "lr": lr, **curves.to_dict(), "spikes": spikes(curves.loss),
                         "diverged": diverged(curves.loss), "final_val_loss": curves.val_loss[-1],
                         "gain_steps": gains["steps"], "forward_gain": gains["forward"],
                         "backward_gain": gains["backward"], "max_gain": max(gains["forward"] + gains["backward"]),
                         "final_gain_by_depth": depth}
            options.log(f"  val {curves.val_loss[-1]:.4f}, max gain {runs[key]['max_gain']:.4g}, "
                        f"spikes {runs[key]['spikes']}, diverged {runs[key]['diverged']}, {curves.seconds:.0f} s")
    ratios = {lr: runs[f"hc_{lr}"]["max_gain"] / runs[f"mhc_{lr}"]["max_gain"] for lr in ("normal", "high")}
    hc_diverges = [lr for lr in ("normal", "high")
                   if runs[f"hc_{lr}"]["diverged"] and not runs[f"mhc_{lr}"]["diverged"]]
    holds = max(ratios.values()) > 10 or bool(hc_diverges)
    summary = {
        "layers": s["layers"], "hidden_size": s["hidden"], "steps": s["steps"], "batch_size": s["batch_size"],
        "seq_len": s["seq_len"], "lrs": list(s["lrs"]), "corpus": data.corpus,
        **{f"{m}_{lr}_{what}": runs[f"{m}_{lr}"][key] for m in MODES for lr in ("normal", "high")
           for what, key in (("max_gain", "max_gain"), ("val_loss", "final_val_loss"), ("spikes", "spikes"),
                             ("diverged", "diverged"))},
        "hc_over_mhc_gain_normal": ratios["normal"], "hc_over_mhc_gain_high": ratios["high"],
        "hc_diverges_where_mhc_trains": hc_diverges,
    }
    if holds:
        why = (f"hyper-connections' composite gain reaches {max(ratios.values()):.3g}x mHC's "
               f"(normal lr {ratios['normal']:.3g}x, high lr {ratios['high']:.3g}x; mHC's largest "
               f"{max(runs[f'mhc_{lr}']['max_gain'] for lr in ('normal', 'high')):.4g})"
               + (f"; they diverge at the {' and '.join(hc_diverges)} lr where mHC trains" if hc_diverges else ""))
    else:
        why = (f"hyper-connections' composite gain stays within {max(ratios.values()):.3g}x mHC's (normal lr "
               f"{ratios['normal']:.3g}x, high lr {ratios['high']:.3g}x) and they diverge at no lr where mHC trains, "
               f"in {s['steps']} steps of a {s['layers']}-layer model: the unconstrained mixing has not drifted far "
               f"from its identity-like start in a run this short")
    return {**summary, **verdict(holds, why), "runs": runs}


def figures(result: dict) -> list[tuple[str, object]]:
    rows = [("model", f"{result['layers']} layers, width {result['hidden_size']}, 4 streams, AdamW"),
            ("training", f"{result['steps']} steps of {result['batch_size']} x {result['seq_len']} tokens "
                         f"({result['corpus']}), lr {result['lrs'][0]:g} (normal) and {result['lrs'][1]:g} (high)")]
    for lr in ("normal", "high"):
        for m in MODES:
            r = result["runs"][f"{m}_{lr}"]
            rows.append((f"{m}, {lr} lr", f"val loss {r['final_val_loss']:.4g}, largest composite gain "
                                          f"{r['max_gain']:.4g}, {r['spikes']} spikes, "
                                          f"{'diverged' if r['diverged'] else 'trained'}"))
    rows += [("HC / mHC gain (normal, high lr)",
              f"{result['hc_over_mhc_gain_normal']:.3g}x, {result['hc_over_mhc_gain_high']:.3g}x")]
    return rows


def plot(result: dict, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mhc": "tab:blue", "hc": "tab:red", "residual": "tab:gray"}
    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for col, lr in enumerate(("normal", "high")):
        for m in MODES:
            r = result["runs"][f"{m}_{lr}"]
            steps = range(1, len(r["loss"]) + 1)
            axes[0, col].plot(steps, [float("nan") if x is None else x for x in r["loss"]], color=colors[m],
                              label=m, lw=1)
            axes[1, col].plot(steps, [float("nan") if x is None else x for x in r["grad_norm"]], color=colors[m],
                              label=m, lw=1)
        axes[0, col].set_title(f"{lr} lr ({result['runs'][f'mhc_{lr}']['lr']:g}): training loss")
        axes[1, col].set_title("gradient norm before clipping")
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("step")
        axes[0, col].legend()
    fig.suptitle(f"{result['layers']}-layer model: mHC, unconstrained HC, plain residual")
    paths.append(save_figure(fig, prefix, "loss"))

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, lr in enumerate(("normal", "high")):
        for m in ("residual", "hc", "mhc"):  # mHC last: on top of the plain residual's 1
            r = result["runs"][f"{m}_{lr}"]
            axes[0, col].plot(r["gain_steps"], r["forward_gain"], color=colors[m], label=f"{m} forward")
            axes[0, col].plot(r["gain_steps"], r["backward_gain"], color=colors[m], ls="--", label=f"{m} backward")
            depth = r["final_gain_by_depth"]
            units = range(1, len(depth["forward"]) + 1)
            axes[1, col].plot(units, depth["forward"], color=colors[m], label=f"{m} forward")
            axes[1, col].plot(units, depth["backward"], color=colors[m], ls="--", label=f"{m} backward")
        axes[0, col].set_title(f"{lr} lr: composite gain through all layers, during training")
        axes[0, col].set_xlabel("step")
        axes[1, col].set_title("after training: composite gain up to each mixing unit")
        axes[1, col].set_xlabel("mixing unit (2 per layer)")
        for ax in axes[:, col]:
            ax.set_yscale("log")
        axes[0, col].legend(fontsize=7)
    paths.append(save_figure(fig, prefix, "gain"))
    return paths
