"""Serving with the routed experts across processes (#18 item 5, dsv4.serve.distributed): ``dsv4 serve`` on two
gloo ranks (half of each layer's experts each; rank 0 serving HTTP, rank 1 following) answers two concurrent
completions and a third that resumes from the prefix cache with the tokens that one process's engine gives, and
rank 1 exits cleanly when rank 0 shuts down. Options not run with split experts are refused.

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
