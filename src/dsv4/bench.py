"""``dsv4 bench prefill | decode``: V4 attention against dense attention, measured in one process.

prefill: the prompt goes through the model in chunks with the decode cache (V4's fast paths), against the same model
shape with dense causal MQA over every past token (PyTorch SDPA, the whole prompt in one ``is_causal`` call: its
fastest form, about 1.4x faster at 32K than chunks, which need an explicit mask), and, up to 4,096 tokens, against HF
transformers' eager implementation on the same weights (logits compared). decode: per-token latency at the asked
context and at 4,096 tokens, against dense decoding over every past token, beside the cost model's predicted ratio
(its FLOPs) and the roofline's (its FLOPs at the matmul peak and its bytes at the copy bandwidth, both measured);
with ``--batch-size B``, the latency of a step that decodes one token for each of B rows (``tokens_per_s`` counts
all of them); with ``--compile``, beside the eager steps the compiled decoding step (``dsv4.model.decode.DecodeStep``
on a ``DecodeState`` of capacity context + tokens, as generation and serving run it) of V4 at both contexts and of
dense decoding (``DenseDecodeState``: compiled the same way, a fair baseline; skipped, with the reason, where a second
dense cache does not fit), and each one's compile time. V4's cache is that of a real prefill, or with ``--fill random``
one of random entries of the same shapes and bytes (``filled_cache``: seconds at 1M tokens, where the prefill takes
over half an hour; the dense baseline's is always random); ``--no-4k`` skips V4 at 4K (a sweep has its own 4K point).
Every figure is a median of ``--repeats`` runs; every ratio compares runs of this process. ``--device cuda`` runs
all of it on a GPU (timers wait for the device; ``peak_gpu_mem_gib`` beside the host's ``peak_rss_gib``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from typing import NamedTuple

import torch

from dsv4.bench_baselines import DenseDecodeState, dense_attention, dense_cache
from dsv4.cache import ModelCache
from dsv4.config import CSA, HCA, ModelConfig
from dsv4.train.flops import synchronize


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: ``/proc/self/clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory since ``reset_peak_rss`` (Linux: VmHWM), else since it started
    (ru_maxrss, which on Linux may also hold the peak of the process that forked this one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def peak_rss_gib() -> float:
    """``peak_rss_bytes`` in GiB."""
    return peak_rss_bytes() / 2 ** 30


def greedy_run(model, prompt_tokens: int, new_tokens: int, seed: int = 0) -> dict:
    """One row through ``model``: a prompt of random token ids (``seed``) prefilled in one call, then
    ``new_tokens`` greedy decoding steps, each timed. Returns prefill seconds, the median decoding step in ms, the
    tokens, the process's peak resident set in bytes (file pages it touched included) and the cache's bytes."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens),
                        generator=torch.Generator().manual_seed(seed))
    cache = model.new_cache(1)
    tokens, times = [], []
    with torch.no_grad():
        t = time.perf_counter()
        logits = model(ids, cache=cache, last_only=True)
        prefill_s = time.perf_counter() - t
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            t = time.perf_counter()
            logits = model(token, cache=cache)
            times.append(time.perf_counter() - t)
    return {"prefill_s": prefill_s, "decode_ms_per_token": 1e3 * statistics.median(times) if times else None,
            "tokens": tokens, "peak_rss_bytes": peak_rss_bytes(), "cache_bytes": cache.nbytes()}


def resolve_device(name: str) -> torch.device:
    """``--device``: "cpu", "cuda" or "cuda:N", refused with the reason when this machine cannot run it."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device: {name!r} is not a device ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def peak_memory(device: torch.device) -> dict:
    """Peak host RSS, and on a GPU the peak of PyTorch's allocations there, in GiB."""
    out = {"peak_rss_gib": peak_rss_gib()}
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def available_memory_bytes(device: torch.device | None = None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_context(config: ModelConfig, context: int, dtype_bytes: int, dense: bool = False,
                  device: torch.device | None = None, batch: int = 1) -> None:
    """Refuse contexts the model or this machine cannot take (caches of ``batch`` rows), naming the figure."""
    from dsv4.cost import kv_cache_bytes

    block = max([config.compress_rate(t) for t in (CSA, HCA) if t in config.layer_types] or [1])
    if context < block:
        raise ValueError(f"context {context} is below one compressed block ({block} tokens)")
    if context > config.max_position_embeddings:
        raise ValueError(f"context {context} is beyond max_position_embeddings ({config.max_position_embeddings})")
    need = kv_cache_bytes(config, context, dtype_bytes)
    if dense:
        need = max(need, context * config.head_dim * dtype_bytes * config.num_hidden_layers)
    need *= batch
    avail = available_memory_bytes(device)
    if need > 0.8 * avail:
        rows = f" x {batch} rows" if batch > 1 else ""
        raise ValueError(f"a cache for {context} tokens{rows} needs {need / 2**30:.2f} GiB, more than this machine "
                         f"can spare ({avail / 2**30:.2f} GiB available)")


def build(preset: str, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
    from dsv4.model import Transformer

    config = ModelConfig.preset(preset)
    torch.manual_seed(seed)
    model = Transformer(config).eval().to(device=device, dtype=dtype)
    return config, model


@torch.inference_mode()  # as generation runs: about 10% less per-op overhead than no_grad when decoding
def prefill(model, ids: torch.Tensor, chunk: int, dense: bool = False):
    """``ids`` through the model in chunks of ``chunk`` tokens with a decode cache (the dense baseline's with
    ``dense``); returns the cache and the last position's logits."""
    cache = dense_cache(model, ids.shape[0]) if dense else model.new_cache(ids.shape[0])
    logits = None
    for i in range(0, ids.shape[1], chunk):
        logits = model(ids[:, i:i + chunk], cache=cache, last_only=True)
    return cache, logits


def timed(fn, repeats: int, device: torch.device | None = None) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls of ``fn`` (each waits for the device's work), and the last result."""
    times, result = [], None
    for _ in range(repeats):
        if device is not None:
            synchronize(device)
        t = time.perf_counter()
        result = fn()
        if device is not None:
            synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def dense_kv_bytes(config: ModelConfig, context: int, dtype_bytes: int) -> int:
    return context * config.head_dim * dtype_bytes * config.num_hidden_layers


def bench_prefill(args) -> dict:
    from dsv4.cost import kv_cache_bytes, v4_cost
    from dsv4.train.flops import matmul_peak_flops

    dtype, device = getattr(torch, args.dtype), resolve_device(args.device)
    config, model = build(args.preset, args.seed, dtype, device)
    n = args.context
    esize = torch.finfo(dtype).bits // 8
    check_context(config, n, esize, dense=not args.no_dense, device=device)
    ids = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(args.seed)).to(device)
    model.set_attention("fast", args.block)
    # before and after the runs: the higher counts (a busy moment reads low)
    peak = matmul_peak_flops(dtype, device=device)
    t_v4, (cache, _) = timed(lambda: prefill(model, ids, args.chunk), args.repeats, device)
    out = {"bench": "prefill", "preset": args.preset, "context": n, "dtype": args.dtype, "device": str(device),
           "chunk": args.chunk, "seconds": t_v4, "tokens_per_s": n / t_v4, **peak_memory(device),
           "kv_bytes": cache.nbytes(), "cost_model_kv_bytes": kv_cache_bytes(config, n, esize),
           "dense_kv_bytes": dense_kv_bytes(config, n, esize), "threads": torch.get_num_threads()}
    # useful FLOPs of the prefill: the cost model's per-token decode FLOPs summed over the positions
    points = sorted({max(1, n * i // 16) for i in range(1, 17)})
    per_token = statistics.mean(v4_cost(config, p).flops for p in points)
    head = 2 * config.vocab_size * config.hidden_size  # prefill computes the lm head for the last position only
    useful = (per_token - head) * n + head
    peak = max(peak, matmul_peak_flops(dtype, device=device))
    # the roofline of a prefill: its useful FLOPs at the matmul peak (the bytes it reads, the weights once per chunk,
    # are not counted); MFU is the roofline's share of the measured time
    out.update({"useful_flops": useful, "matmul_peak_flops": peak, "mfu": useful / t_v4 / peak,
                "roofline_seconds": useful / peak})
    if not args.no_dense:
        model.set_attention(dense_attention)
        # one causal call: dense at its best
        t_dense, _ = timed(lambda: prefill(model, ids, n, dense=True), args.repeats, device)
        out.update({"dense_seconds": t_dense, "dense_chunk": n, "speedup_vs_dense": t_dense / t_v4})
        model.set_attention("fast", args.block)
    if n <= 4096 and not args.no_hf:
        out.update(_vs_transformers(model, ids, args.repeats, t_v4))
    return out


def _vs_transformers(model, ids, repeats: int, t_v4: float) -> dict:
    try:
        from transformers import DeepseekV4ForCausalLM
    except ImportError:
        return {"transformers": "not installed"}
    with tempfile.TemporaryDirectory() as d:
        model.float().save_pretrained(d)
        hf = DeepseekV4ForCausalLM.from_pretrained(d).float().eval().to(ids.device)
    model.float()
    with torch.no_grad():
        t_hf, ref = timed(lambda: hf(ids).logits.float(), repeats, ids.device)
        t_ours, ours = timed(lambda: model(ids), repeats, ids.device)
    diff = (ours - ref).abs().amax(-1)[0]
    ties, first = _boundary_ties(model, ids)
    return {"hf_eager_seconds": t_hf, "speedup_vs_hf_eager": t_hf / t_ours, "one_call_seconds": t_ours,
            "max_abs_logit_diff_vs_hf": float(diff.max()),
            "positions_within_1e-4_of_hf": float((diff <= 1e-4).float().mean()),
            "indexer_boundary_ties": ties, "first_tie_position": first,
            # attention is causal: the logits before the first tie cannot depend on how ties are broken
            "max_abs_logit_diff_vs_hf_before_first_tie": float(diff[:first].max()) if first > 0 else None}


@torch.no_grad()
def _boundary_ties(model, ids) -> tuple[int, int]:
    """Queries whose k-th and (k+1)-th best visible index scores are equal: there transformers' top-k breaks the
    tie arbitrarily and dsv4 toward the lower index, so their logits may differ (by design, not by error).
    Returns their count (over CSA layers) and the first such position (the sequence length when there is none)."""
    from dsv4.model.indexer import visible_entries

    ties, first = 0, ids.shape[1]
    csa = [layer.attn for layer in model.layers if layer.attn.indexer is not None]
    inputs = {}  # every CSA layer's normed input, from one forward
    def keep_input(module, args, output) -> None:  # returns None: the layer's output stays as it is
        inputs[module] = args[0]

    hooks = [att.register_forward_hook(keep_input) for att in csa]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    for att in csa:
        x = inputs[att]
        positions = torch.arange(ids.shape[1], device=ids.device)
        q_latent = att.q_norm(att.wq_a(x))
        keys = att.indexer.keys(x, att.rotary, None)
        scores = att.indexer.scores(x, q_latent, positions, keys, att.rotary)
        local = torch.arange(keys.shape[1], device=ids.device).unsqueeze(0)
        visible = visible_entries(positions, local, att.rate)
        k = att.indexer.topk
        masked = scores.masked_fill(~visible, float("-inf"))
        rows = visible.sum(-1) > k
        if rows.any() and k < masked.shape[-1]:
            top = masked.topk(k + 1, dim=-1).values
            tied = (top[..., k - 1] == top[..., k]) & rows
            ties += int(tied.sum())
            if tied.any():
                first = min(first, int(tied.any(0).nonzero()[0]))
    return ties, first


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Memory bandwidth in bytes/s on ``device``: the best of ``repeats`` copies of ``nbytes`` (each reads and writes
    them), after one untimed copy that faults the pages in."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def filled_dense_cache(model, context: int, dtype: torch.dtype, generator: torch.Generator, room: int,
                       batch: int = 1):
    """A decode cache of the dense baseline holding ``context`` random K=V vectors per layer and row (``batch``
    rows, copies of one), with space for ``room`` more: what a dense prefill would leave, without its quadratic
    cost (a decode step's cost does not depend on the vectors' values)."""
    cache = dense_cache(model, batch)
    for layer in cache.layers:
        kv = torch.randn(1, context, model.config.head_dim, generator=generator)
        layer.append(kv.to(device=model.device, dtype=dtype).expand(batch, -1, -1), room)
    cache.seen = context
    return cache


def filled_cache(model, context: int, generator: torch.Generator, room: int = 0) -> ModelCache:
    """A one-row V4 decode cache as a prefill of ``context`` tokens leaves it, its vectors random: per attention layer
    the window ring (the last ``window`` positions, each in its slot), and per compressor (main and indexer) its
    ``context // rate`` entries, the projected tokens of its incomplete block (``context % rate``) and, with overlap
    (CSA), the series of the last complete block; shapes, dtypes and bytes those of a prefilled cache (a test holds
    the two together). A decoding step from it does the work and reads the bytes of one after a real prefill (its
    cost does not depend on the values), without the prefill's (242 s at 131K on the small preset). ``room``: entry
    slots kept free for that many more tokens, so that no timed step copies the entries into a bigger buffer (a
    prefilled cache's buffer doubles when full, in at most one step)."""
    from dsv4.model.linear import activation_dtype
    from dsv4.model.precision import compute_dtype

    if context < 1:
        raise ValueError(f"a filled cache holds at least one token, got {context}")
    act = activation_dtype(model.embed)
    dev = model.device

    def rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=dev, dtype=dtype)

    cache = model.new_cache(1)
    for block, lc in zip(model.layers, cache.layers):
        attn = block.attn
        positions = torch.arange(max(0, context - lc.window), context, device=dev)
        lc.kv = torch.zeros(1, lc.window, attn.head_dim, dtype=act, device=dev)
        lc.kv[:, positions % lc.window] = rand(1, len(positions), attn.head_dim, dtype=act)
        lc.pos = torch.full((lc.window,), -1, dtype=torch.long, device=dev)
        lc.pos[positions % lc.window] = positions
        for state, compressor in ((lc.compressor, attn.compressor),
                                  (lc.indexer, attn.indexer.compressor if attn.indexer is not None else None)):
            if state is None:
                continue
            rate, dim, comp = compressor.rate, compressor.dim, compute_dtype(act)
            width = 2 * dim if compressor.overlap else dim
            n, part = divmod(context, rate)
            state.kv, state.gate = rand(1, part, width, dtype=comp), rand(1, part, width, dtype=comp)
            if compressor.overlap and n:
                state.prev_kv, state.prev_gate = rand(1, rate, dim, dtype=comp), rand(1, rate, dim, dtype=comp)
            state._room = torch.empty(1, n + -(-(part + room) // rate), dim, dtype=comp, device=dev)
            state._room[:, :n] = rand(1, n, dim, dtype=comp)
            state.entries, state.count = state._room[:, :n], n
    cache.seen = context
    return cache


ATTENTION = {"fast": "fast", "dense": dense_attention}  # a side's name -> its ``set_attention`` path


class DecodeRun(NamedTuple):
    """One side of ``bench decode``: its attention (``ATTENTION``'s name), its context, the token ids and the cache
    its steps advance; for a compiled side, the ``DecodeStep`` that advances its state (else None); for V4, the
    one-row prefilled cache that every row copies."""

    impl: str
    context: int
    ids: torch.Tensor
    cache: object
    step: object = None
    row: object = None

    def run(self, i: int, model) -> None:
        """Its ``i``-th decoding step."""
        ids = self.ids[:, self.context + i:self.context + i + 1]
        if self.step is not None:
            self.step(ids[:, 0])
        else:
            model(ids, cache=self.cache)


def compiled_run(model, run: DecodeRun, tokens: int, generator: torch.Generator) -> DecodeRun:
    """``run``'s compiled twin: a decode state of its rows with room for ``tokens`` more (V4's rows loaded from its
    prefilled cache; dense rows of random vectors), its step compiled while the rows are free."""
    from dsv4.model.decode import DecodeState, DecodeStep

    rows, capacity = run.ids.shape[0], run.context + tokens
    if run.impl == "dense":
        state = DenseDecodeState(model, rows, capacity)
        step = DecodeStep(model, state, compile=True, fullgraph=True)
        state.fill(run.context, generator)
    else:
        state = DecodeState(model, rows, capacity)
        step = DecodeStep(model, state, compile=True, fullgraph=True)
        for r in range(rows):  # the prefilled cache's rows are copies of one
            state.load_row(r, run.row)
    if not step.compiled:
        raise RuntimeError("bench decode --compile: the decoding step did not compile as one graph (see the warning "
                           "above)")
    return run._replace(cache=state, step=step)


def bench_decode_model(args) -> dict:
    """``dsv4 bench decode --model DIR``: a saved model as ``dsv4.from_pretrained`` loads it (an official-layout
    checkpoint packed: its weights read from the mapped files as stored), its load time, one prompt of ``--context``
    random ids prefilled, ``--tokens`` greedy steps (their median), against the step's roofline: the weight bytes a
    token reads (``dsv4.cost.weights.decode_bytes_per_token``: the routed experts at k / E) and the cache's, at the
    measured copy bandwidth. Pages warm: the prompt touches nearly every expert first."""
    import dsv4
    from dsv4.cost.weights import decode_bytes_per_token
    from dsv4.weights.names import official_state_of

    if resolve_device(args.device).type != "cpu":
        raise ValueError("--model: bench decode of a saved model runs on the CPU")
    if args.batch_size not in (None, 1):
        raise ValueError("--model: bench decode of a saved model decodes one row (no --batch-size)")
    t = time.perf_counter()
    model = dsv4.from_pretrained(args.model)
    load_s = time.perf_counter() - t
    config = model.config
    if args.context + args.tokens > config.max_position_embeddings:
        raise ValueError(f"--context {args.context} + --tokens {args.tokens} passes the model's "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    run = greedy_run(model, args.context, args.tokens, seed=args.seed)
    weights = decode_bytes_per_token(((name, t.numel() * t.element_size())
                                      for name, t in official_state_of(model, as_stored=True).items()), config)
    bandwidth = copy_bandwidth()
    roof = 1e3 * (weights + run["cache_bytes"]) / bandwidth
    return {"bench": "decode", "model": str(args.model), "context": args.context, "tokens": args.tokens,
            "load_s": load_s, "prefill_s": run["prefill_s"], "ms_per_token": run["decode_ms_per_token"],
            "tokens_per_s": 1e3 / run["decode_ms_per_token"], "weight_bytes_per_token": weights,
            "kv_bytes": run["cache_bytes"], "bandwidth_bytes_per_s": bandwidth, "roofline_ms_per_token": roof,
            "vs_roofline": run["decode_ms_per_token"] / roof, "peak_rss_gib": run["peak_rss_bytes"] / 2**30,
            "threads": torch.get_num_threads()}


def bench_decode(args) -> dict:
    if getattr(args, "model", None):
        return bench_decode_model(args)
    from dsv4.cost import decode_roofline_seconds, v4_cost
    from dsv4.train.flops import matmul_peak_flops

    dtype, device = getattr(torch, args.dtype), resolve_device(args.device)
    config, model = build(args.preset, args.seed, dtype, device)
    esize = torch.finfo(dtype).bits // 8
    batch = args.batch_size or 1
    check_context(config, args.context, esize, dense=not args.no_dense, device=device, batch=batch)
    g = torch.Generator().manual_seed(args.seed)

    def start(context: int, impl: str) -> DecodeRun:
        """A cache after ``context`` tokens for the ``batch`` rows, and the tokens its steps decode."""
        model.set_attention(ATTENTION[impl], args.block)
        ids = torch.randint(0, config.vocab_size, (batch, context + args.tokens), generator=g).to(device)
        if impl == "dense":
            cache = filled_dense_cache(model, context, dtype, g, args.tokens, batch)
            return DecodeRun(impl, context, ids, cache)
        # one row's cache copied into every row (a step's cost does not depend on the rows): a prompt prefilled, or
        # with --fill random one of random entries of the same shapes
        if args.fill == "random":
            row = filled_cache(model, context, g, args.tokens)
        else:
            row, _ = prefill(model, ids[:1, :context], args.chunk)
        return DecodeRun(impl, context, ids, row.repeat_rows(batch) if batch > 1 else row, row=row)

    # the runs' steps alternate (V4 at the context, V4 at 4K, dense; then their compiled twins), so that a drift of
    # the machine's speed during the run (on a shared 2-core machine, 20% within minutes) weighs on every ratio's
    # both sides alike
    t = time.perf_counter()
    runs = {"v4": start(args.context, "fast")}
    fill_s = time.perf_counter() - t
    if not args.no_4k:
        runs["v4_4k"] = start(4096, "fast")
    if not args.no_dense:
        runs["dense"] = start(args.context, "dense")
    compile_s, skipped = {}, {}
    if args.compile:
        twins = list(runs)
        if "dense" in runs:  # its compiled twin holds a second dense cache: only where that fits beside the first
            try:
                check_context(config, args.context, esize, dense=True, device=device, batch=batch)
            except ValueError as e:
                twins.remove("dense")
                skipped["dense_compiled_skipped"] = str(e)
        with torch.inference_mode():
            for name in twins:
                model.set_attention(ATTENTION[runs[name].impl], args.block)
                t = time.perf_counter()
                runs[name + "_compiled"] = compiled_run(model, runs[name], args.tokens, g)
                compile_s[name] = time.perf_counter() - t
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for i in range(args.tokens):
            for name, run in runs.items():
                model.set_attention(ATTENTION[run.impl], args.block)
                times[name].append(timed(lambda: run.run(i, model), 1, device)[0])
    model.set_attention("fast", args.block)
    ms = statistics.median(times["v4"]) * 1e3  # medians of the steps
    kv = runs["v4"].cache.nbytes()
    peak, bandwidth = matmul_peak_flops(dtype, device=device), copy_bandwidth(device=device)
    roof, roof_4k = (decode_roofline_seconds(config, n, esize, peak, bandwidth, batch) * 1e3
                     for n in (args.context, 4096))
    out = {"bench": "decode", "preset": args.preset, "context": args.context, "dtype": args.dtype,
           "device": str(device), "batch_size": batch, "fill": args.fill, "fill_seconds": fill_s,
           "ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms,
           "predicted_ratio_vs_4k": v4_cost(config, args.context).flops / v4_cost(config, 4096).flops,
           # the hardware's share by the roofline (FLOPs at the matmul peak, bytes at the copy bandwidth, both
           # measured here): what the step would cost without per-op overhead, and how that grows with context
           "matmul_peak_flops": peak, "bandwidth_bytes_per_s": bandwidth, "roofline_ms_per_token": roof,
           "roofline_ms_per_token_4k": roof_4k, "roofline_ratio_vs_4k": roof / roof_4k, "vs_roofline": ms / roof,
           "kv_bytes": kv, "dense_kv_bytes": batch * dense_kv_bytes(config, args.context, esize),
           **peak_memory(device), "threads": torch.get_num_threads(), **skipped}
    if "v4_4k" in runs:
        ms_4k = statistics.median(times["v4_4k"]) * 1e3
        out.update({"ms_per_token_4k": ms_4k, "ratio_vs_4k": ms / ms_4k, "vs_roofline_4k": ms_4k / roof_4k})
    if not args.no_dense:
        dense_ms, dense_kv = statistics.median(times["dense"]) * 1e3, runs["dense"].cache.nbytes()
        out.update({"dense_ms_per_token": dense_ms, "speedup_vs_dense": dense_ms / ms,
                    "dense_cache_bytes": dense_kv, "cache_ratio_vs_dense": dense_kv / kv})
    if args.compile:  # the compiled steps, as generation and serving run them, beside the eager ones
        cms = statistics.median(times["v4_compiled"]) * 1e3
        out.update({"compiled_ms_per_token": cms, "compiled_vs_roofline": cms / roof,
                    "compiled_speedup_vs_eager": ms / cms, "compile_seconds": compile_s["v4"],
                    "capacity": runs["v4_compiled"].cache.capacity,
                    "compiled_direct": runs["v4_compiled"].step.direct})  # its graph called without dynamo
        if "v4_4k" in runs:
            cms_4k = statistics.median(times["v4_4k_compiled"]) * 1e3
            out.update({"compiled_ms_per_token_4k": cms_4k, "compiled_ratio_vs_4k": cms / cms_4k,
                        "compiled_vs_roofline_4k": cms_4k / roof_4k, "compiled_speedup_vs_eager_4k": ms_4k / cms_4k,
                        "compile_seconds_4k": compile_s["v4_4k"]})
        if "dense_compiled" in runs:
            dcms = statistics.median(times["dense_compiled"]) * 1e3
            out.update({"dense_compiled_ms_per_token": dcms, "compiled_speedup_vs_dense_compiled": dcms / cms,
                        "dense_compile_seconds": compile_s["dense"]})
    return out


def bench_train(args) -> dict:
    """Training throughput on synthetic packed batches: tokens/s and MFU (model FLOPs per token x tokens/s over a
    matmul peak measured here)."""
    from dsv4.data.packing import Batch
    from dsv4.train.flops import matmul_peak_flops, train_flops_per_token
    from dsv4.train.loop import TrainConfig, Trainer

    device = resolve_device(args.device)
    config, model = build(args.preset, args.seed, torch.float32, device)
    seq, bsz = args.context, args.batch_size or 2
    g = torch.Generator().manual_seed(args.seed)

    class Synthetic:
        def __next__(self):
            tokens = torch.randint(0, config.vocab_size, (bsz, seq + 1), generator=g)
            docs = (torch.arange(seq + 1) >= seq // 2).long().expand(bsz, -1)  # two documents per row
            return Batch(tokens, docs, torch.zeros_like(tokens)).to(device)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    steps = args.warmup_steps + args.steps
    cfg = TrainConfig(steps=steps, lr=1e-3, warmup_steps=1, val_every=0, ckpt_every=0,
                      autocast_bf16=args.dtype == "bfloat16")
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(model, Synthetic(), cfg, d)
        for _ in range(args.warmup_steps):
            trainer.train_step()
        step_s, _ = timed(trainer.train_step, args.steps, device)
    tps = bsz * seq / step_s
    peak = matmul_peak_flops(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32, device=device)
    fpt = train_flops_per_token(config, seq)
    return {"bench": "train", "preset": args.preset, "seq_len": seq, "batch_size": bsz, "dtype": args.dtype,
            "device": str(device), "seconds_per_step": step_s, "tokens_per_s": tps, "train_flops_per_token": fpt,
            "matmul_peak_flops": peak, "mfu": tps * fpt / peak, **peak_memory(device),
            "threads": torch.get_num_threads()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsv4.serve.bench import add_arguments as add_serve_arguments

    p.add_argument("what", choices=["prefill", "decode", "train", "serve"])
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens per call through the cache)")
    p.add_argument("--block", type=int, default=None,
                   help="CSA queries per block inside the fast attention path (default: the model's)")
    p.add_argument("--tokens", type=int, default=32, help="decode: tokens timed per context (the median counts)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="train: sequences per step, --context long (default 2); decode: sequences decoded together, "
                        "one token each per step, from copies of one prefilled context (default 1)")
    p.add_argument("--steps", type=int, default=3, help="train: timed steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="train: untimed steps first")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--compile", action="store_true",
                   help="decode: also the compiled decoding steps (V4 and dense, compiled alike), timed in turn with "
                        "the eager ones, and their compile times")
    p.add_argument("--fill", default="prefill", choices=["prefill", "random"],
                   help="decode: V4's cache after --context tokens from a real prefill of random ids (default), or "
                        "filled with random entries of the same shapes and bytes (seconds at any context, as the "
                        "dense baseline's always is)")
    p.add_argument("--no-4k", action="store_true",
                   help="decode: skip V4 at 4,096 tokens beside the context (the ratio-vs-4K figures); a sweep over "
                        "contexts has its own 4K point")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (timers wait for the device)")
    p.add_argument("--json", action="store_true")
    add_serve_arguments(p)


def run(args: argparse.Namespace) -> int:
    for flag, least in (("context", 1), ("chunk", 1), ("tokens", 1), ("repeats", 1), ("batch_size", 1),
                        ("steps", 1), ("warmup_steps", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    if args.block is not None and args.block < 1:
        raise ValueError(f"--block must be >= 1, got {args.block}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.what == "serve":
        from dsv4.serve.bench import bench_serve

        result = bench_serve(args)
    else:
        result = {"prefill": bench_prefill, "decode": bench_decode, "train": bench_train}[args.what](args)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v:,.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    return 0
