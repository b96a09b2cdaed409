"""dsv4 eval's figures for a QAT model; benchmarks/fp4_qat.py's summary and the docs row benchmarks/run_all.py makes
of it (no training here)."""

import pytest


def test_eval_as_trained_runs_the_indexer_fp4_path_that_training_with_qat_ran():
    import torch

    import dsv4
    from dsv4.data import Batch
    from dsv4.evaluate import evaluate_model
    from dsv4.model.indexer import Indexer
    from dsv4.train.loop import evaluate
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
    experts_only = evaluate(model, batches)[0]
    enable_indexer_fp4(model)
    assert got["val_loss"] == pytest.approx(evaluate(model, batches)[0], rel=1e-6)
    assert got["val_loss"] != pytest.approx(experts_only, rel=1e-7)  # the indexer's FP4 path changed top-k
    assert got["fp4_rel_diff"] == pytest.approx(0, abs=1e-6)
    enable_fp4_qat(model, False)
    enable_indexer_fp4(model, False)
    assert got["float_val_loss"] == pytest.approx(evaluate(model, batches)[0], rel=1e-6)
