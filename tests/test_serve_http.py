"""`dsv4 serve` as a live process on localhost, driven by the official `openai` client: chat and completions,
streaming equal to non-streaming, stop strings, n, thinking, tool calls end to end (a tiny model taught by SFT to
answer a weather question with a DSML call), errors, the API key, dropped streams, and faults (many concurrent
requests with a third dropped; a server killed while writing its disk cache)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from dsv4 import ModelConfig, Transformer, chat  # noqa: E402
from dsv4.data import train_bpe  # noqa: E402
from dsv4.serve.bench import LiveServer  # noqa: E402

KEY = "sk-test"
NAME = "tiny-chat"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}


def corpus_text() -> str:
    """A few kilobytes of English and code for a small BPE."""
    root = Path(__file__).resolve().parents[1]
    return (root / "docs" / "chat-format.md").read_text() + (root / "README.md").read_text()


def taught_model(path: Path):
    """A tiny model with a 700-id BPE (V4's chat tokens reserved) taught by SFT to answer the weather question,
    with the weather tool in its system prompt, by a DSML call; saved to ``path`` with its tokenizer."""
    from dsv4.posttrain.sft import sft_loss

    text = path.parent / "corpus.txt"
    text.write_text(corpus_text())
    tok = train_bpe(text, 700)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, max_position_embeddings=4096))
    system = [{"role": "system", "content": "", "tools": [WEATHER_TOOL]}]
    prompt = tok.encode_prompt(chat.encode_messages(system + ASK))
    full = tok.encode_prompt(chat.encode_messages(system + ASK + [CALL]))
    assert full[:len(prompt)] == prompt
    p, a = torch.tensor([prompt]), torch.tensor([full[len(prompt):]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        loss = sft_loss(model, p, a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval().save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return model, tok


class Server(LiveServer):
    """The test's server: four rows of 1,024 tokens, chunks of 64, the API key; with an ``openai`` client."""

    def __init__(self, model_dir: Path, *extra: str, api_key: str | None = KEY):
        super().__init__(model_dir, "--max-model-len", "1024", "--max-num-seqs", "4", "--prefill-chunk", "64",
                         "--no-compile",
                         *extra, *(["--api-key", api_key] if api_key else []), name=NAME, timeout=120)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model, tok = taught_model(root / "model")
    server = Server(root / "model")
    yield server, model, tok, root
    server.stop()


def greedy(**kw):
    return dict(temperature=0, **kw)


def test_models_health_and_metrics(served):
    server, *_ = served
    assert [m.id for m in server.client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert server.metric("dsv4_kv_bytes_in_use") == 0


def test_chat_streaming_equals_non_streaming(served):
    server, *_ = served
    messages = [{"role": "user", "content": "Tell me about the chat format."}]
    whole = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, **greedy())
    parts = list(server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, stream=True,
                                                       stream_options={"include_usage": True}, **greedy()))
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    finish = [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and finish == [whole.choices[0].finish_reason]
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens == len(served[2].encode_prompt(chat.encode_messages(messages)))


def test_completions_stream_stop_and_n(served):
    server, *_ = served
    whole = server.client.completions.create(model=NAME, prompt="The model", max_tokens=20, **greedy())
    text = "".join(c.choices[0].text for c in server.client.completions.create(
        model=NAME, prompt="The model", max_tokens=20, stream=True, **greedy()))
    assert text == whole.choices[0].text and len(whole.choices[0].text) > 4
    stop = whole.choices[0].text[3:5]
    cut = server.client.completions.create(model=NAME, prompt="The model", max_tokens=20, stop=[stop], **greedy())
    assert cut.choices[0].text == whole.choices[0].text[:whole.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = server.client.completions.create(model=NAME, prompt="The model", max_tokens=8, n=3, seed=1,
                                            temperature=1.0, logprobs=2)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert sum(len(c.logprobs.token_logprobs) for c in many.choices) == many.usage.completion_tokens
    assert all(1 <= len(top) <= 2 for c in many.choices for top in c.logprobs.top_logprobs)
    assert all(lp <= 0 for c in many.choices for lp in c.logprobs.token_logprobs)


def test_thinking_mode_returns_reasoning_content(served):
    server, *_ = served
    r = server.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=8, extra_body={
        "thinking": {"type": "enabled"}, "chat_template_kwargs": {"thinking": False}}, **greedy())
    message = r.choices[0].message
    reasoning = getattr(message, "reasoning_content", None)
    if reasoning is None:
        reasoning = message.model_extra.get("reasoning_content")
    assert isinstance(reasoning, str) and len(reasoning) > 0  # an untrained thought, cut off by max_tokens
    assert r.choices[0].finish_reason == "length" and message.content == ""


def test_tool_calls_end_to_end(served):
    server, model, tok, _ = served
    r = server.client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER_TOOL], max_tokens=80,
                                              **greedy())
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    stream = server.client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER_TOOL], max_tokens=80,
                                                   stream=True, **greedy())
    deltas = [c.choices[0].delta for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    # the tool's result goes back: it renders as a user turn holding a <tool_result>
    follow = ASK + [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    r2 = server.client.chat.completions.create(model=NAME, messages=follow, tools=[WEATHER_TOOL], max_tokens=4,
                                               **greedy())
    want = chat.encode_messages([{"role": "system", "content": "", "tools": [WEATHER_TOOL]}] + follow)
    assert "<tool_result>18 degrees, sunny</tool_result>" in want
    assert r2.usage.prompt_tokens == len(tok.encode_prompt(want))


def test_prefix_reuse_is_reported(served):
    server, *_ = served
    long = [{"role": "user", "content": " ".join(f"item {i}" for i in range(120))}]
    server.client.chat.completions.create(model=NAME, messages=long, max_tokens=2, **greedy())
    again = server.client.chat.completions.create(model=NAME, messages=long, max_tokens=2, **greedy())
    assert again.usage.prompt_tokens_details.cached_tokens >= 64
    assert server.metric("dsv4_prefix_cache_hits") >= 1


@pytest.mark.parametrize("body, status, words", [
    ({"model": "nope", "messages": ASK}, 404, "does not exist"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role"),
    ({"model": NAME, "messages": ASK, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": NAME, "messages": ASK, "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x " * 1500}]}, 400, "maximum context length"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "image_url"),
])
def test_bad_requests_get_openai_shaped_errors(served, body, status, words):
    server, *_ = served
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_malformed_json_and_the_api_key(served):
    server, *_ = served
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def wait_idle(server, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.metric("dsv4_running_sequences") == 0 and server.metric("dsv4_kv_bytes_in_use") == 0 and \
                server.metric("dsv4_waiting_requests") == 0:
            return True
        time.sleep(0.1)
    return False


def test_concurrent_requests_with_a_third_dropped(served):
    """64 requests at once, every third dropped mid-stream: the others give exactly what each gives alone, and the
    decode state held by requests returns to zero."""
    server, *_ = served
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(300, 690, (8 + i % 8,), generator=g).tolist() for i in range(64)]  # under a block
    alone = {}
    for i, p in enumerate(prompts):
        if i % 3:
            alone[i] = server.client.completions.create(model=NAME, prompt=p, max_tokens=12, **greedy(),
                                                        extra_body={"ignore_eos": True}).choices[0].text
    got = {}

    def one(i):
        stream = server.client.completions.create(model=NAME, prompt=prompts[i], max_tokens=12, stream=True,
                                                  extra_body={"ignore_eos": True}, **greedy())
        text = ""
        for n, c in enumerate(stream):
            text += c.choices[0].text if c.choices else ""
            if i % 3 == 0 and n == 2:
                stream.close()  # the client goes away
                return
        got[i] = text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == alone
    assert wait_idle(server)


def test_a_server_killed_while_writing_its_disk_cache_restarts_and_answers(served):
    _, _, tok, root = served
    cache_dir = root / "kv"
    args = ("--kv-cache-dir", str(cache_dir), "--kv-cache-disk-gib", "1")
    prompt = torch.randint(300, 690, (700,), generator=torch.Generator().manual_seed(1)).tolist()
    server = Server(root / "model", *args, "--no-prefix-cache", api_key=None)
    try:  # the reference: no cache at all
        want = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=6, **greedy()).choices[0].text
    finally:
        server.stop()
    server = Server(root / "model", *args, api_key=None)

    def doomed():
        with pytest.raises(openai.APIConnectionError):  # the server dies under it
            server.client.completions.create(model=NAME, prompt=prompt, max_tokens=6, **greedy())

    threading.Thread(target=doomed, daemon=True).start()
    deadline = time.time() + 60
    while not list(cache_dir.rglob("*.safetensors")) and time.time() < deadline:
        time.sleep(0.01)
    server.stop(signal.SIGKILL)  # in the middle of its prefill's writes
    files = sorted(cache_dir.rglob("*.safetensors"))
    assert files
    files[-1].write_bytes(files[-1].read_bytes()[:100])  # as if the kill had cut a file short
    server = Server(root / "model", *args, api_key=None)
    try:
        got = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=6, **greedy()).choices[0].text
        assert got == want
        assert any("skipping" in line for line in server.log)
    finally:
        server.stop()


def test_speculative_server_and_terminal_chat_give_the_same_greedy_text(served):
    """`dsv4 serve --speculative` (the MTP block drafts, every step checks) and `dsv4 chat` answer as the plain
    server does."""
    server, _, _, root = served
    messages = [{"role": "user", "content": "Describe the tools section."}]
    want = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, **greedy())
    content = want.choices[0].message.content
    spec = Server(root / "model", "--speculative", api_key=None)
    try:
        got = spec.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, **greedy())
        assert got.choices[0].message.content == content
    finally:
        spec.stop()
    out = subprocess.run([sys.executable, "-m", "dsv4", "chat", "--model", str(root / "model"), "--max-tokens", "12",
                          "--temperature", "0", "--max-model-len", "1024", "--no-compile"],
                         input=messages[0]["content"] + "\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"[answer]\n{content}\n" in out.stdout
