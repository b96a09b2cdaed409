"""Training over several processes (gloo on CPU): FSDP2 + expert parallelism + distributed Muon equal one process;
the expert-parallel MoE equals the local one; distributed checkpoints resume at another rank count; a dead rank
fails the others with a clear error and leaves the last complete checkpoint intact.

Each test launches ranks as subprocesses of this file (``python tests/test_distributed.py SPEC``, with the
environment torchrun would give them) under a hard timeout, and compares against a single-process ``Trainer`` run
in the pytest process.

Gradients on two ranks agree with one process to ~1e-7 (float summation order). Two things amplify that, so the
weight comparisons run with AdamW eps 1e-8 (not the recipe's 1e-20) and lr 1e-4: at layer 0 the hc_mult streams are
copies of one embedding, so some mHC gradients are zero up to rounding (~1e-13 against ~1e-3), and with eps 1e-20
AdamW turns that noise into full +-lr steps whose sign no two summation orders agree on; and Newton-Schulz lifts the
near-zero singular directions of low-rank gradients (mHC, experts with few tokens), so Muon's update differs by a
fraction of lr there. The gradients themselves are compared directly, at 1e-5 relative.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4 import ModelConfig, Transformer
from dsv4.config import CSA, HASH_MOE, MOE, SLIDING
from dsv4.data.packing import Batch

STEPS = 4
ADAM_EPS = 1e-8
GLOBAL_BATCH = 4
SEQ = 32
VOCAB = 128
RUN_TIMEOUT_S = 180  # per launch; the process-group timeouts inside are shorter
PG_TIMEOUT_S = 60
DEAD_TIMEOUT_S = 120  # the process-group timeout of the run whose rank dies: failing sooner proves it did not wait


# ------------------------------------------------------------------------------------------------ shared pieces

def tiny_config() -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=VOCAB, num_hidden_layers=2, layer_types=[SLIDING, CSA],
                                              mlp_layer_types=[HASH_MOE, MOE])


def train_config(steps=STEPS, ckpt_every=2):
    from dsv4.train.loop import TrainConfig

    return TrainConfig(steps=steps, lr=1e-4, warmup_steps=1, val_every=0, ckpt_every=ckpt_every,
                       keep_checkpoints=5)


class Source:
    """A deterministic global batch of GLOBAL_BATCH rows per step, each rank taking its consecutive slice. Rows hold
    different numbers of documents, so the ranks see different numbers of valid targets."""

    def __init__(self, rank=0, world=1, seed=0):
        self.rank, self.world, self.seed, self.pos = rank, world, seed, 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.pos)
        self.pos += 1
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
        doc_ids = torch.zeros(GLOBAL_BATCH, SEQ + 1, dtype=torch.long)
        for row in range(GLOBAL_BATCH):
            for cut in torch.randint(1, SEQ, (1 + (row + self.pos) % 4,), generator=g).tolist():
                doc_ids[row, cut:] += 1
        b = GLOBAL_BATCH // self.world
        rows = slice(self.rank * b, (self.rank + 1) * b)
        return Batch(tokens[rows], doc_ids[rows], torch.zeros_like(tokens[rows]))

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def reference_trainer(out: Path):
    from dsv4.train.loop import Trainer
    from dsv4.train.optim import build_optimizer

    class RefTrainer(Trainer):
        def make_optimizer(self):
            return build_optimizer(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, eps=ADAM_EPS)

    return RefTrainer(new_model(), Source(), train_config(), out)


def distributed_trainer(par, model, data, cfg, out):
    from dsv4.parallel.trainer import DistributedTrainer

    class DistTrainer(DistributedTrainer):
        def make_optimizer(self):
            return self.parallel.build_optimizer(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                                 eps=ADAM_EPS)

    return DistTrainer(par, model, data, cfg, out)


def new_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config())


def read_losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


# ---------------------------------------------------------------------------------------------- the rank side

def _measured(what: str, got: torch.Tensor, want: torch.Tensor, **extra) -> dict:
    """One comparison as the test side reads it: the largest difference and the largest magnitude of ``want``."""
    return {"what": what, "dtype": str(want.dtype), "diff": float((got.detach() - want.detach()).abs().max()),
            "scale": float(want.detach().abs().max()), **extra}


def _ep_layer_check(par) -> list[dict]:
    """The expert-parallel MoE against the local MoE on each rank's own tokens, forward and backward, in float64
    (the MoE is float64 end to end there: two summation orders then agree to ~1e-15 on any CPU). Returns the
    measured differences; the test asserts them."""
    import torch.distributed as dist

    from dsv4.model.moe import MoE
    from dsv4.parallel.expert import expert_parallel

    cfg = tiny_config()
    rank, world = par.rank, par.world
    f64 = torch.float64
    results = []
    for layer_idx, crowd in ((0, False), (1, False), (1, True)):
        case = f"layer {layer_idx}{' crowd' if crowd else ''}"
        torch.manual_seed(1)
        ref = MoE(cfg, layer_idx).to(f64)
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0, 0.05)
            if crowd:  # every token of every rank picks experts 0 and 1: the other ranks receive nothing
                ref.gate.bias[:2] = 100.0
        ep = copy.deepcopy(ref)
        expert_parallel(ep.experts, dist.group.WORLD, rank, world)
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(2, 16, cfg.hidden_size, generator=g, dtype=f64)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        w = torch.randn(2, 16, cfg.hidden_size, generator=g, dtype=f64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, _ = ref(xa, ids)
        out_ep, _ = ep(xb, ids)
        results.append(_measured(f"{case}: output", out_ep, out_ref))
        (out_ref * w).sum().backward()
        (out_ep * w).sum().backward()
        results.append(_measured(f"{case}: input gradient", xb.grad, xa.grad))
        results.append(_measured(f"{case}: router gradient", ep.gate.weight.grad, ref.gate.weight.grad))
        n = cfg.n_routed_experts // world
        for name in ("w1", "w2", "w3"):
            full = getattr(ref.experts, name).grad.clone()
            dist.all_reduce(full)  # each expert's gradient sums the tokens of all ranks
            mine = getattr(ep.experts, name).grad
            no_token = mine is None  # no token reached this rank's experts
            if no_token:
                mine = torch.zeros_like(getattr(ep.experts, name))
            results.append(_measured(f"{case}: experts.{name} gradient", mine, full[rank * n:(rank + 1) * n],
                                     crowd=crowd, no_token=no_token))
    return results


def _muon_check(par) -> list[dict]:
    """DistributedMuon on dim-0 shards (uneven, one empty) against Muon on the whole matrices, step after step
    (float32: Muon's Newton-Schulz runs in float32). Returns the measured differences; the test asserts them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dsv4.parallel.muon import DistributedMuon
    from dsv4.train.optim import Muon

    mesh = init_device_mesh("cpu", (par.world,))
    shapes = [((3, 4, 6), (3, 4, 6)), ((8, 5), (2, 4, 5)), ((1, 7), (1, 1, 7)), ((6, 3), (1, 6, 3)),
              ((9, 4), (1, 9, 4))]
    torch.manual_seed(3)
    full = [torch.randn(shape) for shape, _ in shapes]
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
    views = [v for _, v in shapes]
    ref = Muon([{"params": plain, "views": views}], lr=0.05)
    opt = DistributedMuon([{"params": sharded, "views": views}], lr=0.05)
    results = []
    for step in range(3):
        grads = [torch.randn(shape) for shape, _ in shapes]
        for p, q, g in zip(plain, sharded, grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        ref.step()
        opt.step()
        for (shape, _), start, p, q in zip(shapes, full, plain, sharded):
            results.append(_measured(f"step {step + 1}: {tuple(shape)}", q.full_tensor(), p,
                                     moved=float((p.detach() - start).abs().max())))
    return results


def one_backward(trainer) -> None:
    """One step's loss (indexer KL included) and backward, no optimizer step."""
    trainer.model.set_indexer_phase(sparse=True, train_indexer=True)
    losses = trainer.losses(next(trainer.data))
    loss = losses.lm + 0.3 * losses.mtp + losses.balance
    (loss + losses.indexer_kl if losses.indexer_kl is not None else loss).backward()


def _grads(job: dict) -> None:
    from dsv4.parallel.mesh import Parallel

    par = Parallel.init(timeout_s=PG_TIMEOUT_S, ep=job["ep"])
    model = par.parallelize(new_model())
    trainer = distributed_trainer(par, model, Source(par.rank, par.world), train_config(), Path(job["out"]))
    one_backward(trainer)
    par.sync_expert_grads()
    grads = par.full_grads(model)
    if par.is_main:
        torch.save(grads, Path(job["out"]) / "grads.pt")


def _train(par_args: dict, job: dict) -> None:
    from dsv4.parallel.mesh import Parallel

    par = Parallel.init(timeout_s=job.get("timeout", PG_TIMEOUT_S), **par_args)
    model = par.parallelize(new_model())
    out = Path(job["out"])
    data = Source(par.rank, par.world)
    if job.get("die_in_save"):  # this rank dies after writing its part of the checkpoint of that step
        import torch.distributed.checkpoint as dcp

        real, step, who = dcp.save, job["die_in_save"], job["die_rank"]

        def save(state, checkpoint_id):
            real(state, checkpoint_id=checkpoint_id)
            if par.rank == who and Path(checkpoint_id).name.startswith(f".step-{step:08d}.tmp-"):
                os._exit(17)

        dcp.save = save
    trainer = distributed_trainer(par, model, data, train_config(job["steps"], job["ckpt_every"]), out)
    if job.get("resume"):
        assert trainer.resume(job["resume"]) == job["resume_step"]
    trainer.run(tokens_per_step=SEQ * GLOBAL_BATCH // par.world, progress=False)
    state = par.full_state_dict(model)
    if par.is_main:
        torch.save(state, out / "final.pt")
    if job.get("export"):
        par.save_pretrained(model, job["export"])


def worker(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    from dsv4.parallel.mesh import Parallel

    first = Parallel.init(timeout_s=PG_TIMEOUT_S)
    for job in spec["jobs"]:
        if job["kind"] == "units":  # measured here, asserted by the test
            units = {"ep": _ep_layer_check(first), "muon": _muon_check(first)}
            (Path(job["out"]) / f"units-rank{first.rank}.json").write_text(json.dumps(units))
        elif job["kind"] == "grads":
            _grads(job)
        elif job["kind"] == "cli":  # last: dsv4 train ends the process group
            from dsv4.cli import main

            assert main(job["argv"]) == 0
        else:
            _train({"ep": job.get("ep"), "dp_shard": job.get("dp_shard")}, job)
    first.close()


# --------------------------------------------------------------------------------------------- the test side

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, jobs: list[dict], tmp: Path, name: str, timeout: float = RUN_TIMEOUT_S,
           script: str | None = None):
    """Run ``jobs`` on ``world`` rank processes (``python script SPEC``, default this file's ``worker``); returns
    [(returncode, stderr)] per rank. Kills them on timeout."""
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    port = _free_port()
    src = str(Path(dsv4.__file__).resolve().parents[1])
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", DSV4_DIST_BACKEND="gloo",
                   PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
        err = open(tmp / f"{name}-rank{rank}.err", "w+")
        procs.append((subprocess.Popen([sys.executable, script or __file__, str(spec)], env=env, stdout=err,
                                       stderr=subprocess.STDOUT, start_new_session=True), err))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p, err in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p, err in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            err.seek(0)
            results.append((p.returncode, err.read()))
            err.close()
    if time.monotonic() > deadline:
        pytest.fail(f"{name}: ranks still running after {timeout} s (killed):\n" + results[0][1][-3000:])
    return results


def cli_args(out: Path, corpus: Path, batch: int) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--steps", "2",
            "--seq-len", "32", "--batch-size", str(batch), "--val-every", "0", "--val-batches", "1",
            "--ckpt-every", "2", "--warmup", "1", "--lr", "1e-4", "--quiet", "--json", "--out", str(out)]


def write_corpus(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    words = "the expert router sends each token to the rank that holds its expert and back again".split()
    with open(path, "w") as f:
        for _ in range(200):
            n = int(torch.randint(20, 120, (1,), generator=g))
            text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def check_ok(results, name):
    for rank, (rc, log) in enumerate(results):
        assert rc == 0, f"{name}: rank {rank} exited with {rc}:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole global batch: the loss curve, final weights and its step-2 checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    trainer = reference_trainer(out)
    trainer.run(tokens_per_step=SEQ * GLOBAL_BATCH, progress=False)
    return {"losses": read_losses(out), "state": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "ckpt2": out / "checkpoints" / "step-00000002"}


def assert_same_run(out: Path, reference: dict, steps, weights: dict | None = None) -> None:
    losses = read_losses(out)
    for step in steps:
        assert abs(losses[step] - reference["losses"][step]) < 1e-5, (step, losses[step], reference["losses"][step])
    state = torch.load(out / "final.pt")
    weights = reference["state"] if weights is None else weights
    assert state.keys() == weights.keys()
    for k, v in weights.items():
        assert (state[k].float() - v.float()).abs().max() <= 1e-5, k


def copy_checkpoint(src: Path, run: Path) -> str:
    dst = run / "checkpoints" / src.name
    shutil.copytree(src, dst)
    return str(dst)


# Three launches (5 processes) serve all the tests below:
#   1. two ranks train with a checkpoint every step; rank 1 dies while the step-3 checkpoint is being written;
#   2. one rank resumes that run's step-2 checkpoint; then it trains a fresh run and checkpoints step 2;
#   3. two ranks: the EP layer and Muon checks, one step's gradients, a 4-step run from scratch with HF export,
#      and resumes from the one-rank checkpoint and from a single-process Trainer checkpoint.

@pytest.fixture(scope="module")
def dead_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dead")
    t0 = time.monotonic()
    results = launch(2, [{"kind": "train", "out": str(tmp / "run"), "ep": 2, "steps": STEPS, "ckpt_every": 1,
                          "die_in_save": 3, "die_rank": 1, "timeout": DEAD_TIMEOUT_S}], tmp, "dead")
    return {"results": results, "seconds": time.monotonic() - t0, "ckpts": tmp / "run" / "checkpoints"}


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, dead_run):
    tmp = tmp_path_factory.mktemp("one")
    resumed = copy_checkpoint(dead_run["ckpts"] / "step-00000002", tmp / "resumed")
    jobs = [{"kind": "train", "out": str(tmp / "resumed"), "ep": 1, "steps": STEPS, "ckpt_every": 2,
             "resume": resumed, "resume_step": 2},
            {"kind": "train", "out": str(tmp / "fresh"), "ep": 1, "steps": 2, "ckpt_every": 2}]
    return {"results": launch(1, jobs, tmp, "one"), "tmp": tmp}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, one_rank_run, reference):
    tmp = tmp_path_factory.mktemp("two")
    from_one = copy_checkpoint(one_rank_run["tmp"] / "fresh" / "checkpoints" / "step-00000002", tmp / "from-one")
    from_plain = copy_checkpoint(reference["ckpt2"], tmp / "from-plain")
    corpus = write_corpus(tmp / "corpus.jsonl")
    jobs = [{"kind": "units", "out": str(tmp)},
            {"kind": "grads", "out": str(tmp), "ep": 2},
            {"kind": "train", "out": str(tmp / "scratch"), "ep": 2, "steps": STEPS, "ckpt_every": 2,
             "export": str(tmp / "hf")},
            {"kind": "train", "out": str(tmp / "from-one"), "ep": 2, "steps": STEPS, "ckpt_every": 2,
             "resume": from_one, "resume_step": 2},
            {"kind": "train", "out": str(tmp / "from-plain"), "ep": 2, "steps": STEPS, "ckpt_every": 2,
             "resume": from_plain, "resume_step": 2},
            {"kind": "train", "out": str(tmp / "replicated"), "ep": 1, "dp_shard": 1, "steps": 2, "ckpt_every": 0},
            {"kind": "cli", "argv": cli_args(tmp / "cli", corpus, GLOBAL_BATCH // 2)}]
    results = launch(2, jobs, tmp, "two")
    check_ok(results, "two ranks")
    return tmp


def test_dead_rank_makes_the_others_exit_with_a_clear_error_and_keeps_the_last_checkpoint(dead_run):
    results = dead_run["results"]
    assert results[1][0] == 17, results[1][1][-3000:]
    rc, log = results[0]
    assert rc != 0 and "training stopped while writing the checkpoint of step 3" in log, log[-3000:]
    assert "Another rank has probably died" in log and "step-00000002; continue with --resume" in log, log[-3000:]
    assert dead_run["seconds"] < DEAD_TIMEOUT_S  # failed at once, did not wait for the process-group timeout
    ckpts = dead_run["ckpts"]
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == \
        ["step-00000001", "step-00000002"]
    assert (ckpts / "step-00000002" / "meta.json").exists()  # complete; it resumes in the next test


def test_two_rank_checkpoint_resumes_on_one_rank(one_rank_run, reference):
    check_ok(one_rank_run["results"], "one rank")
    assert_same_run(one_rank_run["tmp"] / "resumed", reference, [3, 4])


def test_ep_layer_equals_local_and_distributed_muon_equals_muon(two_rank_run):
    """What the ranks measured (job "units"): the expert-parallel MoE is the local one (float64: within 1e-9 of the
    largest magnitude), DistributedMuon's weights are Muon's (float32: within numerics.RELATIVE of the largest)."""
    from numerics import RELATIVE

    for rank in range(2):
        units = json.loads((two_rank_run / f"units-rank{rank}.json").read_text())
        assert len(units["ep"]) == 3 * 6 and len(units["muon"]) == 3 * 5
        for r in units["ep"]:
            assert r["dtype"] == "torch.float64" and r["diff"] <= 1e-9 * max(1.0, r["scale"]), (rank, r)
            # only the crowded case leaves a rank without tokens, and there every rank but the first
            assert r.get("no_token", False) == (r.get("crowd", False) and rank > 0), (rank, r)
        for r in units["muon"]:
            assert r["dtype"] == "torch.float32" and r["moved"] > 0.01, (rank, r)  # the steps did move the weights
            assert r["diff"] <= RELATIVE[torch.float32] * max(1.0, r["scale"]), (rank, r)


def test_two_ranks_give_the_gradients_loss_and_weights_of_one_process(two_rank_run, reference):
    # float32, two summation orders (each rank's half of the batch, then the all-reduce): a gradient within 1e-5 of
    # its largest magnitude, or of 1e-3 of the model's largest gradient where its own is smaller than that: a sum
    # that cancels down to a small result keeps the rounding of its terms (the MTP block's mHC head, gradients of
    # 1e-8 to 1e-6 against a largest of 0.08, differed by up to 3e-5 of their own magnitude; a wrong gradient
    # would differ by its whole magnitude)
    grads = torch.load(two_rank_run / "grads.pt")
    trainer = reference_trainer(two_rank_run / "ref-grads")
    one_backward(trainer)
    largest = max(float(p.grad.abs().max()) for p in trainer.model.parameters() if p.grad is not None)
    for name, p in trainer.model.named_parameters():
        if p.grad is None:
            assert grads[name] is None, name
            continue
        scale = max(float(p.grad.abs().max()), 1e-3 * largest)
        assert (grads[name] - p.grad).abs().max() <= 1e-5 * scale + 1e-12, name
    assert_same_run(two_rank_run / "scratch", reference, range(1, STEPS + 1))


def test_replicated_experts_and_hsdp_equal_one_process(two_rank_run, reference):
    """ep=1 (each rank holds every expert; their gradients are summed over the ranks) with dp_shard=1 (HSDP: the
    dense parameters replicated, not sharded): the first two steps against the single-process step-2 checkpoint."""
    from safetensors.torch import load_file

    assert_same_run(two_rank_run / "replicated", reference, [1, 2],
                    weights=load_file(str(reference["ckpt2"] / "model.safetensors")))


def test_hf_export_from_two_ranks_is_the_single_process_model(two_rank_run, reference):
    exported = dsv4.from_pretrained(two_rank_run / "hf")
    for k, v in exported.state_dict().items():
        assert torch.allclose(v, reference["state"][k], atol=1e-5), k


def test_one_rank_and_single_process_checkpoints_resume_on_two_ranks(two_rank_run, reference):
    assert_same_run(two_rank_run / "from-one", reference, [3, 4])
    assert_same_run(two_rank_run / "from-plain", reference, [3, 4])


def test_dsv4_train_command_on_two_ranks_equals_one_process(two_rank_run, tmp_path):
    from dsv4.cli import main

    assert main(cli_args(tmp_path / "cli", two_rank_run / "corpus.jsonl", GLOBAL_BATCH)) == 0
    one, two = read_losses(tmp_path / "cli"), read_losses(two_rank_run / "cli")
    assert one.keys() == two.keys() == {1, 2}
    assert all(abs(one[k] - two[k]) < 1e-5 for k in one), (one, two)
    assert [p.name for p in (two_rank_run / "cli" / "checkpoints").iterdir()] == ["step-00000002"]
    # the exported model is whole (its weights are compared in the Trainer tests: the command keeps AdamW's
    # eps 1e-20, under which rounding noise decides some layer-0 mHC steps, see the module docstring)
    exported = dsv4.from_pretrained(two_rank_run / "cli" / "model")
    single = dsv4.from_pretrained(tmp_path / "cli" / "model")
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(exported) == shapes(single)


# ------------------------------------------------------------------------- one rank in this process: bad checkpoints

@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-rank gloo process group in the pytest process, ended afterwards."""
    import torch.distributed as dist

    from dsv4.parallel.mesh import Parallel

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    Parallel.init(timeout_s=PG_TIMEOUT_S, backend="gloo")
    try:
        yield lambda: Parallel(timeout_s=PG_TIMEOUT_S)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_checkpoint_of_another_model_or_a_truncated_one_is_a_clear_error(one_rank_group, tmp_path):
    """DCP's own errors are CheckpointExceptions, BaseExceptions that no `except ValueError` sees, each a traceback
    per rank; the load names the mis-shaped tensor, or the checkpoint, in a ValueError instead."""
    par = one_rank_group()
    model = par.parallelize(new_model())
    ckpt = par.save_checkpoint(tmp_path, 1, model, par.build_optimizer(model), {})
    other = one_rank_group()
    torch.manual_seed(0)
    wider = other.parallelize(Transformer(tiny_config().replace(vocab_size=2 * VOCAB)))
    with pytest.raises(ValueError, match=r"mis-shaped tensor\(s\): embed\.weight: checkpoint \(128, \d+\) vs "
                                         r"model \(256, \d+\)"):
        other.load_checkpoint(ckpt, wider, other.build_optimizer(wider))
    for f in ckpt.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    same = one_rank_group()
    fresh = same.parallelize(new_model())
    with pytest.raises(ValueError, match=f"checkpoint {ckpt} could not be read: "):
        same.load_checkpoint(ckpt, fresh, same.build_optimizer(fresh))


def test_a_failing_checkpoint_write_stops_the_run_with_a_clear_error(one_rank_group, tmp_path, monkeypatch, capsys):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from dsv4.parallel.mesh import DistributedError

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    par = one_rank_group()
    model = par.parallelize(new_model())
    trainer = distributed_trainer(par, model, Source(), train_config(steps=1, ckpt_every=1), tmp_path)
    with pytest.raises(DistributedError, match="while writing the checkpoint of step 1: .*No space left on device"):
        trainer.run(tokens_per_step=SEQ * GLOBAL_BATCH, progress=False)
    assert "No space left on device" in capsys.readouterr().err
    assert not list((tmp_path / "checkpoints").iterdir())  # nothing half-written left behind


if __name__ == "__main__":
    worker(sys.argv[1])
