"""Sampling through the decode cache: prefill the prompt in chunks, then one token per call."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


def _check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _prompt_rows(prompt: torch.Tensor) -> torch.Tensor:
    """The prompt as [B, S] ([S] is one row); an empty one is refused."""
    prompt = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt
    if prompt.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    return prompt


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> the distribution ``sample_next`` draws from [B, V] (unnormalized within the nucleus):
    temperature 0 puts all mass on the argmax; top_p keeps the smallest nucleus of mass >= top_p."""
    _check_sampling(temperature, top_p)
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is already full
        sorted_p = sorted_p.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 is greedy; top_p keeps the smallest nucleus of mass >= top_p."""
    _check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(next_token_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None = None
                 ) -> tuple[bool, int]:
    """Speculative sampling's test of one drafted token (Leviathan et al. 2023): ``p`` [V] the target's
    distribution, ``q`` [V] the one the draft was drawn from (both as ``next_token_probs`` gives them). The draft is
    kept with probability min(1, p / q); otherwise a token is drawn from max(p - q, 0), normalized. Either way the
    token follows p exactly. Returns (kept, token)."""
    p, q = p.float() / p.sum(), q.float() / q.sum()
    u = float(torch.rand((), generator=generator, device=p.device))
    if u * float(q[draft]) < float(p[draft]):  # u < p/q without dividing (q[draft] > 0: the draft was drawn from q)
        return True, draft
    rest = (p - q).clamp_min(0)
    if float(rest.sum()) <= 0:  # p == q up to rounding: the draft could only have been rejected by rounding
        rest = p
    return False, int(torch.multinomial(rest, 1, generator=generator))


def draw_draft(draft_logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None = None) -> tuple[int, torch.Tensor | None]:
    """The MTP block's draft from its logits [V]: at temperature 0 their argmax (and no distribution: ``check_draft``
    compares argmaxes), else a sample of ``next_token_probs`` and that distribution, for ``check_draft``."""
    if temperature == 0:
        return int(draft_logits.argmax()), None
    q = next_token_probs(draft_logits.unsqueeze(0), temperature, top_p)[0]
    return int(torch.multinomial(q, 1, generator=generator)), q


def check_draft(logits: torch.Tensor, draft: int, q: torch.Tensor | None, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> tuple[bool, int]:
    """The model's test of a draft (``draw_draft``'s draft and distribution ``q``), from its logits [V] for the
    draft's position: at temperature 0 the draft is kept if it is their argmax, which is the token either way;
    else ``accept_draft``. Returns (kept, token)."""
    if temperature == 0:
        token = int(logits.argmax())
        return token == draft, token
    return accept_draft(next_token_probs(logits.unsqueeze(0), temperature, top_p)[0], q, draft, generator)


@torch.inference_mode()  # no autograd bookkeeping at all: about 10% less per-op overhead than no_grad
def stream(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           seed: int | None = None, prefill_chunk: int = 4096, stop: Callable[[int], bool] | None = None,
           samples: int = 1, compile: bool = False, info: dict | None = None) -> Iterator[torch.Tensor]:
    """Yield the sampled ids [B * samples] one step at a time. ``prompt`` is [B, S] (or [S]); each of its rows is
    prefilled once and continued ``samples`` times, decoded together (rows i * samples ... of the output are prompt
    row i's). Ends once ``stop`` has held for some token of every row. ``compile``: the tokens are decoded by the
    compiled step of a ``DecodeState`` (``dsv4.model.decode.DecodeStep``, the serving engine's), eager after one
    warning where no compiler works; ``info`` (a dict) then receives ``compile_seconds`` (None: eager) and the
    state's ``capacity``."""
    prompt = _prompt_rows(prompt)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    generator = torch.Generator(device=prompt.device).manual_seed(seed) if seed is not None else None
    limit = model.config.max_position_embeddings
    seen = prompt.shape[1]  # tokens in the cache
    if compile and max_new_tokens > 1:  # (one new token comes from the prefill alone)
        step, logits = _compiled_decoding(model, prompt, max_new_tokens, prefill_chunk, samples,
                                          {} if info is None else info)
    else:
        cache = model.new_cache(prompt.shape[0])
        logits = _prefill(model, prompt, cache, prefill_chunk)
        if samples > 1:
            cache, logits = cache.repeat_rows(samples), logits.repeat_interleave(samples, dim=0)

        def step(ids: torch.Tensor) -> torch.Tensor:
            return model(ids.unsqueeze(1), cache=cache)[:, -1]
    stopped = [False] * logits.shape[0]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        yield nxt
        if stop is not None:
            stopped = [done or stop(t) for done, t in zip(stopped, nxt.tolist())]
            if all(stopped):
                return
        if seen >= limit:
            return
        logits = step(nxt)
        seen += 1


def _prefill(model, prompt: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """The prompt [B, S] into ``cache`` in chunks; the last position's logits [B, V]."""
    logits = None
    for i in range(0, prompt.shape[1], chunk):
        logits = model(prompt[:, i:i + chunk], cache=cache, last_only=True)[:, -1]
    return logits


def _compiled_decoding(model, prompt: torch.Tensor, max_new_tokens: int, chunk: int, samples: int, info: dict):
    """``stream``'s compiled decoding: each prompt row prefilled through a one-row cache, then a ``DecodeState`` of
    B * samples rows whose capacity is the bucket of the prompt and the tokens to come (``capacity_bucket``), its
    step compiled while the rows are free, and each prompt's cache loaded into its ``samples`` rows. Returns (the
    step, the prompts' last logits [B * samples, V])."""
    from dsv4.model.decode import DecodeState, DecodeStep, capacity_bucket

    limit = model.config.max_position_embeddings
    b, s = prompt.shape
    caches = [model.new_cache(1) for _ in range(b)]
    logits = [_prefill(model, prompt[i:i + 1], caches[i], chunk).expand(samples, -1) for i in range(b)]
    state = DecodeState(model, b * samples, capacity_bucket(min(s + max(max_new_tokens - 1, 0), limit), limit))
    step = DecodeStep(model, state, compile=True)
    info.update(compile_seconds=step.compile_seconds, capacity=state.capacity)
    for i, cache in enumerate(caches):
        for j in range(samples):
            state.load_row(i * samples + j, cache)
    return step, torch.cat(logits)


@torch.inference_mode()
def speculative_stream(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, seed: int | None = None, prefill_chunk: int = 4096,
                       stop: Callable[[int], bool] | None = None, stats: dict | None = None,
                       max_pending: int = 4, compile: bool = False, info: dict | None = None
                       ) -> Iterator[torch.Tensor]:
    """``stream`` for one prompt row, with the MTP block drafting one token ahead (spec 5). Each call of the main
    model takes the tokens not yet in its cache and the draft, and tests the draft against its own distribution
    (``accept_draft``): kept, it is followed by one more token from the same call; rejected, it is replaced by a
    token of the difference of the two distributions and undone in the cache (``ModelCache.snapshot``), the tokens
    before it going into the next call (at most ``max_pending``, then a call without a draft). The output follows
    the main model's distribution exactly; at temperature 0 it is ``stream``'s greedy output. Yields ids [1];
    ``stats`` (a dict) receives the counts of ``calls``, ``drafts`` and ``accepted``. Ends one token early if the
    next call would pass ``max_position_embeddings``. ``compile``: after the prefill the row moves into a
    ``DecodeState`` and each call is the compiled ``SpeculativeStep`` (the serving engine's: the last token and the
    draft, a rejected draft rolled back), eager after one warning where no compiler works; ``info`` (a dict) then
    receives ``compile_seconds`` and the state's ``capacity``."""
    prompt = _prompt_rows(prompt)
    if prompt.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt row, got {prompt.shape[0]}")
    if not len(model.mtp):
        raise ValueError("speculative decoding needs the model's MTP block (num_nextn_predict_layers >= 1)")
    if max_pending < 1:
        raise ValueError(f"max_pending must be >= 1, got {max_pending}")
    stats = {} if stats is None else stats
    stats.update(calls=0, drafts=0, accepted=0)
    generator = torch.Generator(device=prompt.device).manual_seed(seed) if seed is not None else None
    limit = model.config.max_position_embeddings
    mtp, mtp_cache = model.mtp[0], model.mtp[0].attn.new_cache()
    cache = model.new_cache(1)
    tokens = prompt[0].tolist()  # every token by position: the prompt, then what was emitted
    mtp_seen = 0  # the MTP block has read positions below this (streams at p with the token at p + 1)

    def feed_mtp(streams: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """The MTP block reads positions [mtp_seen, end) (``streams`` holds positions from ``start``); returns its
        logits for the token two after its last position: the next draft's."""
        nonlocal mtp_seen
        ids = torch.tensor([tokens[mtp_seen + 1:end + 1]], device=prompt.device)
        pos = torch.arange(mtp_seen, end, device=prompt.device)
        hidden, _, _ = mtp.predict(streams[:, mtp_seen - start:end - start], model.embed(ids), pos, mtp_cache)
        mtp_seen = end
        return model.head(hidden[:, -1]).float()[0]

    def emit(token: int) -> bool:
        """Record a token; whether generation goes on after it."""
        tokens.append(token)
        return len(tokens) - prompt.shape[1] < max_new_tokens and not (stop is not None and stop(token))

    if max_new_tokens <= 0:
        return
    prev = None  # the previous chunk's streams: the MTP block reads them once the next chunk's first token is known
    for a in range(0, prompt.shape[1], prefill_chunk):
        streams, _ = model.hidden_streams(prompt[:, a:a + prefill_chunk], cache)
        if prev is not None:
            feed_mtp(prev, a - prefill_chunk, a)
        prev = streams
    nxt = int(sample_next(model.logits_from_streams(streams[:, -1:])[:, -1], temperature, top_p, generator))
    go = emit(nxt)
    yield torch.tensor([nxt], device=prompt.device)
    if not go:
        return
    draft_logits = feed_mtp(streams, a, cache.seen)
    if compile:
        yield from _compiled_speculation(model, cache, mtp_cache, tokens, draft_logits, max_new_tokens - 1,
                                         temperature, top_p, generator, stop, stats, {} if info is None else info)
        return
    while True:
        c = cache.seen
        pending = tokens[c:]
        m = len(pending)
        if c + m >= limit:
            return
        stats["calls"] += 1
        if m >= max_pending:  # a call without a draft: the pending tokens go into the cache
            streams, _ = model.hidden_streams(torch.tensor([pending], device=prompt.device), cache)
            out = [int(sample_next(model.logits_from_streams(streams[:, -1:])[:, -1], temperature, top_p,
                                   generator))]
            mtp_end = c + m
        else:
            draft, q = draw_draft(draft_logits, temperature, top_p, generator)
            snap = cache.snapshot()
            streams, _ = model.hidden_streams(torch.tensor([pending + [draft]], device=prompt.device), cache)
            logits = model.logits_from_streams(streams)[0]  # row j: the token after position c + j
            stats["drafts"] += 1
            kept, token = check_draft(logits[m - 1], draft, q, temperature, top_p, generator)
            if kept:
                stats["accepted"] += 1
                out = [draft, int(sample_next(logits[m:], temperature, top_p, generator))]
                mtp_end = c + m + 1
            else:  # the draft is undone; the pending tokens and this one go into the next call
                cache.restore(snap)
                out = [token]
                mtp_end = c + m
        for t in out:
            go = emit(t)
            yield torch.tensor([t], device=prompt.device)
            if not go:
                return
        draft_logits = feed_mtp(streams, c, mtp_end)


def _compiled_speculation(model, cache, mtp_cache, tokens: list[int], draft_logits: torch.Tensor, max_new_tokens: int,
                          temperature: float, top_p: float, generator, stop, stats: dict, info: dict
                          ) -> Iterator[torch.Tensor]:
    """``speculative_stream(compile=True)`` after its prefill: the row (``cache``, the MTP block's ``mtp_cache``;
    ``tokens`` up to the last emitted one, which is not in the cache yet) moves into a one-row ``DecodeState`` whose
    ``SpeculativeStep`` is compiled first; each call takes the last token and the draft, keeps the draft or rolls its
    position back, and the MTP block drafts again. Yields up to ``max_new_tokens`` more ids [1]."""
    from dsv4.model.decode import DecodeState, capacity_bucket
    from dsv4.model.speculative import SpeculativeStep

    limit = model.config.max_position_embeddings
    device = draft_logits.device
    state = DecodeState(model, 1, capacity_bucket(min(len(tokens) + max_new_tokens + 1, limit), limit), mtp=True)
    step = SpeculativeStep(model, state, compile=True)
    info.update(compile_seconds=step.compile_seconds, capacity=state.capacity)
    state.load_row(0, cache, mtp=(mtp_cache, 0))
    emitted, mark = 0, None
    while emitted < max_new_tokens:
        c = int(state.lengths[0])  # the last token goes to position c, the draft to c + 1
        if c + 2 > min(limit, state.capacity):
            return
        draft, q = draw_draft(draft_logits, temperature, top_p, generator)
        mark = state.mark(into=mark)
        streams, logits = step.verify(torch.tensor([[tokens[-1], draft]]))
        stats["calls"] += 1
        stats["drafts"] += 1
        kept, first = check_draft(logits[0, 0], draft, q, temperature, top_p, generator)
        out = [first] + ([int(sample_next(logits[0, 1:], temperature, top_p, generator))] if kept else [])
        stats["accepted"] += int(kept)
        after = torch.tensor([out + [0] * (2 - len(out))], device=device)  # the MTP block's next ids
        drafts = step.draft(streams, after, torch.tensor([[c, c + 1]], device=device))
        if not kept:
            state.rollback(mark, [1], [0])  # the draft's position undone (the MTP block's included)
        draft_logits = drafts[0, len(out) - 1]
        for t in out:
            tokens.append(t)
            emitted += 1
            yield torch.tensor([t], device=device)
            if emitted >= max_new_tokens or (stop is not None and stop(t)):
                return


def generate(model, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by up to ``max_new_tokens`` sampled ids, [B * samples, S + n] (``stream``'s keywords)."""
    prompt = _prompt_rows(prompt)
    new = list(stream(model, prompt, max_new_tokens, **kwargs))
    prompt = prompt.repeat_interleave(kwargs.get("samples", 1), dim=0)
    return torch.cat([prompt] + [t.unsqueeze(1) for t in new], dim=1)


# ------------------------------------------------------------------------------------------------------- the CLI
def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a model directory (HF or official layout) with tokenizer.json, "
                                                   "or a run directory of `dsv4 train`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--samples", type=int, default=1,
                   help="continuations of the prompt, decoded together from one prefill; above 1 they are printed "
                        "once all are done, each under a '# sample N' line")
    p.add_argument("--speculative", action="store_true",
                   help="the MTP block drafts one token ahead and the model checks it with the next ones in one call "
                        "(same output distribution; greedy output unchanged); how many drafts were kept goes to "
                        "stderr")
    p.add_argument("--compile", action="store_true",
                   help="decode with the compiled step (torch.compile of a static-shape decode state, as `dsv4 serve` "
                        "does; eager after one warning where no compiler works); the compile time goes to stderr. "
                        "Off by default: on two CPU cores compiling takes longer than it saves for a few hundred "
                        "tokens (docs/performance-notes.md)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, or 'deepseek-v4' (default: the one beside the model)")
    p.add_argument("--numerics", choices=["official", "plain"], default=None,
                   help="DeepSeek's inference roundings (dsv4.model.numerics) or none (default: official for an "
                        "official-layout checkpoint, plain for HF layout)")


def print_stream(model, tokenizer, prompt: str, max_tokens: int, *, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int | None = None, out=None, speculative: bool = False, compile: bool = False) -> str:
    """Write ``prompt`` and then its sampled continuation to ``out`` (stdout) as the tokens come; stop at EOS.
    With ``speculative``, the MTP block drafts (``speculative_stream``) and a line on stderr says how many drafts
    were kept; with ``compile``, the compiled step decodes and a line on stderr gives its compile time. Returns the
    continuation's text."""
    import sys

    out = out if out is not None else sys.stdout
    ids = torch.tensor([tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)])
    out.write(prompt)
    out.flush()
    new: list[int] = []
    shown = ""
    stats: dict = {}
    info: dict = {}
    tokens = (speculative_stream(model, ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 stop=lambda t: t == tokenizer.eos_id, stats=stats, compile=compile, info=info)
              if speculative else
              stream(model, ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                     stop=lambda t: t == tokenizer.eos_id, compile=compile, info=info))
    for nxt in tokens:
        if int(nxt[0]) == tokenizer.eos_id:
            break
        new.append(int(nxt[0]))
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(new)
    out.write(text[len(shown):] + "\n")
    out.flush()
    _report_compile(info)
    if speculative and stats["calls"]:
        kept = stats["accepted"]
        print(f"speculative: {kept} of {stats['drafts']} drafts kept, {(len(new) - 1) / stats['calls']:.2f} tokens "
              f"per call of the model", file=sys.stderr)
    return text


def _report_compile(info: dict) -> None:
    import sys

    if "compile_seconds" in info:
        how = ("eager (no compiler)" if info["compile_seconds"] is None else
               f"compiled in {info['compile_seconds']:.1f} s")
        print(f"decoding step: {how}, capacity {info['capacity']} tokens a row", file=sys.stderr)


def print_samples(model, tokenizer, prompt: str, max_tokens: int, samples: int, *, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int | None = None, out=None, compile: bool = False) -> list[str]:
    """Sample ``samples`` continuations of ``prompt`` together (one prefill), each up to its EOS, and write each
    to ``out`` (stdout) under a ``# sample N`` line, prompt first. Returns the continuations' texts."""
    import sys

    out = out if out is not None else sys.stdout
    ids = torch.tensor([tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)])
    rows: list[list[int]] = [[] for _ in range(samples)]
    ended = [False] * samples
    info: dict = {}
    for nxt in stream(model, ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      stop=lambda t: t == tokenizer.eos_id, samples=samples, compile=compile, info=info):
        for i, t in enumerate(nxt.tolist()):
            ended[i] = ended[i] or t == tokenizer.eos_id
            if not ended[i]:
                rows[i].append(t)
    texts = [tokenizer.decode(r) for r in rows]
    for i, text in enumerate(texts):
        out.write(f"# sample {i + 1}\n{prompt}{text}\n")
    out.flush()
    _report_compile(info)
    return texts


def resolve_model_dir(model: str) -> Path:
    """A model directory, or the ``model/`` of a ``dsv4 train`` run directory; a clear error when there is none."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"--model {path} is not a directory")
    if (path / "model" / "config.json").exists():  # a `dsv4 train` run directory
        return path / "model"
    if not (path / "config.json").exists():
        if (path / "checkpoints").is_dir():
            raise FileNotFoundError(f"--model {path} is a run directory without model/ (the run has not finished); "
                                    "finish it with `dsv4 train --resume`")
        raise FileNotFoundError(f"--model {path} holds no config.json: not a model or run directory")
    return path


def model_tokenizer(model_dir: Path, tokenizer: str | None):
    """``--tokenizer`` (a tokenizer.json, a folder holding one, or 'deepseek-v4'), else the tokenizer.json beside the
    model; a clear error when there is none."""
    from dsv4.data import DEEPSEEK_V4, load_tokenizer

    tok = tokenizer or model_dir / "tokenizer.json"
    if tokenizer is None and not Path(tok).exists():
        raise FileNotFoundError(f"no tokenizer at {tok}; pass --tokenizer (a tokenizer.json, or '{DEEPSEEK_V4}')")
    return load_tokenizer(tok)


def run(args) -> int:
    import dsv4

    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.temperature < 0:  # before anything is printed (sample_next checks these too, once the prompt is out)
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.speculative and args.samples > 1:
        raise ValueError("--speculative decodes one sequence; it does not take --samples above 1")
    path = resolve_model_dir(args.model)
    tokenizer = model_tokenizer(path, args.tokenizer)
    from dsv4.parallel.inference import expert_ranks

    with expert_ranks() as ranks:  # under torchrun: the routed experts spread over the ranks, rank 0 printing
        if ranks is None:
            model = dsv4.from_pretrained(path, numerics=args.numerics).eval()
        elif args.speculative:
            raise ValueError("--speculative runs in one process, not with the experts spread over ranks (torchrun)")
        else:
            model = ranks.from_pretrained(path, numerics=args.numerics).eval()
        out = None if ranks is None or ranks.is_main else io.StringIO()
        if args.samples > 1:
            print_samples(model, tokenizer, args.prompt, args.max_tokens, args.samples, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, out=out)
        else:
            print_stream(model, tokenizer, args.prompt, args.max_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, speculative=args.speculative, out=out)
    return 0
