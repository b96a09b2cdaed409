"""Sampling through the decode cache: prefill the prompt in chunks, then one token per call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 is greedy; top_p keeps the smallest nucleus of mass >= top_p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is already full
        sorted_p = sorted_p.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()  # no autograd bookkeeping at all: about 10% less per-op overhead than no_grad
def stream(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           seed: int | None = None, prefill_chunk: int = 4096, stop: Callable[[int], bool] | None = None,
           samples: int = 1) -> Iterator[torch.Tensor]:
    """Yield the sampled ids [B * samples] one step at a time. ``prompt`` is [B, S] (or [S]); each of its rows is
    prefilled once and continued ``samples`` times, decoded together (rows i * samples ... of the output are prompt
    row i's). Ends once ``stop`` has held for some token of every row."""
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if prompt.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    generator = torch.Generator(device=prompt.device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(prompt.shape[0])
    logits = None
    for i in range(0, prompt.shape[1], prefill_chunk):
        logits = model(prompt[:, i:i + prefill_chunk], cache=cache, last_only=True)[:, -1]
    if samples > 1:
        cache, logits = cache.repeat_rows(samples), logits.repeat_interleave(samples, dim=0)
    stopped = [False] * logits.shape[0]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        yield nxt
        if stop is not None:
            stopped = [done or stop(t) for done, t in zip(stopped, nxt.tolist())]
            if all(stopped):
                return
        if cache.seen >= model.config.max_position_embeddings:
            return
        logits = model(nxt.unsqueeze(1), cache=cache)[:, -1]


def generate(model, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by up to ``max_new_tokens`` sampled ids, [B * samples, S + n] (``stream``'s keywords)."""
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
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
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the model)")


def print_stream(model, tokenizer, prompt: str, max_tokens: int, *, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int | None = None, out=None) -> str:
    """Write ``prompt`` and then its sampled continuation to ``out`` (stdout) as the tokens come; stop at EOS.
    Returns the continuation's text."""
    import sys

    out = out if out is not None else sys.stdout
    ids = torch.tensor([tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)])
    out.write(prompt)
    out.flush()
    new: list[int] = []
    shown = ""
    for nxt in stream(model, ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      stop=lambda t: t == tokenizer.eos_id):
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
    return text


def print_samples(model, tokenizer, prompt: str, max_tokens: int, samples: int, *, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int | None = None, out=None) -> list[str]:
    """Sample ``samples`` continuations of ``prompt`` together (one prefill), each up to its EOS, and write each
    to ``out`` (stdout) under a ``# sample N`` line, prompt first. Returns the continuations' texts."""
    import sys

    out = out if out is not None else sys.stdout
    ids = torch.tensor([tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)])
    rows: list[list[int]] = [[] for _ in range(samples)]
    ended = [False] * samples
    for nxt in stream(model, ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      stop=lambda t: t == tokenizer.eos_id, samples=samples):
        for i, t in enumerate(nxt.tolist()):
            ended[i] = ended[i] or t == tokenizer.eos_id
            if not ended[i]:
                rows[i].append(t)
    texts = [tokenizer.decode(r) for r in rows]
    for i, text in enumerate(texts):
        out.write(f"# sample {i + 1}\n{prompt}{text}\n")
    out.flush()
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


def run(args) -> int:
    import dsv4
    from dsv4.data import load_tokenizer

    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.temperature < 0:  # before anything is printed (sample_next checks these too, once the prompt is out)
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    path = resolve_model_dir(args.model)
    tok_path = Path(args.tokenizer) if args.tokenizer else path / "tokenizer.json"
    if not tok_path.exists():
        raise FileNotFoundError(f"no tokenizer at {tok_path}; pass --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    model = dsv4.from_pretrained(path).eval()
    if args.samples > 1:
        print_samples(model, tokenizer, args.prompt, args.max_tokens, args.samples, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed)
    else:
        print_stream(model, tokenizer, args.prompt, args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed)
    return 0
