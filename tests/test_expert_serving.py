"""Serving with the routed experts across processes (#18 item 5, dsv4.serve.distributed): ``dsv4 serve`` on two
gloo ranks (half of each layer's experts each; rank 0 serving HTTP, rank 1 following) answers two concurrent
completions and a third that resumes from the prefix cache with the tokens that one process's engine gives, and
rank 1 exits cleanly when rank 0 shuts down; in one process, a follower replaying a leader's announcements holds
the leader's decode state after every step. Options not run with split experts are refused.

The ranks run as subprocesses of this file (``tests/test_distributed.py``'s ``launch``) with one thread each, on
``tests/test_expert_inference.py``'s checkpoint; the one-process reference runs here, on one thread too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import test_expert_inference as ep

checkpoint, one_thread = ep.checkpoint, ep.one_thread  # its fixtures, shared

WORLD = 2
ROWS = 4
CHUNK = 16  # the prompts prefill in several chunks; anchors at 16, 32, ...
TOKENS = 10  # per completion, EOS ignored: every request decodes exactly this many
TEXTS = ["the router sends each token to the rank that holds its expert " * 2,
         "each rank maps only the bytes of its own experts and replays the model calls of rank zero"]
MORE = " and the cache resumes the prompt"


def prompts(path: Path) -> list[list[int]]:
    """A and B (sent together), then C: A's prompt and more (a prefix-cache hit)."""
    from dsv4.data import load_tokenizer

    tok = load_tokenizer(path / "tokenizer.json")
    a, b = (tok.encode(t, bos=True) for t in TEXTS)
    return [a, b, a + tok.encode(MORE)]


def serve_args(ckpt: Path, port: int) -> list[str]:
    return ["serve", "--model", str(ckpt), "--port", str(port), "--served-model-name", "ep", "--max-num-seqs",
            str(ROWS), "--prefill-chunk", str(CHUNK)]


# ------------------------------------------------------------------------------------------------ the rank side

def client(port: int, ids: list[list[int]], out: Path) -> None:
    """Rank 0's client: A and B at once, then C; the answers to ``out``; then the server is told to stop."""
    import httpx

    def ask(http, prompt, results, i):
        r = http.post("/v1/completions", json={"model": "ep", "prompt": prompt, "max_tokens": TOKENS,
                                               "temperature": 0, "ignore_eos": True}, timeout=120)
        results[i] = r.json()

    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(600):
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            results = [None] * 3
            both = [threading.Thread(target=ask, args=(http, ids[i], results, i)) for i in range(2)]
            for t in both:
                t.start()
            for t in both:
                t.join()
            time.sleep(0.5)  # idle: rank 0 sends beats
            ask(http, ids[2], results, 2)
            out.write_text(json.dumps(results))
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # as a user's Ctrl-C / kill would: rank 0's engine ends


def worker(spec_path: str) -> None:
    torch.set_num_threads(1)
    job = json.loads(Path(spec_path).read_text())["jobs"][0]
    from dsv4.cli import main
    from dsv4.serve import distributed

    distributed.HEARTBEAT_S = 0.1
    ckpt, out = Path(job["checkpoint"]), Path(job["out"])
    if os.environ["RANK"] == "0":
        threading.Thread(target=client, args=(job["port"], prompts(ckpt), out / "answers.json"), daemon=True).start()
    code = main(serve_args(ckpt, job["port"]))
    assert code == 0, code


# ------------------------------------------------------------------------------------------------ the test side

@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory, one_thread) -> tuple[list[dict], list[str]]:
    from test_distributed import _free_port, check_ok, launch

    out = tmp_path_factory.mktemp("ep-serve")
    results = launch(WORLD, [{"checkpoint": str(checkpoint), "out": str(out), "port": _free_port()}], out,
                     "ep-serve", timeout=150, script=__file__)
    check_ok(results, "expert-parallel serving")
    return json.loads((out / "answers.json").read_text()), [log for _, log in results]


def one_process(checkpoint: Path) -> list[dict]:
    """The same requests through one process's engine (the same options as the server's): A and B together."""
    import dsv4
    from dsv4.data import load_tokenizer
    from dsv4.serve.engine import Engine, Request
    from dsv4.serve.sampling import SamplingParams, add_event, new_outputs

    model = dsv4.from_pretrained(checkpoint)
    max_len = min(model.config.max_position_embeddings, 32768)  # dsv4 serve's default
    engine = Engine(model, load_tokenizer(checkpoint / "tokenizer.json"), max_model_len=max_len, max_num_seqs=ROWS,
                    prefill_chunk=CHUNK, compile=False).start()
    try:
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        ids = prompts(checkpoint)
        outs = [new_outputs(1) for _ in ids]
        reqs = [engine.submit(Request(ids[i], params, lambda ev, o=outs[i]: add_event(o, ev))) for i in range(2)]
        for r in reqs:
            r.finished.wait(120)
        reqs.append(engine.submit(Request(ids[2], params, lambda ev: add_event(outs[2], ev))))
        reqs[2].finished.wait(120)
        assert reqs[2].cached_tokens > 0
        return [{"text": o[0]["text"], "cached": r.cached_tokens} for o, r in zip(outs, reqs)]
    finally:
        engine.shutdown()


def test_two_ranks_serve_what_one_process_serves(served, checkpoint):
    answers, logs = served
    want = one_process(checkpoint)
    for i, (got, ref) in enumerate(zip(answers, want)):
        assert got["usage"]["completion_tokens"] == TOKENS, i
        assert got["choices"][0]["text"] == ref["text"], i
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == ref["cached"], i
    assert answers[2]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2 * CHUNK  # C resumed from A's prompt


def test_the_follower_replayed_the_batched_steps_and_exited(served):
    _, logs = served
    m = re.search(r"rank 1 followed rank 0: (\d+) prompts \((\d+) from the prefix cache\), (\d+) prefill chunks, "
                  r"(\d+) decoding steps, (\d+) cancelled, (\d+) beats", logs[1])
    assert m, logs[1][-2000:]
    prompts_, hits, _, steps, _, beats = (int(g) for g in m.groups())
    assert (prompts_, hits) == (3, 1)
    # each request decodes TOKENS - 1 steps after its prefill's token: A and B shared steps (continuous batching)
    assert steps < 3 * (TOKENS - 1)
    assert beats > 0  # sent while rank 0 waited for requests


def state_tensors(state) -> list[torch.Tensor]:
    out = [state.lengths, state.active]
    for layer in state.all_layers():
        out += [layer.ring, layer.ring_pos]
        for p in layer.parts():
            out += [t for t in (p.part_kv, p.part_gate, p.entries, p.prev_kv, p.prev_gate) if t is not None]
    return out


def test_a_follower_replaying_the_announcements_holds_the_leaders_decode_state(checkpoint):
    """In one process, without a process group (the model whole on both sides): every announcement of a
    ``LeaderEngine`` goes, pickled as ``broadcast_object_list`` sends it, to a ``Follower`` at once; after each
    decoding step the two decode states are equal, free rows included, through samples that end early, n = 2, a
    prefix-cache hit and a prompt cancelled halfway through its prefill."""
    import pickle

    import dsv4
    from dsv4.data import load_tokenizer
    from dsv4.parallel.inference import Ranks
    from dsv4.serve.distributed import Follower, LeaderEngine
    from dsv4.serve.engine import Request
    from dsv4.serve.sampling import SamplingParams

    model = dsv4.from_pretrained(checkpoint, numerics="plain")
    checks = []

    class Recording(LeaderEngine):
        def _announce(self, msg):
            msg = pickle.loads(pickle.dumps(msg))
            getattr(follower, "_" + msg[0])(*msg[1:])
            follower.counts[msg[0]] += 1
            if msg[0] == "prefill" and msg[1] == long_handle and msg[3] is None:
                long.cancel()  # after its first chunk: dropped at the next turn

    leader = Recording(model, load_tokenizer(checkpoint / "tokenizer.json"), ranks=Ranks(0, 1), max_model_len=512,
                       max_num_seqs=ROWS, prefill_chunk=CHUNK)
    follower = Follower(model, Ranks(1, 2), leader.shape)
    step = leader.step

    def checked(tokens):
        out = step(tokens)
        pairs = zip(state_tensors(leader.state), state_tensors(follower.state))
        checks.append(all(torch.equal(a, b) for a, b in pairs))
        return out

    leader.step = checked
    ids = prompts(checkpoint)
    long_handle = 3  # the fourth prompt admitted
    long = Request(ids[0][::-1] * 2, SamplingParams(max_tokens=4, temperature=0), lambda ev: None)
    reqs = [Request(ids[0], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), lambda ev: None),
            Request(ids[1], SamplingParams(max_tokens=2, temperature=0.8, seed=1, n=2), lambda ev: None),
            Request(ids[2], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), lambda ev: None), long]
    leader.start()
    try:
        for batch in (reqs[:2], reqs[2:]):  # two at a time; the third resumes from the first's prompt
            for r in batch:
                leader.submit(r)
            for r in batch:
                r.finished.wait(60)
    finally:
        leader.shutdown()
    assert all(r.finished.is_set() for r in reqs) and leader.error is None
    assert reqs[2].cached_tokens > 0 and follower.counts["hits"] == 1
    assert follower.counts["drop"] == 1 and not follower.caches  # every prompt's cache released
    assert len(checks) >= 9 and all(checks)  # 5 + 4 steps at least (req 1 decodes beside req 0)


def test_options_not_run_with_split_experts_are_refused():
    from dsv4.serve.distributed import check_options

    with pytest.raises(ValueError, match="--speculative is not available with the experts spread over ranks"):
        check_options(None, True)
    with pytest.raises(ValueError, match="--compile: the compiled decoding step has not been tested"):
        check_options(True, False)
    check_options(None, False)  # automatic: eager
    check_options(False, False)


def test_chat_refuses_to_run_under_torchrun(checkpoint, monkeypatch, capsys):
    from dsv4.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["chat", "--model", str(checkpoint)]) == 2
    assert "dsv4 chat runs in one process" in capsys.readouterr().err


if __name__ == "__main__":
    worker(sys.argv[1])
