"""dsv4 eval's figures for a QAT model; benchmarks/fp4_qat.py's summary and the docs row benchmarks/run_all.py makes
of it (no training here)."""

import contextlib
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed(seed, qat_diff, plain_diff, qat_val=4.0, plain_val=4.1):
    return {"seed": seed,
            "qat": {"val_loss": qat_val, "fp4_val_loss": qat_val * (1 + qat_diff), "fp4_rel_diff": qat_diff,
                    "training_val_loss": qat_val},
            "no_qat": {"val_loss": plain_val, "fp4_val_loss": plain_val * (1 + plain_diff),
                       "fp4_rel_diff": plain_diff}}


def test_summary_needs_every_seed_positive_and_above_the_qat_difference():
    fp4 = _load("fp4_qat")
    s = fp4.summarize([_seed(0, 0.0, 0.004), _seed(1, -0.0002, 0.002)])
    assert s["seeds"] == 2 and s["qat_within_1pct"] and s["non_qat_measurably_worse"]
    assert s["no_qat_fp4_rel_diff_mean"] == pytest.approx(0.003)
    assert s["no_qat_fp4_rel_diff_min"] == pytest.approx(0.002)
    assert s["qat_fp4_rel_diff_abs_max"] == pytest.approx(0.0002)
    assert s["fp4_val_loss_qat_minus_no_qat_mean"] < 0
    assert not fp4.summarize([_seed(0, 0.0, 0.0011), _seed(1, 0.0, -0.0013)])["non_qat_measurably_worse"]
    assert not fp4.summarize([_seed(0, 0.003, 0.002)])["non_qat_measurably_worse"]  # not above QAT's |diff|
    assert not fp4.summarize([_seed(0, 0.02, 0.05)])["qat_within_1pct"]


def test_docs_row_joins_the_seeds_in_order():
    fp4, run_all = _load("fp4_qat"), _load("run_all")
    seeds = [_seed(3, 0.0, 0.0042), _seed(4, 0.0, 0.0017)]
    result = {"experiment": "fp4_qat", "command": "python benchmarks/fp4_qat.py --seeds 3,4", "steps": 10,
              "lr": 0.01, "per_seed": seeds, **fp4.summarize(seeds)}
    row = run_all._fp4_row(result)
    assert row["seeds"] == "3, 4" and row["worse"] == "yes"
    assert row["plain_diff"] == "+0.420% / +0.170%" and row["qat_diff"] == "+0.000% / +0.000%"
    assert row["plain_val"] == "4.1000 / 4.1000" and row["plain_second"] == "-"
    for s, second in zip(seeds, (0.0003, -0.0001)):
        s["no_qat"]["decomposition"] = {"first_order_rel": 0.0, "second_order_rel": second}
    assert run_all._fp4_row(result)["plain_second"] == "+0.030% / -0.010%"
    assert run_all._fp4_row(result)["plain_kl"] == "-"  # results from before the KL was measured
    for s, kl in zip(seeds, (1.5e-4, 2.25e-4)):
        s["qat"].update(fp4_kl=0.0, fp4_top1_agreement=1.0)
        s["no_qat"].update(fp4_kl=kl, fp4_top1_agreement=0.987)
    row = run_all._fp4_row({**result, **fp4.summarize(seeds)})
    assert (row["qat_kl"], row["plain_kl"]) == ("0.0e+00 / 0.0e+00", "1.5e-04 / 2.2e-04")
    assert row["plain_top1"] == "98.70% / 98.70%"
    assert fp4.summarize(seeds)["no_qat_fp4_kl"] == [1.5e-4, 2.25e-4]
    lines = run_all._table("## FP4", [row], [("no QAT diff", "plain_diff")])
    assert lines[-2] == "| +0.420% / +0.170% | `python benchmarks/fp4_qat.py --seeds 3,4` |"


def test_eval_as_trained_runs_the_indexer_fp4_path_that_training_with_qat_ran():
    import torch

    import dsv4
    from dsv4.data import Batch
    from dsv4.evaluate import evaluate_model
    from dsv4.model.indexer import Indexer
    from dsv4.train.loop import validation_loss
    from dsv4.train.qat import enable_fp4_qat, enable_indexer_fp4, expert_modules

    torch.manual_seed(0)
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny").replace(vocab_size=100))
    tokens = torch.randint(0, 100, (1, 97), generator=torch.Generator().manual_seed(1))
    batches = [Batch(tokens, torch.zeros_like(tokens), torch.arange(97).expand(1, -1))]
    got = evaluate_model(model, batches, qat=True, fp4=True)
    # the switches are left as they were (off), and what `dsv4 train --fp4-qat` ran is what was measured
    assert not any(m.fp4_qat for m in expert_modules(model))
    assert not any(m.fp4_qk for m in model.modules() if isinstance(m, Indexer))
    enable_fp4_qat(model)
    experts_only = validation_loss(model, batches)[0]
    enable_indexer_fp4(model)
    assert got["val_loss"] == pytest.approx(validation_loss(model, batches)[0], rel=1e-6)
    assert got["val_loss"] != pytest.approx(experts_only, rel=1e-7)  # the indexer's FP4 path changed top-k
    assert got["fp4_rel_diff"] == pytest.approx(0, abs=1e-6)
    enable_fp4_qat(model, False)
    enable_indexer_fp4(model, False)
    assert got["float_val_loss"] == pytest.approx(validation_loss(model, batches)[0], rel=1e-6)


def test_prediction_shift_is_kl_and_top1_agreement():
    import torch

    import dsv4
    from dsv4.data import Batch
    from dsv4.evaluate import prediction_shift

    torch.manual_seed(0)
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny").replace(vocab_size=100))
    tokens = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    batches = [Batch(tokens, torch.zeros_like(tokens), torch.arange(40).expand(2, -1))]

    class Scaled:  # a change that sharpens every prediction: the head's weights doubled within the block
        def __init__(self, m):
            self.m = m

        def __enter__(self):
            self.m.head.weight.data.mul_(2)

        def __exit__(self, *exc):
            self.m.head.weight.data.div_(2)

    with torch.no_grad():
        logits = model(tokens)[:, :-1].flatten(0, 1)
    p, q = torch.log_softmax(logits, -1), torch.log_softmax(2 * logits, -1)
    kl, agree = prediction_shift(model, batches, Scaled)
    assert kl == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)
    assert agree == 1.0  # doubling the logits keeps every argmax
    assert prediction_shift(model, batches, lambda m: contextlib.nullcontext())[0] == 0.0


def test_docs_row_of_a_benchmark_is_the_median_run_at_its_newest_commit():
    """benchmarks/run_all.py reports, per command, the median run (by speedup; of two, the lower) among the runs at
    the commit of its newest run, with how many runs there were; older commits' runs are left out."""
    run_all = _load("run_all")
    runs = [{"commit": "a", "speedup_vs_dense": 9.0}, {"commit": "b", "speedup_vs_dense": 5.4},
            {"commit": "b", "speedup_vs_dense": 4.9}]
    assert run_all.median_run(runs) == {"commit": "b", "speedup_vs_dense": 4.9, "runs": 2}
    runs.append({"commit": "b", "speedup_vs_dense": 6.0})
    assert run_all.median_run(runs)["speedup_vs_dense"] == 5.4
    timed = [{"commit": "c", "seconds": 3.0}, {"commit": "c", "seconds": 4.0}]  # no dense: the slower of two
    assert run_all.median_run(timed) == {"commit": "c", "seconds": 4.0, "runs": 2}
