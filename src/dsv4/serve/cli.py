"""``dsv4 serve``: the OpenAI-compatible server on a saved model (see ``dsv4.serve.server``)."""

from __future__ import annotations

import logging
import sys
from functools import partial

GIB = 1 << 30


def add_engine_arguments(p) -> None:
    """The options of the model and its engine, shared by ``dsv4 serve`` and ``dsv4 chat``."""
    p.add_argument("--model", required=True, help="a model directory (HF or official layout), or a `dsv4 train` run")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, a folder holding one, or 'deepseek-v4' (default: the one beside the model)")
    p.add_argument("--numerics", choices=["official", "plain"], default=None,
                   help="DeepSeek's inference roundings (dsv4.model.numerics) or none (default: official for an "
                        "official-layout checkpoint, plain for HF layout)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the longest sequence (prompt and completion) a request may reach; each decoding row holds "
                        "this much (default: the model's max_position_embeddings, at most 32768)")
    p.add_argument("--max-num-seqs", type=int, default=8,
                   help="sequences decoded together (the fixed row count of every decoding step)")
    p.add_argument("--kv-memory-gib", type=float, default=None,
                   help="memory for the decode state; fewer rows than --max-num-seqs if they do not fit")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per engine turn, between decoding steps (a multiple of the block)")
    p.add_argument("--kv-cache-memory-gib", type=float, default=2.0, help="the prefix cache's memory budget")
    p.add_argument("--kv-cache-dir", default=None, help="a directory for the prefix cache's disk tier")
    p.add_argument("--kv-cache-disk-gib", type=float, default=16.0, help="the disk tier's budget")
    p.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt whole")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="compile the decoding step (torch.compile; minutes the first time, cached after). Default: "
                        "on for a server of rows enough that every step runs all the experts (a one-row step is "
                        "faster compiled too, but its first compile takes minutes)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="decode eager")
    p.add_argument("--speculative", action="store_true",
                   help="the MTP block drafts each row's next token and every step checks it (same outputs: greedy "
                        "identical, sampling from the same distribution); pays where a step costs less than twice "
                        "a one-token step; with --compile its two parts are compiled too")


def add_arguments(p) -> None:
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="answer only requests with 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: its folder)")


def build_engine(args, ranks=None):
    """(engine, tokenizer, model directory) from the shared options. ``ranks`` (rank 0 of an expert-parallel launch,
    ``dsv4.parallel.inference.Ranks``): this rank's slice of the routed experts and a ``LeaderEngine``."""
    import dsv4
    from dsv4.serve.engine import Engine

    path, tokenizer = check_options(args, ranks)
    if not tokenizer.chat_ready:
        logging.getLogger("dsv4.serve").warning(
            "the tokenizer lacks DeepSeek-V4's chat tokens: /v1/chat/completions prompts spell them as text")
    make = Engine
    if ranks is None:
        model = dsv4.from_pretrained(path, numerics=args.numerics).eval()
    else:
        from dsv4.parallel.inference import from_pretrained
        from dsv4.serve.distributed import LeaderEngine

        model = from_pretrained(path, ranks.rank, ranks.size, ranks.group, numerics=args.numerics).eval()
        make = partial(LeaderEngine, ranks=ranks)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}")
    max_len = args.max_model_len or min(model.config.max_position_embeddings, 32768)
    engine = make(model, tokenizer, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
                  kv_memory_bytes=None if args.kv_memory_gib is None else int(args.kv_memory_gib * GIB),
                  prefill_chunk=args.prefill_chunk, prefix_cache=not args.no_prefix_cache,
                  cache_memory_bytes=int(args.kv_cache_memory_gib * GIB), cache_dir=args.kv_cache_dir,
                  cache_disk_bytes=int(args.kv_cache_disk_gib * GIB), speculative=args.speculative,
                  compile=args.compile)
    return engine, tokenizer, path


def check_options(args, ranks=None):
    """(model directory, tokenizer) after checking the shared options: every rank of a launch runs this before
    loading, so that bad options fail on each alike."""
    from dsv4.generate import model_tokenizer, resolve_model_dir

    for name in ("max_model_len", "max_num_seqs", "prefill_chunk"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("kv_memory_gib", "kv_cache_memory_gib", "kv_cache_disk_gib"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if ranks is not None:
        from dsv4.serve import distributed

        distributed.check_options(args.compile, args.speculative)
    path = resolve_model_dir(args.model)
    return path, model_tokenizer(path, args.tokenizer)


def follow(args, ranks) -> int:
    """A rank other than 0 of ``torchrun ... dsv4 serve``: its slice of the experts, replaying rank 0's model calls
    (``dsv4.serve.distributed.Follower``) until rank 0's engine ends."""
    from dsv4.parallel.inference import from_pretrained
    from dsv4.serve.distributed import Follower, start

    model, error = None, None
    try:
        path, _ = check_options(args, ranks)
        model = from_pretrained(path, ranks.rank, ranks.size, ranks.group, numerics=args.numerics).eval()
    except Exception as e:
        error = e
    shape = start(ranks, error)
    Follower(model, ranks, shape).run()
    return 0


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from dsv4.parallel.inference import expert_ranks

    with expert_ranks() as ranks:  # under torchrun: the routed experts spread over the ranks, rank 0 serving
        if ranks is None:
            return serve(args, *build_engine(args))
        if not ranks.is_main:
            return follow(args, ranks)
        from dsv4.serve.distributed import start

        engine, error = None, None
        try:
            engine, tokenizer, path = build_engine(args, ranks)
        except Exception as e:
            error = e
        start(ranks, error, engine.shape if engine is not None else None)
        return serve(args, engine, tokenizer, path, ranks)


def serve(args, engine, tokenizer, path, ranks=None) -> int:
    """The HTTP server in a thread, the engine's loop in this (the main) thread, until a signal or the server ends."""
    import signal
    import threading

    import uvicorn

    from dsv4.serve.server import build_app

    name = args.served_model_name or path.resolve().name
    app = build_app(engine, tokenizer, model_name=name, api_key=args.api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))

    def serve_http() -> None:  # HTTP in a thread of its own; the model's steps run fastest in the main thread
        try:
            server.run()
        finally:
            engine.stop()

    def stop(*_) -> None:
        server.should_exit = True
        engine.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=serve_http, name="dsv4-http", daemon=True).start()
    print(f"dsv4 serve: {name} on http://{args.host}:{args.port}/v1 ({engine.rows} rows of {engine.max_model_len} "
          f"tokens, {engine.rows * engine.row_bytes / GIB:.2f} GiB of decode state; prefix cache "
          f"{'off' if engine.prefix is None else 'on'}; decoding step "
          f"{'eager' if engine.compile_seconds is None else f'compiled in {engine.compile_seconds:.0f} s'}"
          f"{'' if ranks is None else f'; routed experts over {ranks.size} ranks'})",
          file=sys.stderr, flush=True)
    engine.run()
    server.should_exit = True
    return 1 if engine.error is not None else 0
