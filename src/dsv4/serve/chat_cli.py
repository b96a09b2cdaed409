"""``dsv4 chat``: a conversation in the terminal on the serving engine, streaming, in DeepSeek-V4's chat format; with
``--thinking`` the model's reasoning is shown apart from its answer. Lines are read from standard input (a pipe
works too); ``/exit`` or end of input ends the session, ``/reset`` starts a new conversation."""

from __future__ import annotations

import sys
import threading

from dsv4.serve.cli import add_engine_arguments, build_engine


def add_arguments(p) -> None:
    add_engine_arguments(p)
    p.set_defaults(max_num_seqs=1)  # one conversation
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    p.add_argument("--thinking", action="store_true", help="thinking mode: the model reasons before it answers")
    p.add_argument("--reasoning-effort", choices=["high", "max"], default=None, help="with --thinking")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)


def reply(engine, tokenizer, messages: list[dict], args, out) -> dict:
    """Stream the model's next assistant turn to ``out`` (its reasoning under a ``[thinking]`` header, then its answer
    under ``[answer]``) and return it as a message."""
    from dsv4 import chat
    from dsv4.serve.engine import Request
    from dsv4.serve.sampling import SamplingParams

    mode = "thinking" if args.thinking else "chat"
    prompt = chat.encode_messages(messages, thinking_mode=mode,
                                  reasoning_effort=args.reasoning_effort if args.thinking else None)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    parser = chat.StreamParser(mode)
    section = [None]
    done = threading.Event()
    said = {"reasoning": "", "content": "", "tool_calls": []}

    def show(items) -> None:
        for item in items:
            kind = item["type"]
            if kind == "tool_call":
                said["tool_calls"].append({k: v for k, v in item["tool_call"].items() if k != "index"})
            else:
                said[kind] += item["text"]
            if kind != section[0]:
                out.write({"reasoning": "\n[thinking]\n", "content": "\n[answer]\n"}.get(kind, "\n"))
                section[0] = kind
            if kind == "tool_call":
                fn = item["tool_call"]["function"]
                out.write(f"[tool call] {fn['name']}({fn['arguments']})\n")
            else:
                out.write(item["text"])
            out.flush()

    def emit(ev) -> None:
        show(parser.feed(ev.text))
        if ev.finish_reason is not None:
            show(parser.finish(ev.finish_reason == "stop"))
            done.set()

    engine.submit(Request(tokenizer.encode_prompt(prompt), params, emit))
    done.wait()
    out.write("\n")
    out.flush()
    message = {"role": "assistant", "content": said["content"]}
    if said["reasoning"]:
        message["reasoning_content"] = said["reasoning"]
    if said["tool_calls"]:
        message["tool_calls"] = said["tool_calls"]
    return message


def run(args) -> int:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    from dsv4.parallel.mesh import launched

    if launched():
        raise ValueError("dsv4 chat runs in one process; with the experts spread over ranks, run `torchrun ... -m "
                         "dsv4 serve` and chat through its API")
    engine, tokenizer, path = build_engine(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    out = sys.stdout
    out.write(f"dsv4 chat: {path.name} ({'thinking' if args.thinking else 'chat'} mode); /reset, /exit\n")
    # the conversation in a thread, the engine in the main thread (where the model's steps run fastest)
    threading.Thread(target=converse, args=(engine, tokenizer, args, start, out), daemon=True).start()
    engine.run()
    return 1 if engine.error is not None else 0


def converse(engine, tokenizer, args, start: list[dict], out) -> None:
    """Read lines, answer each; stops the engine at the end of input or ``/exit``."""
    messages = list(start)
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                out.write("\n> ")
                out.flush()
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                break
            text = line.rstrip("\n")
            if text.strip() == "/reset":
                messages = list(start)
                continue
            if not text.strip():
                continue
            if not interactive:
                out.write(f"\n> {text}\n")
            messages.append({"role": "user", "content": text})
            messages.append(reply(engine, tokenizer, messages, args, out))
    finally:
        engine.stop()
