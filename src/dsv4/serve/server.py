"""The OpenAI-compatible HTTP server on FastAPI: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health`` and ``/metrics`` (Prometheus text).

Chat requests are rendered in DeepSeek-V4's own format (``dsv4.chat``): tools (``tool_choice`` "auto" or "none") and
``response_format`` go into the system message, thinking is on with ``"thinking": {"type": "enabled"}`` (DeepSeek's
API) or ``chat_template_kwargs: {"thinking": true}`` (vLLM's; ``thinking`` wins when both are given), and the
completion comes back parsed into ``reasoning_content``, ``content`` and OpenAI ``tool_calls``. The engine runs in its
own thread; handlers only queue requests and relay their events, so HTTP never waits on a model step. A client that
goes away cancels its request and frees its rows.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from dsv4 import chat
from dsv4.serve.engine import Engine, Request
from dsv4.serve.sampling import EngineError, Event, SamplingParams, add_event, new_outputs
from dsv4.serve.metrics import Metrics

ROLES = {"system", "developer", "user", "assistant", "tool", "latest_reminder"}
EFFORTS = {"low": None, "medium": None, "high": None, "max": "max"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    code = {401: "invalid_api_key", 404: "model_not_found"}.get(status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Thinking(BaseModel):
    type: Literal["enabled", "disabled"]


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # an extension, as vLLM has: generate to max_tokens whatever the model says

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs, n=self.n)


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None


def render_chat(req: ChatRequest) -> tuple[str, str]:
    """(the prompt text, the thinking mode) of a chat request; ``APIError`` for what cannot be rendered."""
    messages = []
    for i, m in enumerate(req.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise APIError(400, f"messages[{i}]: unknown role {role!r}; expected one of {sorted(ROLES)}",
                           f"messages[{i}].role")
        messages.append(dict(m))
    if not messages:
        raise APIError(400, "messages must hold at least one message", "messages")
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if choice not in ("auto", "none"):
        raise APIError(400, f"tool_choice {choice!r} is not supported; use 'auto' or 'none'", "tool_choice")
    extra = {}
    if req.tools and choice == "auto":
        extra["tools"] = req.tools
    if req.response_format and req.response_format.get("type", "text") != "text":
        extra["response_format"] = req.response_format
    if extra:
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        messages[0].update(extra)
    thinking = bool((req.chat_template_kwargs or {}).get("thinking", False))
    if req.thinking is not None:
        thinking = req.thinking.type == "enabled"
    mode = "thinking" if thinking else "chat"
    if req.reasoning_effort is not None and req.reasoning_effort not in EFFORTS:
        raise APIError(400, f"reasoning_effort must be one of {sorted(EFFORTS)}, got {req.reasoning_effort!r}",
                       "reasoning_effort")
    effort = EFFORTS.get(req.reasoning_effort) if thinking else None
    try:
        return chat.encode_messages(messages, thinking_mode=mode, reasoning_effort=effort), mode
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None


def build_app(engine: Engine, tokenizer, *, model_name: str, api_key: str | None = None,
              metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="dsv4", version="0.1.0")
    metrics = metrics or Metrics(engine)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.kind)

    @app.exception_handler(EngineError)
    async def _engine_error(_, e: EngineError):
        return error_response(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}", where)

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "a valid API key is needed: Authorization: Bearer KEY",
                                      kind="authentication_error")
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model")

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return error_response(503, f"the engine has stopped: {engine.error}", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dsv4", "max_model_len": engine.max_model_len}]}

    async def run(prompt_ids: list[int], params: SamplingParams, http: HTTPRequest):
        """Submit; yields (Event | None at the end, request). Cancels the request if the consumer goes away."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = Request(prompt_ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        engine.submit(req)
        metrics.request_started(req)
        left = params.n
        try:
            while left:
                ev: Event = await events.get()
                metrics.on_event(req, ev)
                if ev.finish_reason is not None:
                    left -= 1
                yield ev, req
        finally:
            if left:
                req.cancel()
                engine.wake.set()
            metrics.request_done(req)

    async def collect(prompt_ids: list[int], params: SamplingParams, http: HTTPRequest) -> tuple[list[dict], Request]:
        """A whole (non-streaming) request: each sample's outputs (``add_event``), and the request."""
        outs, req = new_outputs(params.n), None
        async for ev, req in run(prompt_ids, params, http):
            add_event(outs, ev)
        return outs, req

    def usage(req: Request, completion_tokens: int) -> dict:
        n = len(req.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_end(body, req: Request | None, tokens: int, rid: str, now: int, kind: str) -> list[str]:
        """A stream's last events: the usage chunk if ``stream_options.include_usage`` asked for it, then [DONE]."""
        out = []
        if body.stream_options and body.stream_options.include_usage and req is not None:
            out.append(sse({"id": rid, "object": kind, "created": now, "model": body.model, "choices": [],
                            "usage": usage(req, tokens)}))
        return out + ["data: [DONE]\n\n"]

    # ------------------------------------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        if isinstance(body.prompt, str):
            ids = tokenizer.encode(body.prompt, bos=tokenizer.bos_id is not None)
        else:
            ids = list(body.prompt)
        params = body.sampling(body.max_tokens, body.logprobs)
        engine.validate(ids, params)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs_of(lps: list[dict]) -> dict | None:
            if body.logprobs is None:
                return None
            return {"tokens": [tokenizer.decode([lp["token"]]) for lp in lps],
                    "token_logprobs": [lp["logprob"] for lp in lps],
                    "top_logprobs": [{tokenizer.decode([i]): v for i, v in lp["top"]} for lp in lps]}

        if body.stream:
            async def stream():
                tokens = 0
                req = None
                async for ev, req in run(ids, params, http):
                    tokens += len(ev.token_ids)
                    if ev.text or ev.finish_reason or (body.logprobs is not None and ev.token_ids):
                        choice = {"index": ev.index, "text": ev.text, "logprobs": logprobs_of(ev.logprobs),
                                  "finish_reason": ev.finish_reason}
                        yield sse({"id": rid, "object": "text_completion", "created": now, "model": body.model,
                                   "choices": [choice]})
                for line in stream_end(body, req, tokens, rid, now, "text_completion"):
                    yield line
            return StreamingResponse(stream(), media_type="text/event-stream")

        outs, req = await collect(ids, params, http)
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": [{"index": i, "text": o["text"], "logprobs": logprobs_of(o["logprobs"]),
                             "finish_reason": o["finish_reason"]} for i, o in enumerate(outs)],
                "usage": usage(req, sum(len(o["token_ids"]) for o in outs))}

    # ----------------------------------------------------------------------------------------------------- chat
    def chat_logprobs(lps: list[dict]) -> list[dict]:
        def entry(token: int, lp: float) -> dict:
            text = tokenizer.decode([token])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return [dict(entry(lp["token"], lp["logprob"]), top_logprobs=[entry(i, v) for i, v in lp["top"]])
                for lp in lps]

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        check_model(body.model)
        prompt, mode = render_chat(body)
        ids = tokenizer.encode_prompt(prompt)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs if body.top_logprobs is not None else 0
        params = body.sampling(limit, top if body.logprobs else None)
        engine.validate(ids, params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": body.model,
                    "choices": [choice]}

        if body.stream:
            async def stream():
                parsers = [chat.StreamParser(mode) for _ in range(params.n)]
                calls = [0] * params.n
                tokens = 0
                req = None
                for i in range(params.n):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}))
                async for ev, req in run(ids, params, http):
                    tokens += len(ev.token_ids)
                    parser = parsers[ev.index]
                    out = parser.feed(ev.text)
                    if ev.finish_reason is not None:
                        out += parser.finish(ev.finish_reason == "stop")
                    lp = {"content": chat_logprobs(ev.logprobs)} if body.logprobs and ev.logprobs else None
                    for item in out:
                        if item["type"] == "tool_call":
                            call = dict(item["tool_call"], index=calls[ev.index])
                            calls[ev.index] += 1
                            delta = {"tool_calls": [call]}
                        else:
                            delta = {"reasoning_content" if item["type"] == "reasoning" else "content": item["text"]}
                        yield sse(chunk(ev.index, delta, logprobs=lp))
                        lp = None
                    if lp is not None:
                        yield sse(chunk(ev.index, {}, logprobs=lp))
                    if ev.finish_reason is not None:
                        finish = parser.finish_reason if ev.finish_reason != "abort" else "abort"
                        yield sse(chunk(ev.index, {}, finish))
                for line in stream_end(body, req, tokens, rid, now, "chat.completion.chunk"):
                    yield line
            return StreamingResponse(stream(), media_type="text/event-stream")

        outs, req = await collect(ids, params, http)
        choices = []
        for i, o in enumerate(outs):
            parsed = chat.parse_completion(o["text"], mode, finished=o["finish_reason"] == "stop")
            message = {"role": "assistant", "content": parsed["content"]}
            if mode == "thinking":
                message["reasoning_content"] = parsed["reasoning_content"]
            if parsed["tool_calls"]:
                message["tool_calls"] = parsed["tool_calls"]
            choices.append({"index": i, "message": message, "finish_reason": parsed["finish_reason"],
                            "logprobs": {"content": chat_logprobs(o["logprobs"])} if body.logprobs else None})
        return {"id": rid, "object": "chat.completion", "created": now, "model": body.model, "choices": choices,
                "usage": usage(req, sum(len(o["token_ids"]) for o in outs))}

    return app
