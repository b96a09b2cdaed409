"""Atomic directory writes (``dsv4.atomic``): the helper itself, and every checkpoint writer killed at each of its
filesystem operations, after which the loaders always find the old checkpoint or the new one, complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4 import ModelConfig
from dsv4.config import MOE, SLIDING
from dsv4.atomic import (atomic_directory, recover_directory, remove_directory, write_atomically,
                          write_directory_atomically)
from dsv4.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def fill(files: dict[str, str]):
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return write


# ----------------------------------------------------------------------------------------------- the helper
def test_new_directory_and_no_leftovers(tmp_path):
    path = tmp_path / "sub" / "model"
    assert write_directory_atomically(path, fill({"a.txt": "1", "d/b.txt": "2"})) == path
    assert tree(path) == {"a.txt": "1", "d/b.txt": "2"}
    assert os.listdir(path.parent) == ["model"]


def test_replacing_leaves_only_the_new_files(tmp_path):
    path = tmp_path / "model"
    write_directory_atomically(path, fill({"a.txt": "old", "only-old.txt": "x"}))
    write_directory_atomically(path, fill({"a.txt": "new", "b.txt": "new"}))
    assert tree(path) == {"a.txt": "new", "b.txt": "new"}
    assert os.listdir(tmp_path) == ["model"]


@pytest.mark.parametrize("existing", [True, False])
def test_a_failing_write_leaves_the_old_directory_untouched_and_no_temporary(tmp_path, existing):
    path = tmp_path / "model"
    if existing:
        write_directory_atomically(path, fill({"a.txt": "old"}))

    def fails(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_directory_atomically(path, fails)
    assert os.listdir(tmp_path) == (["model"] if existing else [])
    if existing:
        assert tree(path) == {"a.txt": "old"}
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(path) as tmp:
            (tmp / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == (["model"] if existing else [])


def test_every_file_and_folder_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "model"
    write_directory_atomically(path, fill({"a.txt": "1", "d/b.txt": "2"}))
    tmp = Path(synced[3])  # the temporary directory, synced under its own name before the rename
    assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
    assert synced == [str(tmp / "a.txt"), str(tmp / "d" / "b.txt"), str(tmp / "d"), str(tmp), str(tmp_path)]
    synced.clear()
    write_atomically(tmp_path / "f.json", lambda t: t.write_text("{}"))
    assert synced[0].startswith(str(tmp_path / "f.json.tmp-")) and synced[1] == str(tmp_path)
    assert (tmp_path / "f.json").read_text() == "{}"


def test_recovery_puts_back_the_directory_of_a_writer_killed_between_its_renames(tmp_path):
    path = tmp_path / "model"
    write_directory_atomically(path, fill({"a.txt": "old"}))
    pid = dead_pid()
    os.rename(path, tmp_path / f".model.old-{pid}-0123abcd")  # as the writer's first rename left it
    (tmp_path / f".model.tmp-{pid}-89abcdef").mkdir()  # its new contents, complete or not
    (tmp_path / f".model.tmp-{pid}-89abcdef" / "a.txt").write_text("new")
    (tmp_path / f".model.del-{pid}-00000000").mkdir()  # a deletion it had started
    (tmp_path / f".model.tmp-{os.getpid()}-11111111").mkdir()  # a live writer's: kept
    assert recover_directory(path) == path
    assert tree(path) == {"a.txt": "old"}
    assert sorted(os.listdir(tmp_path)) == [f".model.tmp-{os.getpid()}-11111111", "model"]


def test_recovery_removes_a_superseded_old_directory_and_leaves_others_alone(tmp_path):
    path = tmp_path / "model"
    write_directory_atomically(path, fill({"a.txt": "new"}))
    pid = dead_pid()
    (tmp_path / f".model.old-{pid}-0123abcd").mkdir()  # killed after the second rename: the old one is garbage
    (tmp_path / f".other.old-{pid}-0123abcd").mkdir()  # another directory's
    (tmp_path / ".model.old-not-ours").mkdir()
    recover_directory(path)
    assert tree(path) == {"a.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == [".model.old-not-ours", f".other.old-{pid}-0123abcd", "model"]
    recover_directory(tmp_path / "missing")  # nothing to do: no error
    recover_directory(tmp_path / "no-parent" / "x")


def test_remove_directory(tmp_path):
    path = tmp_path / "step-00000001"
    write_directory_atomically(path, fill({"a.txt": "1"}))
    remove_directory(path)
    remove_directory(path)  # already gone
    assert os.listdir(tmp_path) == []


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    for step in (3, 5, 1):
        write_directory_atomically(tmp_path / f"step-{step:08d}", fill({"meta.json": "{}"}))
    prune_checkpoints(tmp_path, keep=1, newest=tmp_path / "step-00000001")  # written after a resume from step 1
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000005"]


# ---------------------------------------------------------------------------------------- the writers, killed
def config() -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=128, num_hidden_layers=1, layer_types=[SLIDING],
                                              mlp_layer_types=[MOE], n_routed_experts=4, num_nextn_predict_layers=0)


def model(seed: int) -> dsv4.Transformer:
    torch.manual_seed(seed)
    return dsv4.Transformer(config())


# Runs in a subprocess: writes the old checkpoints once, then for every k forks a writer that overwrites a copy of
# them with new ones and kills itself (SIGKILL) just before its k-th filesystem operation: a file opened for writing,
# a folder made or removed, a rename, an unlink, an fsync, a safetensors or torch.save file written (those two open
# their files outside Python). k = total + 1 is not killed.
WRITER = r"""
import json, os, shutil, signal, sys, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)
import safetensors.torch
sys.path.insert(0, sys.argv[2])
from test_atomic_write import model
from dsv4.weights import save_pretrained
from dsv4.train.checkpoint import save_checkpoint

work = Path(sys.argv[1])
old, new = model(0), model(1)


def writes(d, m, tags):
    save_pretrained(m, d / "model")
    for step, tag in tags:
        save_checkpoint(d / "ckpt", step, m, {"tag": tag}, {"tag": tag}, keep=2)


writes(work / "template", old, [(1, "old1"), (2, "old2")])
EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def run(k, d):
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:
        n, limit = [0], [k]

        def point():
            n[0] += 1
            if n[0] == limit[0]:
                os.kill(os.getpid(), signal.SIGKILL)

        def hook(event, args):
            if event in EVENTS or (event == "open" and len(args) > 2 and isinstance(args[2], int)
                                   and args[2] & WRITING):
                point()

        def wrap(f):
            def wrapped(*a, **kw):
                point()
                return f(*a, **kw)
            return wrapped

        os.fsync = wrap(os.fsync)
        torch.save = wrap(torch.save)
        safetensors.torch.save_file = wrap(safetensors.torch.save_file)
        sys.addaudithook(hook)
        writes(d, new, [(2, "new2"), (3, "new3")])
        limit[0] = 0
        (work / "count").write_text(str(n[0]))
        os._exit(0)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(3)


shutil.copytree(work / "template", work / "dry")
run(10**9, work / "dry")
total = int((work / "count").read_text())
shutil.rmtree(work / "dry")
outcome = {}
for k in range(1, total + 2):
    shutil.copytree(work / "template", work / str(k))
    status = run(k, work / str(k))
    outcome[k] = "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else \
        f"exit {os.waitstatus_to_exitcode(status)}"
print(json.dumps({"total": total, "outcome": outcome}))
"""


def weights_of(m: torch.nn.Module) -> str:
    """Which reference model ``m`` equals in every tensor: "old" (seed 0), "new" (seed 1), else "mixed"."""
    for name, ref in REFS.items():
        if all(torch.equal(v, ref[k]) for k, v in m.state_dict().items()) and m.state_dict().keys() == ref.keys():
            return name
    return "mixed"


REFS: dict[str, dict[str, torch.Tensor]] = {}

# What a loader may find after a kill, in the order the writer goes: the HF model directory, then the training
# checkpoints by step (step 2 rewritten, step 3 added, step 1 pruned by keep=2).
STATES = [("old", {1: "old1", 2: "old2"}), ("new", {1: "old1", 2: "old2"}), ("new", {1: "old1", 2: "new2"}),
          ("new", {1: "old1", 2: "new2", 3: "new3"}), ("new", {2: "new2", 3: "new3"})]


def test_writers_killed_at_every_filesystem_operation_leave_the_old_or_the_new_checkpoint(tmp_path):
    REFS.update(old=model(0).state_dict(), new=model(1).state_dict())
    run = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), str(ROOT / "tests")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    total, outcome = result["total"], result["outcome"]
    assert total > 40, total  # the writers did go through the counted operations
    assert all(outcome[str(k)] == "killed" for k in range(1, total + 1)), outcome
    assert outcome[str(total + 1)] == "exit 0"
    seen, recovered = set(), 0
    loaded = model(2)
    for k in range(1, total + 2):
        d = tmp_path / str(k)
        ckpts = d / "ckpt"
        recovered += not (d / "model").exists() or not (ckpts / "step-00000002").exists()
        hf = weights_of(dsv4.from_pretrained(d / "model"))  # recovers first
        latest = latest_checkpoint(ckpts)  # recovers the checkpoint folder first
        found = {}
        for path in list_checkpoints(ckpts):
            state, meta = load_checkpoint(path, loaded)
            assert state["tag"] == meta["tag"] and weights_of(loaded) == meta["tag"][:3], (k, path)
            found[meta["step"]] = meta["tag"]
        state = (hf, found)
        assert state in STATES, f"killed before operation {k} of {total}: found {state}"
        assert latest.name == f"step-{max(found):08d}"
        leftovers = [p.name for p in (*d.iterdir(), *ckpts.iterdir()) if p.name.startswith(".")]
        assert not leftovers, (k, leftovers)
        seen.add(STATES.index(state))
    assert seen == set(range(len(STATES)))  # every stage was cut at least once
    assert recovered >= 2  # killed between the two renames of the model directory and of step 2: put back
    assert state == STATES[-1]  # not killed: all new
