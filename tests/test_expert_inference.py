"""Experts across processes for inference (#18 item 5, dsv4.parallel.inference): two gloo ranks holding half of
each layer's routed experts each give the logits and greedy tokens of one process, on a packed official-layout
checkpoint (each rank mapping only its own experts' bytes) and on the materialized model; ``dsv4 generate`` under a
torchrun environment prints on rank 0 what one process prints. A number of ranks that does not divide the experts
is refused.

The ranks run as subprocesses of this file (``tests/test_distributed.py``'s ``launch``) with one thread each; the
one-process references run here, also on one thread, so that both sides do the same float operations.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig
from numerics import assert_close_scaled

WORLD = 2
PROMPT = "the router sends each token to the rank that holds its expert"
NEW_TOKENS = 6
CLI_TOKENS = 8
CHUNK = 16  # prompt chunk of the API runs: several chunks of uneven shares


def config(vocab: int) -> ModelConfig:
    """Every layer type, hash and learned routing, the MTP block; 8 experts of which each token takes 2."""
    return ModelConfig.preset("tiny").replace(vocab_size=vocab, num_hidden_layers=3,
                                              layer_types=[SLIDING, CSA, HCA], mlp_layer_types=[HASH_MOE, MOE, MOE])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A synthetic official-layout checkpoint (FP8 projections, FP4 experts) with a small BPE beside it."""
    from dsv4.data.tokenizer import train_bpe
    from dsv4.weights.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("ep-inference")
    tok = train_bpe(Path(__file__).resolve().parents[1] / "README.md", 300)
    write_synthetic(config(tok.vocab_size), root / "ckpt", seed=5, max_shard_bytes=256 << 10)
    tok.save(root / "ckpt" / "tokenizer.json")
    return root / "ckpt"


def prompt_ids(path: Path) -> torch.Tensor:
    from dsv4.data import load_tokenizer

    tok = load_tokenizer(path / "tokenizer.json")
    return torch.tensor([tok.encode(PROMPT * 2, bos=True)])


def run_model(model, ids: torch.Tensor) -> dict:
    """Greedy tokens through the cache (prompt in chunks), and the logits of one whole forward."""
    from dsv4.generate import generate

    with torch.inference_mode():
        tokens = generate(model, ids, NEW_TOKENS, temperature=0, prefill_chunk=CHUNK)[0, ids.shape[1]:]
        logits = model(ids)
    return {"tokens": tokens.tolist(), "logits": logits}


# ------------------------------------------------------------------------------------------------ the rank side

def mapped_ranges(model) -> list[tuple[str, int, int]]:
    """(file, first byte, end) of every tensor of ``model`` whose memory lies in a file mapping."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi, int(parts[2], 16), parts[5].strip()))
    out = []
    tensors = list(model.state_dict(keep_vars=True).values())
    tensors += [b for m in model.modules() for b in getattr(m, "_buffers", {}).values() if b is not None]
    seen = set()
    for t in tensors:
        if t.numel() == 0 or id(t) in seen:
            continue
        seen.add(id(t))
        a = t.data_ptr()
        for lo, hi, offset, name in maps:
            if lo <= a < hi:
                start = a - lo + offset
                out.append((name, start, start + t.numel() * t.element_size()))
    return out


def worker(spec_path: str) -> None:
    torch.set_num_threads(1)
    job = json.loads(Path(spec_path).read_text())["jobs"][0]
    from dsv4.cli import main
    from dsv4.parallel.inference import expert_ranks

    ckpt, out = Path(job["checkpoint"]), Path(job["out"])
    ids = prompt_ids(ckpt)
    with expert_ranks(timeout_s=60) as ranks:
        packed = ranks.from_pretrained(ckpt, numerics="plain", compute_dtype=torch.float64)
        result = {"packed": run_model(packed, ids), "mapped": mapped_ranges(packed)}
        del packed
        dense = ranks.from_pretrained(ckpt, dtype=torch.float64, numerics="plain")
        result["dense"] = run_model(dense, ids)
        result["dense_experts"] = [tuple(m.w1.shape) for m in dense.modules() if type(m).__name__ == "Experts"]
        del dense
        torch.save(result, out / f"rank{ranks.rank}.pt")
        with open(out / f"cli-rank{ranks.rank}.txt", "w") as f, contextlib.redirect_stdout(f):
            code = main(["generate", "--model", str(ckpt), "--prompt", PROMPT, "--max-tokens", str(CLI_TOKENS),
                         "--temperature", "0"])
        assert code == 0, code


# ------------------------------------------------------------------------------------------------ the test side

@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(checkpoint, tmp_path_factory, one_thread) -> Path:
    from test_distributed import check_ok, launch

    out = tmp_path_factory.mktemp("ep-ranks")
    check_ok(launch(WORLD, [{"checkpoint": str(checkpoint), "out": str(out)}], out, "ep", timeout=120,
                    script=__file__), "expert-parallel inference")
    return out


def reference(checkpoint: Path, **kwargs) -> dict:
    return run_model(dsv4.from_pretrained(checkpoint, numerics="plain", **kwargs), prompt_ids(checkpoint))


def test_two_ranks_give_the_logits_and_greedy_tokens_of_one_process(two_ranks, checkpoint):
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(WORLD)]
    packed = dsv4.from_pretrained(checkpoint, numerics="plain").double()  # products in float64
    want = {"packed": run_model(packed, prompt_ids(checkpoint)),
            "dense": reference(checkpoint, dtype=torch.float64)}
    for kind in ("packed", "dense"):
        for r, got in enumerate(ranks):
            assert got[kind]["tokens"] == want[kind]["tokens"], (kind, r)
            assert got[kind]["logits"].dtype == torch.float64
            assert_close_scaled(got[kind]["logits"], want[kind]["logits"], relative=1e-12)
    # the materialized model kept only its half of each layer's stacked experts
    assert ranks[0]["dense_experts"] == [(4, 128, 128)] * 4  # three layers and the MTP block


def test_each_rank_maps_only_its_own_experts(two_ranks, checkpoint):
    from dsv4.weights.files import read_headers

    expert = re.compile(r"\.ffn\.experts\.(\d+)\.")
    at = {(str(f.resolve()), info.start): (name, info.stop) for name, (f, info) in read_headers(checkpoint).items()}
    total = sum(stop - start for (_, start), (name, stop) in at.items() if expert.search(name))
    held = []
    for r in range(WORLD):
        ranges = torch.load(two_ranks / f"rank{r}.pt")["mapped"]
        names = set()
        for f, start, stop in ranges:
            name, end = at[(str(Path(f).resolve()), start)]  # each mapped tensor is one stored tensor, whole
            assert end == stop, name
            names.add(name)
        experts = {n for n in names if expert.search(n)}
        assert {int(expert.search(n).group(1)) for n in experts} == set(range(4 * r, 4 * r + 4))
        assert sum(stop - start for _, start, stop in ranges if at[(str(Path(_).resolve()), start)][0] in experts) \
            == total // WORLD
        held.append(names - experts)
    assert held[0] == held[1] and any(n.startswith("embed") for n in held[0])  # the rest: replicated


def test_generate_command_on_two_ranks_prints_what_one_process_prints(two_ranks, checkpoint, capsys):
    from dsv4.cli import main

    assert main(["generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-tokens", str(CLI_TOKENS),
                 "--temperature", "0"]) == 0
    one = capsys.readouterr().out
    assert one.startswith(PROMPT) and len(one) > len(PROMPT) + 1
    assert (two_ranks / "cli-rank0.txt").read_text() == one
    assert (two_ranks / "cli-rank1.txt").read_text() == ""  # rank 0 prints


def test_token_shares_cover_the_rows_once():
    from dsv4.parallel.inference import token_shares

    assert token_shares(1, 2) == [(0, 1), (1, 1)]
    assert token_shares(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert token_shares(0, 2) == [(0, 0), (0, 0)]


def test_ranks_that_do_not_divide_the_experts_are_refused(checkpoint):
    from dsv4.parallel import inference
    from dsv4.weights.packed import load_packed

    with pytest.raises(ValueError, match="3 ranks do not divide the 8 routed experts"):
        inference.from_pretrained(checkpoint, rank=0, size=3)
    with pytest.raises(ValueError, match="3 ranks do not divide the 8 routed experts"):
        load_packed(checkpoint, experts=(0, 3))
    with pytest.raises(ValueError, match="rank 2 is not one of 0..1"):
        load_packed(checkpoint, experts=(2, 2))
    model = dsv4.from_pretrained(checkpoint, numerics="plain")
    with pytest.raises(ValueError, match="holds experts \\[0, 8\\), rank 0 of 2 needs \\[0, 4\\)"):
        inference.split_experts(model, 0, 2)


def test_cost_fit_plans_one_rank_of_expert_parallelism(two_ranks, checkpoint, capsys, monkeypatch):
    from dsv4 import cli
    from dsv4.cost.fit import plan_checkpoint
    from dsv4.weights.files import read_headers

    one = plan_checkpoint(checkpoint, context=256, memory_bytes=1 << 40)
    two = plan_checkpoint(checkpoint, context=256, memory_bytes=1 << 40, expert_parallel=2)
    assert two.weights["experts"] * 2 == one.weights["experts"] and two.kv == one.kv
    # what a rank does not hold is the half of the experts (the MTP block's included) that it does not map
    # (test_each_rank_maps_only_its_own_experts)
    expert = re.compile(r"\.ffn\.experts\.")
    experts = sum(info.nbytes for name, (_, info) in read_headers(checkpoint).items() if expert.search(name))
    assert one.weights_bytes - two.weights_bytes == experts // 2
    assert two.prefill["exchange"] > 0 and "exchange" not in one.prefill
    monkeypatch.setattr(cli, "COMMANDS", {"cost": cli.COMMANDS["cost"]})
    assert cli.main(["cost", "--fit", "--model", str(checkpoint), "--context", "256", "--memory-gib", "1024",
                     "--expert-parallel", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == two.to_dict()
    assert cli.main(["cost", "--fit", "--model", str(checkpoint), "--context", "256", "--expert-parallel", "3"]) == 2
    err = capsys.readouterr().err
    assert "expert_parallel" in err and "divisor of the 8 routed experts, got 3" in err


if __name__ == "__main__":
    worker(sys.argv[1])
