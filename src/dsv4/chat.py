"""DeepSeek-V4's chat format: OpenAI-style messages -> one prompt string, and model text -> an assistant message.

Everything here follows the chat format spec (docs/chat-format.md), which restates the encoder DeepSeek ships beside
the V4 weights; the token strings and fixed texts are data of the interface, reproduced byte for byte.

- ``encode_messages(messages, thinking_mode, reasoning_effort, drop_thinking, add_bos)`` renders a conversation:
  list-of-parts content is flattened, tool messages are merged into user turns (in the order of the calls), old
  thinking is dropped, and each message is rendered and followed by what the spec says (assistant opener, task token).
  The official encoder's two quirks are kept: a user message followed by a ``latest_reminder`` gets the assistant
  opener before the reminder, and a tool result merges into a user message that carries a ``task``.
- ``parse_completion(text, thinking_mode, finished=None)`` turns generated text into ``content``,
  ``reasoning_content``, OpenAI ``tool_calls`` and a ``finish_reason``; it never raises on model output.
- ``StreamParser`` does the same incrementally, holding back any text that could still turn out to be part of a marker.

Bad input to the encoder (unknown role or task, a non-text content part, ...) raises ``ValueError``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
ACTION, QUERY, AUTHORITY = "<｜action｜>", "<｜query｜>", "<｜authority｜>"
DOMAIN, TITLE, READ_URL = "<｜domain｜>", "<｜title｜>", "<｜read_url｜>"
TASK_TOKENS = {"action": ACTION, "query": QUERY, "authority": AUTHORITY, "domain": DOMAIN, "title": TITLE,
               "read_url": READ_URL}
# Every special token the format uses; each is one added token of DeepSeek-V4's tokenizer (``｜DSML｜`` included).
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END, DSML, *TASK_TOKENS.values())

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
TOOL_CALLS_MARK = "\n\n" + TOOL_CALLS_OPEN  # where content ends and a tool-call block begins

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501

RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

_INVOKE = re.compile(rf'\s*<{DSML}invoke name="([^"]+)">(.*?)</{DSML}invoke>', re.S)
_PARAM = re.compile(rf'\s*<{DSML}parameter name="([^"]+)"(?: string="([^"]*)")?>(.*?)</{DSML}parameter>', re.S)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------- encoding


def render_tools_system(tools: list[dict] | None, response_format: Any = None) -> str:
    """What a system or developer message appends after its content: ``"\\n\\n"`` + the tools section when it has
    tools, then ``"\\n\\n"`` + the response-format section when it has a response format."""
    out = ""
    if tools:
        schemas = "\n".join(_dumps(tool.get("function", tool)) for tool in tools)
        out += "\n\n" + TOOLS_TEMPLATE.replace("{schemas}", schemas)
    if response_format:
        out += "\n\n" + RESPONSE_FORMAT_HEADER + _dumps(response_format)
    return out


def _flatten(content: Any, where: str) -> str | None:
    """Step 0: list-of-parts content becomes its text parts' texts concatenated; any other part is refused."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string, None or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise ValueError(f"{where}: content part of type {kind!r} is not supported (only text parts are)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: a text part needs a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def _check_message(i: int, msg: dict) -> dict:
    if not isinstance(msg, dict):
        raise ValueError(f"message {i}: expected a dict, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    task = msg.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ValueError(f"message {i}: unknown task {task!r} (expected one of {', '.join(TASK_TOKENS)})")
    return {**msg, "content": _flatten(msg.get("content"), f"message {i} ({role})")}


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """Step 1: tool messages become tool_result blocks of user messages; user text joins a preceding user message
    that carries no task. (A tool result joins one that does: the official encoder's behaviour.)"""
    out: list[dict] = []
    for msg in messages:
        prev = out[-1] if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list) else None
        if msg["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id") or "", "content": msg["content"]}
            if prev is not None:
                prev["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        elif msg["role"] == "user":
            block = {"type": "text", "text": msg["content"]}
            if prev is not None and prev.get("task") is None:
                prev["content"].append(block)
            else:
                kept = {k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg}
                out.append({"role": "user", "content": [block], **kept})
        else:
            out.append(msg)
    return out


def _order_tool_results(messages: list[dict]) -> None:
    """Step 2: in a user message with several tool results, those results follow the order of the latest assistant
    message's calls (unknown id = 0, stable sort), each staying in a slot that tool results occupy."""
    position: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant":
            position = {call.get("id"): j for j, call in enumerate(msg.get("tool_calls") or [])}
        elif msg["role"] == "user" and isinstance(msg["content"], list):
            slots = [j for j, block in enumerate(msg["content"]) if block["type"] == "tool_result"]
            if len(slots) > 1:
                results = sorted((msg["content"][j] for j in slots), key=lambda b: position.get(b["tool_use_id"], 0))
                for j, block in zip(slots, results):
                    msg["content"][j] = block


def _last_user_index(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _drop_old_thinking(messages: list[dict]) -> list[dict]:
    """Step 4: before the last user/developer message, assistants lose their reasoning and developers are removed."""
    last, out = _last_user_index(messages), []
    for i, msg in enumerate(messages):
        if i >= last or msg["role"] in ("user", "system", "tool", "latest_reminder"):
            out.append(msg)
        elif msg["role"] == "assistant":
            out.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return out


def _render_block(block: Any) -> str:
    kind = block.get("type") if isinstance(block, dict) else type(block).__name__
    if kind == "text":
        return block.get("text") or ""
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            content = "\n\n".join(_render_block(b) if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
                                  for b in content)
        return "<tool_result>" + (content or "") + "</tool_result>"
    return f"[Unsupported {kind}]"


def _call_arguments(arguments: Any) -> dict:
    """A call's arguments as key -> value pairs: the JSON object it holds, else the pair ``arguments`` -> raw text."""
    if arguments is None:
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": arguments}


def render_tool_calls(tool_calls: list[dict]) -> str:
    """An assistant's OpenAI ``tool_calls`` as a DSML block, ``"\\n\\n"`` included ("" when there are none)."""
    if not tool_calls:
        return ""
    invokes = []
    for call in tool_calls:
        fn = call.get("function", call)
        params = [f'<{DSML}parameter name="{key}" string="true">{value}</{DSML}parameter>' if isinstance(value, str)
                  else f'<{DSML}parameter name="{key}" string="false">{_dumps(value)}</{DSML}parameter>'
                  for key, value in _call_arguments(fn.get("arguments")).items()]
        invokes.append(f'<{DSML}invoke name="{fn.get("name")}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return TOOL_CALLS_MARK + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


def _render_message(messages: list[dict], i: int, thinking: bool, drop: bool, last: int) -> str:
    """Step 5: one message's own text."""
    msg = messages[i]
    role, content = msg["role"], msg.get("content")
    if role == "system":
        return (content or "") + render_tools_system(msg.get("tools"), msg.get("response_format"))
    if role == "developer":
        if not content:
            raise ValueError(f"message {i}: a developer message needs non-empty content")
        return USER + content + render_tools_system(msg.get("tools"), msg.get("response_format"))
    if role == "user":
        return USER + ("\n\n".join(map(_render_block, content)) if isinstance(content, list) else content or "")
    if role == "latest_reminder":
        return LATEST_REMINDER + (content or "")
    if role == "assistant":
        thought = ""
        if thinking and (i == 0 or messages[i - 1].get("task") is None) and (not drop or i > last):
            thought = (msg.get("reasoning_content") or "") + THINK_END
        tail = "" if msg.get("wo_eos") else EOS
        return thought + (content or "") + render_tool_calls(msg.get("tool_calls") or []) + tail
    if role == "tool":
        raise ValueError(f"message {i}: a tool message reached rendering (tool results must be merged into user turns)")
    raise ValueError(f"message {i}: unknown role {role!r}")


def _render_after(messages: list[dict], i: int, thinking: bool, drop: bool, last: int) -> str:
    """Step 6: what follows a message: the assistant opener, a task token, or nothing."""
    msg = messages[i]
    if i + 1 < len(messages) and messages[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"message {i}: unknown task {task!r}")
        if task == "action":
            return ASSISTANT + (THINK_START if thinking else THINK_END) + ACTION
        return TASK_TOKENS[task]
    if msg["role"] in ("user", "developer"):
        return ASSISTANT + (THINK_START if thinking and (not drop or i >= last) else THINK_END)
    return ""


def encode_messages(messages: list[dict], thinking_mode: str = "chat", reasoning_effort: str | None = None,
                    drop_thinking: bool = True, add_bos: bool = True) -> str:
    """Render OpenAI-style messages as one DeepSeek-V4 prompt (the spec's steps 0-6). A prompt ending in a user or
    developer message ends with the assistant opener, ready for generation. ``add_bos=False`` encodes a
    continuation of an earlier context. Bad input raises ``ValueError``."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be None, 'high' or 'max', got {reasoning_effort!r}")
    msgs = [_check_message(i, m) for i, m in enumerate(messages)]
    thinking = thinking_mode == "thinking"
    drop = drop_thinking and not any(m.get("tools") for m in msgs)  # agent dialogs keep interleaved thinking
    msgs = _merge_tool_results(msgs)
    _order_tool_results(msgs)
    if thinking and drop:
        msgs = _drop_old_thinking(msgs)
    last = _last_user_index(msgs)
    out = BOS if add_bos else ""
    if thinking and reasoning_effort == "max" and msgs:
        out += REASONING_EFFORT_MAX
    for i in range(len(msgs)):
        out += _render_message(msgs, i, thinking, drop, last) + _render_after(msgs, i, thinking, drop, last)
    return out


# ---------------------------------------------------------------------------------------------------- parsing


def _parse_params(body: str) -> dict | None:
    args, pos = {}, 0
    while m := _PARAM.match(body, pos):
        name, string, value = m.groups()
        if string == "true":
            args[name] = value
        else:
            try:
                args[name] = json.loads(value)
            except ValueError:
                return None
        pos = m.end()
    return args if not body[pos:].strip() else None


def _parse_tool_block(block: str) -> list[tuple[str, str]] | None:
    """``(name, arguments JSON)`` per invoke of a block that starts with ``<｜DSML｜tool_calls>``; None when the block
    is unclosed, malformed, empty, or followed by anything (a repeated block included)."""
    end = block.find(TOOL_CALLS_CLOSE)
    if end < 0 or end + len(TOOL_CALLS_CLOSE) != len(block):
        return None
    body, calls, pos = block[len(TOOL_CALLS_OPEN):end], [], 0
    while m := _INVOKE.match(body, pos):
        args = _parse_params(m.group(2))
        if args is None:
            return None
        calls.append((m.group(1), _dumps(args)))
        pos = m.end()
    return calls if calls and not body[pos:].strip() else None


def _tool_call(name: str, arguments: str) -> dict:
    fn = {"name": name, "arguments": arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": fn}


def _check_mode(thinking_mode: str) -> bool:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    return thinking_mode == "thinking"


def parse_completion(text: str, thinking_mode: str = "chat", *, finished: bool | None = None) -> dict:
    """The assistant message in generated ``text`` (what follows the prompt): ``content``, ``reasoning_content``
    (None in chat mode), OpenAI ``tool_calls`` and ``finish_reason``. EOS ends the text (anything after it is
    ignored); without EOS the text counts as cut off unless ``finished=True`` (e.g. a stop string ended it)."""
    thinking = _check_mode(thinking_mode)
    cut = text.find(EOS)
    ended = cut >= 0 or bool(finished)
    text = text[:cut] if cut >= 0 else text
    reasoning = None
    if thinking:
        k = text.find(THINK_END)
        if k < 0:  # cut off while thinking
            return {"content": "", "reasoning_content": text, "tool_calls": [], "finish_reason": "length"}
        reasoning, text = text[:k], text[k + len(THINK_END):]
    p = text.find(TOOL_CALLS_MARK)
    calls = _parse_tool_block(text[p + 2:]) if p >= 0 else None
    if calls is not None:
        return {"content": text[:p], "reasoning_content": reasoning,
                "tool_calls": [_tool_call(*c) for c in calls], "finish_reason": "tool_calls"}
    return {"content": text, "reasoning_content": reasoning, "tool_calls": [],
            "finish_reason": "stop" if ended else "length"}


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


class StreamParser:
    """``parse_completion`` incrementally. ``feed(delta)`` and ``finish(finished)`` return events
    ``{"type": "reasoning" | "content", "text"}`` and ``{"type": "tool_call", "tool_call"}`` (OpenAI form with an
    ``index``). Text that could still become part of ``</think>``, of the tool-call marker or of EOS is held back; a
    tool-call block is held whole, and its calls are emitted once the stream has ended (EOS or ``finish``) with the
    block closed, well-formed and last; otherwise the held text is emitted as content. The events concatenate to
    ``parse_completion``'s result; ``finish_reason`` is set once the stream has ended."""

    def __init__(self, thinking_mode: str = "chat"):
        self._phase = "reasoning" if _check_mode(thinking_mode) else "content"
        self._buf = ""
        self._scan = 0  # in a tool-call block: where the search for EOS resumes
        self.finish_reason: str | None = None

    def feed(self, text: str) -> list[dict]:
        if self._phase == "done":
            return []
        self._buf += text
        events: list[dict] = []
        while True:
            if self._phase == "block":
                cut = self._buf.find(EOS, self._scan)
                if cut < 0:
                    self._scan = max(0, len(self._buf) - len(EOS) + 1)
                    return events
                self._buf = self._buf[:cut]
                return events + self._end(True)
            markers = (THINK_END, EOS) if self._phase == "reasoning" else (TOOL_CALLS_MARK, EOS)
            hits = [(i, m) for m in markers if (i := self._buf.find(m)) >= 0]
            if not hits:
                keep = len(self._buf) - _held(self._buf, markers)
                self._emit(events, self._buf[:keep])
                self._buf = self._buf[keep:]
                return events
            i, marker = min(hits)
            self._emit(events, self._buf[:i])
            if marker == EOS:
                self._buf = ""
                return events + self._end(True)
            if marker == THINK_END:
                self._buf, self._phase = self._buf[i + len(THINK_END):], "content"
            else:
                self._buf, self._phase, self._scan = self._buf[i:], "block", 0

    def finish(self, finished: bool) -> list[dict]:
        """End of stream: ``finished`` says whether generation ended on its own (a stop string) rather than being
        cut off; after EOS it changes nothing."""
        return [] if self._phase == "done" else self._end(finished)

    def _emit(self, events: list[dict], text: str) -> None:
        if text:
            events.append({"type": "reasoning" if self._phase == "reasoning" else "content", "text": text})

    def _end(self, ended: bool) -> list[dict]:
        events: list[dict] = []
        calls = _parse_tool_block(self._buf[2:]) if self._phase == "block" else None
        if calls is not None:
            events = [{"type": "tool_call", "tool_call": {"index": j, **_tool_call(*c)}} for j, c in enumerate(calls)]
            self.finish_reason = "tool_calls"
        else:
            self.finish_reason = "length" if self._phase == "reasoning" or not ended else "stop"
            if self._phase == "block":
                self._phase = "content"
            self._emit(events, self._buf)
        self._buf, self._phase = "", "done"
        return events
