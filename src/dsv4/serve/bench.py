"""``dsv4 bench serve``: real HTTP clients against live ``dsv4 serve`` processes on localhost.

Two workloads, each against a baseline measured in the same run:
  - **concurrent**: ``--requests`` clients at once, prompts of 256 to 1,024 tokens, ``--output-tokens`` each (EOS
    ignored), against the same requests served one at a time by a server that decodes one row;
  - **agent**: one agent session; each turn resends the whole conversation plus a tool result of a few hundred
    tokens, until it reaches ``--agent-context`` tokens; time to first token (TTFT) of every turn, against the same
    turns on a server with ``--no-prefix-cache`` (every ``--baseline-every``-th turn and the last, so that the
    baseline's cold prefills stay affordable), then the next turn after a restart over the same ``--kv-cache-dir``
    against that turn served cold.
Reports output tokens/s, TTFT and inter-token latency (p50 / p99), the prefix cache's hit rate and its disk bytes per
cached token. Without ``--model`` the server runs a ``--preset`` model with random weights and a small BPE (what
is measured is speed, not text).
"""

from __future__ import annotations

import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

READ_TOOL = {"type": "function", "function": {"name": "read_file", "description": "Read a file of the project",
                                                 "parameters": {"type": "object",
                                                                "properties": {"path": {"type": "string"}}}}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A ``dsv4 serve`` process on a free port of localhost, ready when constructed (its ``/health`` answers);
    ``log`` collects what it prints; ``stop()`` ends it (SIGTERM, or the signal given)."""

    def __init__(self, model_dir: Path, *args: str, name: str = "bench", timeout: float = 300):
        import httpx

        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "dsv4", "serve", "--model", str(model_dir), "--port",
                                      str(self.port), "--served-model-name", name, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("dsv4 serve did not start:\n" + "".join(self.log))
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def stream(url: str, path: str, body: dict) -> dict:
    """One streaming request: time to first token, (time, tokens) of each chunk that carried tokens, usage. Chunks
    count their tokens by their log-probabilities where asked for (completions: every token then comes in a chunk,
    even one that is no text yet), else one per chunk with text."""
    import httpx

    t0 = time.perf_counter()
    first, stamps, usage = None, [], None
    with httpx.stream("POST", url + path, json=dict(body, stream=True, stream_options={"include_usage": True}),
                      timeout=None) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", choice)
                tokens = len((choice.get("logprobs") or {}).get("tokens") or [])
                if tokens or delta.get("content") or delta.get("text") or delta.get("reasoning_content") or \
                        delta.get("tool_calls") or choice.get("finish_reason"):  # an answer held whole ends here
                    now = time.perf_counter()
                    first = first if first is not None else now - t0
                    if tokens or not choice.get("finish_reason"):
                        stamps.append((now, max(tokens, 1)))
    return {"ttft": first, "stamps": stamps, "usage": usage or {}, "seconds": time.perf_counter() - t0}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    v = sorted(values)
    return {"p50": statistics.median(v), "p99": v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]}


def itl(results: list[dict]) -> list[float]:
    """Inter-token latencies: each gap between chunks, shared by the tokens of the later one."""
    out = []
    for r in results:
        s = r["stamps"]
        for (a, _), (b, n) in zip(s, s[1:]):
            out += [(b - a) / n] * n
    return out


def build_model(preset: str, out: Path, vocab: int = 2048) -> Path:
    """A ``preset`` model with random weights and a BPE of ``vocab`` ids (V4's chat tokens reserved), saved."""
    import dsv4
    from dsv4.data import train_bpe

    root = Path(__file__).resolve().parents[3]
    corpus = out / "corpus.txt"
    texts = [p.read_text() for p in sorted((root / "docs").glob("*.md"))] if (root / "docs").is_dir() else []
    corpus.write_text("\n".join(texts) or Path(dsv4.__file__).read_text())
    tok = train_bpe(corpus, vocab)
    config = dsv4.ModelConfig.preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = dsv4.Transformer(config.replace(vocab_size=max(config.vocab_size, tok.vocab_size)))
    model.eval().save_pretrained(out / "model")
    tok.save(out / "model" / "tokenizer.json")
    return out / "model"


def concurrent(model_dir: Path, args, g: torch.Generator) -> dict:
    lengths = torch.randint(256, 1025, (args.requests,), generator=g).tolist()
    prompts = [torch.randint(300, 2000, (n,), generator=g).tolist() for n in lengths]
    body = {"model": "bench", "max_tokens": args.output_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    limit = str(1024 + args.output_tokens + 64)

    def serve(rows: int, together: bool) -> dict:
        server = LiveServer(model_dir, "--max-num-seqs", str(rows), "--max-model-len", limit, "--no-prefix-cache")
        try:
            stream(server.url, "/v1/completions", dict(body, prompt=prompts[0][:64], max_tokens=4))  # warm-up
            results = [None] * len(prompts)
            t0 = time.perf_counter()
            if together:
                def one(i: int) -> None:
                    results[i] = stream(server.url, "/v1/completions", dict(body, prompt=prompts[i]))

                threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                for i, p in enumerate(prompts):
                    results[i] = stream(server.url, "/v1/completions", dict(body, prompt=p))
            wall = time.perf_counter() - t0
        finally:
            server.stop()
        tokens = sum(r["usage"].get("completion_tokens", 0) for r in results)
        return {"rows": rows, "seconds": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
                "ttft_s": percentiles([r["ttft"] for r in results]), "itl_s": percentiles(itl(results))}

    batched = serve(args.max_num_seqs, True)
    alone = serve(1, False)
    return {"requests": args.requests, "prompt_tokens": lengths, "output_tokens_each": args.output_tokens,
            "concurrent": batched, "one_at_a_time": alone,
            "speedup": batched["output_tokens_per_s"] / alone["output_tokens_per_s"]}


def agent(model_dir: Path, args, g: torch.Generator, work: Path) -> dict:
    import sysconfig

    from dsv4.data import load_tokenizer

    tok = load_tokenizer(model_dir / "tokenizer.json")
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    limit = args.agent_context + 4096
    common = ("--max-num-seqs", "1", "--max-model-len", str(limit))
    cache_dir = work / "kv"
    messages = [{"role": "system", "content": "You are a coding agent. Read files with the tool to answer.",
                 "tools": [READ_TOOL]},
                {"role": "user", "content": "Summarize what the standard library's modules do."}]
    body = {"model": "bench", "max_tokens": args.agent_reply_tokens, "temperature": 0, "ignore_eos": True,
            "tools": [READ_TOOL]}

    def tool_result(turn: int) -> str:  # a few hundred tokens of one stdlib file
        text = stdlib[turn % len(stdlib)].read_text(errors="replace")
        ids = tok.encode(text)[:args.agent_tool_tokens]
        return tok.decode(ids)

    def request(msgs):
        return dict(body, messages=[{k: v for k, v in m.items() if k != "tools"} for m in msgs])

    server = LiveServer(model_dir, *common, "--kv-cache-dir", str(cache_dir), "--kv-cache-disk-gib", "64")
    turns = []
    try:
        while True:
            r = stream(server.url, "/v1/chat/completions", request(messages))
            usage = r["usage"]
            turns.append({"messages": list(messages), "ttft": r["ttft"], "prompt_tokens": usage["prompt_tokens"],
                          "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)})
            if usage["prompt_tokens"] >= args.agent_context:
                break
            call_id = f"call_{len(turns)}"
            messages = messages + [
                {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": "read_file", "arguments": json.dumps({"path": stdlib[len(turns) % len(stdlib)].name})}}]},
                {"role": "tool", "tool_call_id": call_id, "content": tool_result(len(turns))}]
    finally:
        server.stop()
    disk = sum(p.stat().st_size for p in cache_dir.rglob("*.safetensors"))
    nxt = turns[-1]["messages"] + [{"role": "user", "content": "Now list the three most used modules."}]
    server = LiveServer(model_dir, *common, "--kv-cache-dir", str(cache_dir), "--kv-cache-disk-gib", "64")
    try:  # a restart: the memory tier is empty, the disk tier is found again
        restarted = stream(server.url, "/v1/chat/completions", request(nxt))
    finally:
        server.stop()
    picked = sorted(set(range(1, len(turns), args.baseline_every)) | {len(turns) - 1})
    server = LiveServer(model_dir, *common, "--no-prefix-cache")
    try:
        cold = {i: stream(server.url, "/v1/chat/completions", request(turns[i]["messages"]))["ttft"] for i in picked}
        cold_next = stream(server.url, "/v1/chat/completions", request(nxt))["ttft"]
    finally:
        server.stop()
    warm_mean = statistics.mean(turns[i]["ttft"] for i in picked)
    cold_mean = statistics.mean(cold.values())
    prompt_total = sum(t["prompt_tokens"] for t in turns[1:])
    return {"turns": len(turns), "final_context": turns[-1]["prompt_tokens"],
            "ttft_s": [t["ttft"] for t in turns], "prompt_tokens": [t["prompt_tokens"] for t in turns],
            "cached_tokens": [t["cached_tokens"] for t in turns],
            "hit_rate": sum(t["cached_tokens"] for t in turns[1:]) / max(prompt_total, 1),
            "compared_turns": picked, "ttft_mean_s": warm_mean, "ttft_mean_no_prefix_cache_s": cold_mean,
            "ttft_mean_all_turns_after_first_s": statistics.mean(t["ttft"] for t in turns[1:]),
            "ttft_speedup": cold_mean / warm_mean,
            "restart_ttft_s": restarted["ttft"], "restart_cached_tokens":
                restarted["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0),
            "cold_ttft_s": cold_next, "restart_speedup": cold_next / restarted["ttft"],
            "disk_bytes": disk, "disk_bytes_per_cached_token": disk / max(turns[-1]["prompt_tokens"], 1)}


def bench_serve(args) -> dict:
    if args.requests < 1 or args.output_tokens < 1 or args.agent_context < 256:
        raise ValueError("--requests and --output-tokens must be >= 1 and --agent-context >= 256")
    g = torch.Generator().manual_seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="dsv4-bench-serve-"))
    model_dir = Path(args.model) if args.model else build_model(args.preset, work)
    out = {"bench": "serve", "preset": None if args.model else args.preset, "model": args.model,
           "max_num_seqs": args.max_num_seqs, "threads": torch.get_num_threads()}
    workloads = args.workloads.split(",")
    bad = set(workloads) - {"concurrent", "agent"}
    if bad:
        raise ValueError(f"--workloads: unknown {sorted(bad)}; choose concurrent and/or agent")
    if "concurrent" in workloads:
        out["concurrent"] = concurrent(model_dir, args, g)
    if "agent" in workloads:
        out["agent"] = agent(model_dir, args, g, work)
    return out


def add_arguments(p) -> None:
    """``dsv4 bench serve``'s own options (the bench command holds the shared ones)."""
    p.add_argument("--model", default=None,
                   help="serve, decode: a saved model (default: --preset with random weights); decode of a saved "
                        "model: one row against its weights' roofline")
    p.add_argument("--workloads", default="concurrent,agent", help="serve: concurrent, agent, or both")
    p.add_argument("--requests", type=int, default=16, help="serve: concurrent clients")
    p.add_argument("--output-tokens", type=int, default=256, help="serve: tokens each concurrent request generates")
    p.add_argument("--max-num-seqs", type=int, default=16, help="serve: rows of the concurrent server")
    p.add_argument("--agent-context", type=int, default=32768, help="serve: the agent session grows to this")
    p.add_argument("--agent-tool-tokens", type=int, default=400, help="serve: tokens of each tool result")
    p.add_argument("--agent-reply-tokens", type=int, default=16, help="serve: tokens of each agent turn's reply")
    p.add_argument("--baseline-every", type=int, default=8,
                   help="serve: every N-th agent turn (and the last) is also served without the prefix cache")
