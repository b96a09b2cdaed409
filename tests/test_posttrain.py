"""Post-training: the domains and their rewards, sampling, SFT, GRPO and on-policy distillation, `dsv4 posttrain`."""

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F

from dsv4 import ModelConfig, Transformer, cli, from_pretrained
from dsv4.generate import generate
from dsv4.posttrain.grpo import group_advantages, grpo_loss, token_logprobs
from dsv4.posttrain.opd import opd_loss, reverse_kl
from dsv4.posttrain.rollout import (Rollout, completion_logits, completion_mask, pad_prompts, rollout_logits,
                                   sample)
from dsv4.posttrain.run import train_opd, train_sft
from dsv4.posttrain.sft import sft_loss
from dsv4.posttrain.tasks import EOS, SEP, TASKS, decode, encode, task
from lively import lively
from numerics import assert_close_scaled

SMALL = dict(vocab_size=64, hidden_size=64, moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             head_dim=32, q_lora_rank=32, o_lora_rank=32, index_head_dim=16, index_n_heads=2,
             layer_types=["sliding_attention", "compressed_sparse_attention"],
             mlp_layer_types=["hash_moe", "moe"])


def model(seed=0, dtype=torch.float32):
    """A lively SMALL model; float64 for the tests that compare two computation orders (batched against alone, two
    ways to one gradient): there they agree to ~1e-15 on any CPU or GPU, and greedy picks cannot flip on a near tie."""
    torch.manual_seed(seed)
    return lively(Transformer(ModelConfig.preset("tiny").replace(**SMALL))).to(dtype)


def test_tasks_draw_prompts_with_their_answers_and_reward_exact_answers():
    g = torch.Generator().manual_seed(0)
    for t in TASKS.values():
        prompts, answers = t.sample(5, g)
        assert prompts.shape == (5, t.prompt_len) and answers.shape == (5, t.answer_len)
        assert (prompts[:, 0] == t.marker).all() and (prompts[:, -1] == SEP).all() and (answers[:, -1] == EOS).all()
        assert t.reward(prompts, answers).tolist() == [1.0] * 5
        junk = torch.cat([answers, torch.full((5, 3), 7)], dim=1)  # tokens after EOS do not count
        assert t.reward(prompts, junk).tolist() == [1.0] * 5
        wrong = answers.clone()
        wrong[:, 0] = wrong[:, 0] % 30 + 3 + (wrong[:, 0] % 30 + 3 == wrong[:, 0])  # another symbol
        assert t.reward(prompts, wrong).tolist() == [0.0] * 5
        padded = torch.cat([prompts, torch.zeros(5, 2, dtype=torch.long)], dim=1)  # a rollout's right padding
        assert t.reward(padded, answers).tolist() == [1.0] * 5
        no_eos = answers.clone()
        no_eos[:, -1] = encode("a")[0]
        assert t.reward(prompts, no_eos).tolist() == [0.0] * 5
    assert task("reverse").answer("abc") == "cba" and task("sort").answer("312") == "123"
    assert task("shift").answer("azb") == "bac"
    assert decode(encode("ab9") + [EOS, 5]) == "ab9$"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task("nope")
    with pytest.raises(ValueError, match="outside the task alphabet"):
        encode("aB")


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    tokens = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, 5, 5, 5]])
    assert completion_mask(tokens, EOS).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert completion_mask(tokens, None).tolist() == [[1] * 4] * 3


def test_greedy_rollouts_are_generate_rows_and_the_mode_comes_back():
    m = model(dtype=torch.float64).train()
    prompts = torch.randint(3, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    r = sample(m, prompts, 9, temperature=0)
    assert m.training
    assert r.tokens.shape == (3, 9) and r.mask.sum() == 27
    for i in range(3):
        assert r.tokens[i].tolist() == generate(m.eval(), prompts[i:i + 1], 9, temperature=0)[0, 6:].tolist()
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(m, prompts, 0)


def test_prompts_of_different_lengths_give_each_rows_own_completion_and_logits():
    m = model(dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 40, (n,), generator=g) for n in (5, 9, 5, 7)]
    r = sample(m, prompts, 6, temperature=0)
    assert r.prompts.shape == (4, 9) and r.prompt_lens.tolist() == [5, 9, 5, 7]
    for i, p in enumerate(prompts):
        assert r.tokens[i].tolist() == generate(m.eval(), p.unsqueeze(0), 6, temperature=0)[0, len(p):].tolist()
    batched = rollout_logits(m, r)  # one forward, each completion right after its prompt, padding after
    for i, p in enumerate(prompts):
        alone = completion_logits(m, p.unsqueeze(0), r.tokens[i:i + 1])
        assert batched.dtype == torch.float64
        assert_close_scaled(batched[i:i + 1], alone)
    sub = r.rows(torch.tensor([1, 3]))
    assert sub.prompt_lens.tolist() == [9, 7] and torch.equal(sub.tokens, r.tokens[[1, 3]])
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([torch.tensor([4, 5]), torch.tensor([], dtype=torch.long)])


def test_sampling_stops_once_every_row_has_ended_and_pads_with_eos():
    m = model()
    # every row's argmax is EOS from the first token on
    m.head.register_forward_hook(lambda mod, inp, out: out.index_fill(-1, torch.tensor([EOS]), 1e4))
    r = sample(m, torch.randint(3, 40, (2, 4)), 5, temperature=0, eos=EOS)
    assert r.tokens.tolist() == [[EOS] * 5] * 2 and r.mask.tolist() == [[1, 0, 0, 0, 0]] * 2


def test_sft_loss_is_the_cross_entropy_of_the_answer_tokens_only():
    m = model()
    prompts, answers = torch.randint(3, 40, (2, 5)), torch.randint(3, 40, (2, 4))
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    logits = m(torch.cat([prompts, answers], 1))[:, 4:8]  # positions 4..7 predict the answer's tokens
    nll = F.cross_entropy(logits.transpose(1, 2), answers, reduction="none")
    assert_close_scaled(sft_loss(m, prompts, answers, mask).detach(), ((nll * mask).sum() / 6).detach())
    assert_close_scaled(completion_logits(m, prompts, answers).detach(), logits.detach())


def test_sft_learns_a_domain():
    m = model()
    losses = train_sft(m, task("sort"), 30, 16, 3e-3, torch.Generator().manual_seed(0))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_reverse_kl_is_torch_kl_div_of_the_student_against_the_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    oracle = F.kl_div(torch.log_softmax(t, -1), torch.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(reverse_kl(s, t), oracle, atol=1e-6)
    assert (reverse_kl(s, t) > 0).all()
    s.requires_grad_(True)
    reverse_kl(s, s.detach() + 3.0).sum().backward()  # the same distribution (a shift of logits): KL and grad 0
    assert s.grad.abs().max() < 1e-6


def test_opd_loss_weighs_each_teachers_kl_on_its_own_rows():
    student, teachers = model(0), [model(1), model(2)]
    prompts = torch.randint(3, 40, (4, 5))
    tokens = torch.randint(3, 40, (4, 3))
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    rollout, owner = Rollout(prompts, tokens, mask), torch.tensor([0, 1, 1, 0])
    loss, per = opd_loss(student, teachers, rollout, owner, weights=[0.5, 2.0])
    s = completion_logits(student, prompts, tokens)
    want = []
    for i, teacher in enumerate(teachers):
        rows = owner == i
        kl = reverse_kl(s[rows], completion_logits(teacher, prompts[rows], tokens[rows])).detach()
        want.append(float((kl * mask[rows]).sum() / mask[rows].sum()))
    assert per == pytest.approx(want, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(0.5 * want[0] + 2.0 * want[1], rel=1e-5)
    loss.backward()
    assert all(p.grad is None for t in teachers for p in t.parameters())
    assert student.embed.weight.grad is not None
    same, _ = opd_loss(student, [student], rollout, torch.zeros(4, dtype=torch.long))
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="teacher index"):
        opd_loss(student, teachers, rollout, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="2 teachers but 1 weights"):
        opd_loss(student, teachers, rollout, owner, weights=[1.0])


def test_distillation_steps_bring_the_student_to_its_teacher_on_its_own_samples():
    student, teacher = model(0), model(1)
    losses = train_opd(student, [teacher], [task("sort")], 12, 16, 1e-2, torch.Generator().manual_seed(0))
    assert sum(losses[-3:]) / 3 < 0.65 * sum(losses[:3]) / 3  # the reverse KL: about 0.81 -> 0.46
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_group_advantages_standardize_within_each_group():
    a = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4)
    assert a[:4].tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-5)
    assert a[4:].tolist() == [0.0] * 4  # one reward for the whole group: no signal
    with pytest.raises(ValueError, match="prompts \\* 3"):
        group_advantages(torch.ones(8), 3)


def test_grpo_loss_on_policy_is_the_advantage_weighted_log_likelihood():
    m = model(dtype=torch.float64)
    prompts, tokens = torch.randint(3, 40, (4, 5)), torch.randint(3, 40, (4, 3))
    rollout = Rollout(prompts, tokens, torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]))
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    with torch.no_grad():
        old = token_logprobs(m, rollout)
    loss, stats = grpo_loss(m, rollout, adv, old)
    assert float(loss.detach()) == pytest.approx(-float(adv.mean()), abs=1e-5)  # the ratio is 1 on every token
    assert stats["clipped"] == 0.0
    assert float(grpo_loss(m, rollout, adv)[0].detach()) == pytest.approx(float(loss.detach()), abs=1e-6)
    loss.backward()
    grad = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad()
    logp = token_logprobs(m, rollout)  # the same gradient: -mean_rows A mean_tokens log pi
    (-(adv * (logp * rollout.mask).sum(1) / rollout.mask.sum(1)).mean()).backward()
    want = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(grad) == len(want) > 0
    for a, b in zip(grad, want):  # float64: each within 1e-9 of that parameter's largest gradient
        torch.testing.assert_close(a, b, atol=1e-9 * float(b.abs().max()), rtol=0)
    # a ratio beyond the clip with a positive advantage gives no gradient; the KL to the policy itself is 0
    m.zero_grad()
    loss, stats = grpo_loss(m, rollout, torch.ones(4), old - 1.0, ref_logprobs=old)
    assert stats["clipped"] == 1.0 and stats["kl"] == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in m.parameters())


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_posttrain_command_runs_the_pipeline_and_saves_the_models(tmp_path):
    config = tmp_path / "config.json"
    ModelConfig.preset("tiny").replace(**SMALL).to_json(config)
    rc, out, err = run_cli("posttrain", "--config", config, "--sft-steps", 2, "--rl-steps", 1, "--opd-steps", 2,
                           "--batch-size", 4, "--opd-batch-size", 4, "--group", 2, "--eval-prompts", 4,
                           "--teacher-weights", "1,0.5", "--out", tmp_path / "pt", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert list(result["accuracy"]) == ["base", "specialist-reverse after SFT", "specialist-reverse",
                                        "specialist-sort after SFT", "specialist-sort", "student"]
    assert all(0.0 <= v <= 1.0 for row in result["accuracy"].values() for v in row.values())
    assert set(result["grpo_reward_first_last"]) == {"reverse", "sort"}
    student = from_pretrained(tmp_path / "pt" / "student")
    assert student.config.vocab_size == 64
    assert json.loads((tmp_path / "pt" / "posttrain.json").read_text())["accuracy"] == result["accuracy"]
    assert result["teacher_weights"] == [1.0, 0.5]


@pytest.mark.parametrize("argv, message", [
    (("--tasks", "reverse,nope"), "unknown task 'nope'"),
    (("--opd-steps", -1), "--opd-steps must be >= 0"),
    (("--group", 0), "--group must be >= 1"),
    (("--tasks", ","), "--tasks names no domain"),
    (("--tasks", "sort,sort"), "--tasks names a domain twice"),
    (("--teacher-weights", "1"), "--teacher-weights needs one weight >= 0 per domain (2)"),
    (("--teacher-weights", "1,-1"), "--teacher-weights needs one weight >= 0 per domain"),
    (("--teacher-weights", "1,x"), "--teacher-weights must be numbers"),
    (("--base", "x", "--config", "y"), "--base and --config both name the base model"),
])
def test_posttrain_refuses_bad_input(argv, message):
    rc, _, err = run_cli("posttrain", *argv)
    assert rc == 2 and message in err


def test_posttrain_refuses_a_vocabulary_too_small_for_the_tasks(tmp_path):
    config = tmp_path / "config.json"
    ModelConfig.preset("tiny").replace(**dict(SMALL, vocab_size=20)).to_json(config)
    rc, _, err = run_cli("posttrain", "--config", config)
    assert rc == 2 and "smaller than the tasks' 42 token ids" in err


def test_docs_rows_of_a_posttrain_run_give_each_models_accuracy_per_domain():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"
    spec = importlib.util.spec_from_file_location("bench_run_all", path)
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    result = {"experiment": "posttrain", "command": "python benchmarks/posttrain.py --save", "commit": "abc",
              "sft_steps": 100, "rl_steps": 40, "opd_steps": 200,
              "accuracy": {"base": {"reverse": 0.0, "sort": 0.0}, "student": {"reverse": 0.99, "sort": 0.8125}}}
    rows = run_all._posttrain_rows(result)
    assert [r["model"] for r in rows] == ["base", "student"]
    assert rows[1]["accuracy"] == "reverse 0.990, sort 0.812" and rows[1]["steps"] == "100 / 40 / 200"
    lines = run_all._table("## Post-training", rows, [("model", "model"), ("accuracy", "accuracy")])
    assert lines[-2] == "| student | reverse 0.990, sort 0.812 | `python benchmarks/posttrain.py --save` |"
