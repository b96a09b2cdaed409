"""``dsv4 cost --fit``: will a model run at a context and batch size in this machine's memory?

``plan_memory(config, weights=..., context=..., batch=...) -> MemoryPlan`` adds up, as arithmetic (no model runs and
no weight is read):

* **weights**, by kind (embedding, head, attention, experts, shared experts, norms and other, MTP). From a checkpoint
  directory (``checkpoint_weights``): its ``config.json`` and the safetensors headers only (names, dtypes, shapes,
  byte ranges), in HF or official layout. ``dtype="packed"`` counts every tensor at its stored bytes, as a packed
  (memory-mapped) model holds them: FP8 E4M3 matrices with their 128x128 UE8M0 scales, MXFP4 experts packed two a
  byte with 1x32 scales, the rest as stored. ``"float32"`` / ``"bfloat16"`` count a materialized model: every weight's
  values (two per packed FP4 byte; scales dropped) at that size, integer tables as stored. From a config or preset
  (``config_weights``): the model's own tensors (built on the meta device), materialized, or ``"packed"`` as
  ``dsv4.weights.official.save_official`` stores them with the release's BF16 for the unquantized rest.
* **KV cache** of ``batch`` sequences at ``context`` tokens: window rings, compressed entries and indexer keys
  (counted by ``dsv4.cost.model.layer_kv_entries``; entries in the buffer that doubles when full, as
  ``dsv4.cache.append_rows`` allocates it over chunked prefill), and the compressors' partial blocks.
* **working memory**, the larger of a prefill chunk's and a decoding step's: the activations the fast prefill path
  holds at once (per token: the residual streams, the layer input, the query latent, the heads' queries and partial
  outputs, the indexer's queries; and the compressed layer's chunk projections), the largest attention score block at the chunk size (window band per span, HCA
  logits, CSA index scores and gathered top-k), the logits ([B, 1, vocab] float32 as ``generate`` asks for them, or
  [B, S, vocab] with ``all_logits``), and for a packed model what it dequantizes at once (one routed expert's
  three matrices, or a tile of a packed matrix), in float32.
* **loading**: a materialized model loaded from a checkpoint holds the checkpoint's (dequantized) tensors and the
  model at once (``dsv4.weights.from_pretrained``); a packed model maps its files and adds nothing.
* what the live tensors do not show (``ALLOCATOR_SLACK``, ``RUNTIME_BYTES``): memory the allocator keeps from a
  prefill chunk's transients, and the running process's own memory beyond its imports.

* **expert parallelism** (``expert_parallel=N``, ``--expert-parallel N``): the memory of one of N ranks that share
  each layer's routed experts (``torchrun --nproc_per_node N -m dsv4 generate``, ``dsv4.parallel.inference``): its
  1/N of the routed experts (the MTP block's too), everything else replicated, and the exchange's buffers (rows sent
  to and received from the experts' ranks, outputs sent back and gathered). A materialized model is loaded whole
  before it keeps its slice, so its loading peak is the whole model's.

``total_bytes`` = weights + KV cache + working memory + runtime; the plan ``fits`` when that and the loading peak
are within ``memory_bytes`` (default: this machine's RAM). The interpreter and torch themselves (a few hundred MiB)
are not counted. Measured against a real process in ``tests/test_cost_fit.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dsv4.config import CSA, HCA, SLIDING, ModelConfig
from dsv4.cost.model import check_context, experts_touched, layer_kv_entries
from dsv4.cost.weights import (DTYPE_BYTES, DTYPES, FLOAT, KINDS, checkpoint_tensors, checkpoint_weights, config_weights,
                               dequantized_bytes, materialized_loading_bytes)


# The fast prefill path's blocks (``dsv4.model.attention.Attention.__init__``): CSA queries per indexer block, window
# queries per block, queries per span, CSA queries per top-k gather; and chunk_scores' tiling (dsv4.model.indexer).
CSA_CHUNK, WINDOW_BLOCK, SPAN, GATHER_ROWS = 256, 32, 2048, 16
SCORE_TILE, SCORE_TILED_ABOVE = 512, 4 * 512
PREFILL_CHUNK = 4096  # dsv4.generate's default prompt chunk

# What the live tensors do not show, measured on a 2-core x86-64 Linux CPU with torch 2.13 (tests/test_cost_fit.py):
# - the allocator: at a prefill chunk's peak the process's resident memory grew 1.25 to 1.5x the tensors alive at
#   once (glibc keeps freed blocks that the next, larger request cannot reuse; tiny and small presets, 512 to 4096
#   tokens, with and without dsv4.runtime.tune_allocator), so the chunk's transients count 1 + ALLOCATOR_SLACK times;
# - the running process beyond its imports (the model's modules, kernel and thread-pool state, blocks kept from
#   loading): about 16 MiB.
ALLOCATOR_SLACK = 0.4
RUNTIME_BYTES = 16 << 20


# ------------------------------------------------------------------------------------------------------- KV cache
def _grow(cap: int, start: int, end: int, chunk: int, rate: int) -> int:
    """``entries_capacity``'s step: the buffer's rows after calls of ``chunk`` tokens over [start, end)."""
    calls, i = -(-(end - start) // chunk), 0
    while i < calls:
        a = start + i * chunk
        need, filled = min(a + chunk, end) // rate, a // rate
        if need > cap and need > filled:
            cap = max(need, 2 * filled)
        # the first later call whose need exceeds the capacity: its end reaches (cap + 1) rate tokens
        i = max(i + 1, -(-((cap + 1) * rate - start) // chunk) - 1)
    return cap


def entries_capacity(context: int, chunk: int, rate: int, prompt: int | None = None) -> int:
    """Rows of a layer's entry buffer after a prompt of ``prompt`` tokens (default ``context``) in calls of
    ``chunk``, then one token a call up to ``context``: ``dsv4.cache.append_rows`` grows it to max(needed,
    2 x filled) when a call's new entries do not fit. Only the calls that grow it are visited (the need is
    monotonic), so a million one-token calls cost a few dozen steps."""
    prompt = context if prompt is None else min(prompt, context)
    return _grow(_grow(0, 0, prompt, chunk, rate), prompt, context, 1, rate)


def kv_plan(config: ModelConfig, context: int, batch: int, window_bytes: int, chunk: int,
            prompt: int | None = None) -> dict[str, int]:
    """Bytes of ``batch`` rows of the decode cache at ``context`` tokens, a prompt of ``prompt`` tokens (default:
    all of them) prefilled in chunks of ``chunk``, then decoded a token at a time: window
    rings (``window_bytes`` per element, positions int64), compressed entries and indexer keys (float32, in their
    doubling buffers), the compressors' partial blocks (float32: the incomplete block's projections and gate logits,
    for CSA the overlap series of the last block)."""
    c, ic = config.head_dim, config.index_head_dim
    out = {"window": 0, "compressed": 0, "indexer": 0, "compressor_state": 0}
    for lt in config.layer_types:
        n = layer_kv_entries(config, lt, context)
        out["window"] += batch * config.sliding_window * c * window_bytes + config.sliding_window * 8
        if lt == SLIDING:
            continue
        m = config.compress_rate(lt)
        rows = max(entries_capacity(context, chunk, m, prompt), n["compressed"])
        out["compressed"] += batch * rows * c * FLOAT
        # partial block: up to m - 1 tokens of projections and gates, width 2c with the overlap (CSA), else c
        widths = [2 * c, 2 * ic] if lt == CSA else [c]
        for i, w in enumerate(widths):
            dim = w // 2 if lt == CSA else w
            out["compressor_state"] += batch * FLOAT * (2 * (m - 1) * w + (2 * m * dim if lt == CSA else 0))
            if i:  # the indexer's keys
                out["indexer"] += batch * rows * ic * FLOAT
    return out


# ------------------------------------------------------------------------------------------------- working memory
def _width(config: ModelConfig, lt: str) -> int:
    """Projected width per token of a layer's compressors: CSA's two-series KV and its indexer's, or HCA's."""
    if lt == CSA:
        return 2 * config.head_dim + 2 * config.index_head_dim
    return config.head_dim if lt == HCA else 0


def prefill_activations(config: ModelConfig) -> dict[str, int]:
    """Float32 values per token that the fast prefill path holds at its peak (the last layer of each type, where
    the most chunk projections are held): ``base`` (residual streams n d, the embedding, the normed layer input and
    the collapsed stream 3 d, the query latent, the K=V vector), ``heads`` (per layer type: the queries, the scaled
    queries, the window band's output and the key sets' partial outputs and their merge, in units of H c), the CSA
    indexer's queries, and ``retained``: the layer's own chunk projections (KV, gate logits and the gate with its
    position bias; the cache keeps copies of the last partial block only, so earlier layers' are freed)."""
    d, n, hc = config.hidden_size, config.hc_mult, config.num_attention_heads * config.head_dim
    base = n * d + 3 * d + config.q_lora_rank + config.head_dim
    heads = {SLIDING: 6 * hc, HCA: 7 * hc, CSA: 4 * hc + config.index_n_heads * config.index_head_dim}
    moe = (config.num_experts_per_tok + 2) * d + config.n_routed_experts + 3 * config.moe_intermediate_size
    best = {"per_token": base + moe, "base": base, "layer": 0, "retained": 0}
    for i, lt in enumerate(config.layer_types):
        retained = 3 * _width(config, lt)
        here = base + max(heads[lt], moe) + retained
        if here >= best["per_token"]:
            best = {"per_token": here, "base": base, "layer": i, "retained": retained}
    return best


def score_blocks(config: ModelConfig, batch: int, queries: int, context: int) -> dict[str, int]:
    """Bytes of the largest attention score blocks of a call of ``queries`` tokens per row that ends at ``context``:
    the window band of a span, HCA's logits against every visible entry per span, CSA's index scores of a block
    (its heads' dots tile by tile past ``SCORE_TILED_ABOVE`` entries, the scores, their masked copy) and a top-k
    gather with its logits."""
    h, c, w = config.num_attention_heads, config.head_dim, config.sliding_window
    span = min(queries, SPAN)
    out = {"window": batch * span * h * (min(WINDOW_BLOCK, queries) + w - 1) * FLOAT}
    if HCA in config.layer_types:
        t = context // config.compress_rate(HCA)
        out["hca"] = batch * span * (h * FLOAT + 1) * t
    if CSA in config.layer_types:
        t = context // config.compress_rate(CSA)
        q = min(queries, CSA_CHUNK)
        tile = SCORE_TILE if t > SCORE_TILED_ABOVE and q >= 64 else t
        k = min(config.index_topk, t)
        gather = min(queries, GATHER_ROWS)
        out["csa_index"] = batch * q * (config.index_n_heads * tile + 3 * t) * FLOAT
        out["csa_topk"] = batch * (gather * k * (c + h) * FLOAT + 2 * q * k * 8)
    return out


@dataclass
class MemoryPlan:
    """What ``plan_memory`` found: every figure in bytes."""

    source: str
    dtype: str
    context: int
    batch: int
    prefill_chunk: int
    prompt: int
    weights: dict[str, int]
    resident: dict[str, int]
    kv: dict[str, int]
    prefill: dict[str, int]
    decode: dict[str, int]
    loading_bytes: int
    runtime_bytes: int
    memory_bytes: int
    memory_source: str
    notes: list[str] = field(default_factory=list)
    expert_parallel: int = 1

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def resident_bytes(self) -> int:
        """The weights resident while running: all of a materialized model's; of a packed (mapped) model's, the
        pages it touches."""
        return sum(self.resident.values())

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv.values())

    @property
    def working_bytes(self) -> int:
        return max(sum(self.prefill.values()), sum(self.decode.values()))

    @property
    def total_bytes(self) -> int:
        """Running: the resident weights, KV cache, working memory and the process's runtime."""
        return self.resident_bytes + self.kv_bytes + self.working_bytes + self.runtime_bytes

    @property
    def loading_peak_bytes(self) -> int:
        """Loading a materialized model: the checkpoint's tensors and the model at once, and the runtime."""
        return self.loading_bytes + self.runtime_bytes if self.loading_bytes else 0

    @property
    def peak_bytes(self) -> int:
        return max(self.total_bytes, self.loading_peak_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.memory_bytes

    def too_large(self) -> str | None:
        """The figure that does not fit, named, or None."""
        if self.fits:
            return None
        if self.loading_peak_bytes > self.total_bytes:
            return (f"loading ({_gib(self.loading_peak_bytes)}: the checkpoint's tensors and the materialized model at "
                    f"once) exceeds the memory ({_gib(self.memory_bytes)})")
        parts = {"weights": self.resident_bytes, "KV cache": self.kv_bytes, "working memory": self.working_bytes}
        big = max(parts, key=parts.get)
        alone = " alone" if parts[big] > self.memory_bytes else ", the largest part,"
        return (f"total {_gib(self.total_bytes)} exceeds the memory ({_gib(self.memory_bytes)}); {big} "
                f"({_gib(parts[big])}){alone} is too large at context {self.context:,} and batch {self.batch}")

    def check(self) -> "MemoryPlan":
        """This plan, or a ``ValueError`` naming the figure that does not fit (for commands that are about to load
        a model or start a long context)."""
        if not self.fits:
            raise ValueError(f"{self.source} does not fit in memory: {self.too_large()}")
        return self

    def verdict(self) -> str:
        """One line for people."""
        if self.fits:
            return (f"fits: {_gib(self.peak_bytes)} of {_gib(self.memory_bytes)} "
                    f"({self.peak_bytes / self.memory_bytes:.0%}) at context {self.context:,} and batch {self.batch}")
        return "does not fit: " + self.too_large()

    def to_dict(self) -> dict:
        return {
            "source": self.source, "dtype": self.dtype, "context": self.context, "batch": self.batch,
            "prefill_chunk": self.prefill_chunk, "prompt": self.prompt, "expert_parallel": self.expert_parallel,
            "weights": dict(self.weights), "weights_bytes": self.weights_bytes,
            "weights_resident": dict(self.resident), "weights_resident_bytes": self.resident_bytes,
            "kv_cache": dict(self.kv), "kv_bytes": self.kv_bytes,
            "working": {"prefill": dict(self.prefill), "decode": dict(self.decode)},
            "working_bytes": self.working_bytes,
            "runtime_bytes": self.runtime_bytes,
            "loading_bytes": self.loading_bytes, "loading_peak_bytes": self.loading_peak_bytes,
            "total_bytes": self.total_bytes, "peak_bytes": self.peak_bytes,
            "memory_bytes": self.memory_bytes, "memory_source": self.memory_source,
            "fits": self.fits, "verdict": self.verdict(), "notes": list(self.notes),
        }


def _gib(x: float) -> str:
    for div, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:.0f} B"


def machine_memory() -> tuple[int, str]:
    """(bytes of RAM, where the figure came from): /proc/meminfo's MemTotal, else psutil, else an error."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemTotal"
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().total), "psutil"
    except ImportError:
        raise ValueError("cannot tell this machine's memory (no /proc/meminfo, no psutil): give --memory-gib") from None


def plan_memory(config: ModelConfig | None, weights: dict[str, int] | str | Path | None = None, context: int = 4096,
                batch: int = 1, dtype: str | None = None, prefill_chunk: int = PREFILL_CHUNK,
                all_logits: bool = False, speculative: bool = False, prompt: int | None = None,
                memory_bytes: int | None = None, loading_bytes: int = 0, source: str = "config",
                expert_parallel: int = 1) -> MemoryPlan:
    """The memory of running ``config`` on ``batch`` sequences up to ``context`` tokens, prompts of ``prompt``
    tokens (default: the whole context, the worst case) prefilled in chunks of ``prefill_chunk``, the rest decoded
    (see the module docstring). ``weights``: bytes by kind (``checkpoint_weights`` or ``config_weights``;
    computed from the config at ``dtype`` when None), or a checkpoint directory (then ``plan_checkpoint``: its own
    config.json and headers are read, ``config`` is not needed). ``dtype``: "packed" (FP8 / FP4 weights kept as
    stored and memory-mapped, computed in float32, a weight dequantized at a time), "float32" or "bfloat16"; None:
    float32, or for a checkpoint directory what ``from_pretrained`` makes of its layout. A packed model's resident weights are the pages it touches: the embedding rows of at most ``batch * context``
    tokens, the routed experts those tokens are routed to (uniform routing: ``experts_touched``), the MTP block
    only with ``speculative`` decoding, everything else. ``memory_bytes``: the budget (default: this machine's
    RAM). ``loading_bytes``: the loader's peak, if more than the weights. ``expert_parallel``: the plan of one of
    that many ranks sharing the routed experts (see the module docstring); it must divide ``n_routed_experts``."""
    if isinstance(weights, (str, Path)):
        return plan_checkpoint(weights, context=context, batch=batch, dtype=dtype, prefill_chunk=prefill_chunk,
                               all_logits=all_logits, speculative=speculative, prompt=prompt,
                               memory_bytes=memory_bytes, expert_parallel=expert_parallel)
    if config is None:
        raise ValueError("plan_memory needs a config, or a checkpoint directory as weights")
    dtype = dtype or "float32"
    context = check_context(context)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    ep = expert_parallel
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1 or config.n_routed_experts % ep:
        raise ValueError(f"expert_parallel (ranks sharing the routed experts) must be a positive divisor of the "
                         f"{config.n_routed_experts} routed experts, got {ep!r}")
    if weights is None:
        weights = config_weights(config, dtype)
    weights = {k: int(weights.get(k, 0)) for k in KINDS}
    if ep > 1:  # one rank's slice of the routed experts; the MTP block's experts are a layer's size
        whole = sum(weights.values())
        mtp_experts = min(weights["mtp"], weights["experts"] * config.num_nextn_predict_layers
                          // max(1, config.num_hidden_layers))
        weights["mtp"] -= mtp_experts - mtp_experts // ep
        weights["experts"] //= ep
    if memory_bytes is None:
        memory_bytes, memory_source = machine_memory()
    else:
        memory_bytes, memory_source = int(memory_bytes), "given"
    if prompt is not None and (isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 1):
        raise ValueError(f"prompt must be an integer number of tokens >= 1, got {prompt!r}")
    prompt = context if prompt is None else min(prompt, context)
    window_bytes = DTYPE_BYTES.get(dtype, FLOAT)
    kv = kv_plan(config, context, batch, window_bytes, prefill_chunk, prompt)

    s = min(prefill_chunk, prompt)
    act = prefill_activations(config)
    prefill = {"activations": batch * s * act["per_token"] * FLOAT,
               "scores": max(score_blocks(config, batch, s, context).values()),
               "logits": batch * (s if all_logits else 1) * config.vocab_size * FLOAT}
    prefill["allocator"] = int(ALLOCATOR_SLACK * (prefill["activations"] + prefill["scores"]))
    decode = {"activations": batch * act["per_token"] * FLOAT,
              "scores": max(score_blocks(config, batch, 1, context).values()),
              "logits": batch * config.vocab_size * FLOAT}
    notes = [f"prefill activations: {act['per_token']:,} float32 values per token at their peak (layer "
             f"{act['layer']}), of which {act['retained']:,} are chunk projections the cache's partial blocks hold"]
    if ep > 1:
        # per token: its share of (token, expert) rows sent and received, expert outputs received and sent back
        # (4 k / ep rows of d), its output combined and every rank's gathered (2 d)
        exchange = (4 * config.num_experts_per_tok / ep + 2) * config.hidden_size * FLOAT
        prefill["exchange"] = round(batch * s * exchange)
        decode["exchange"] = round(batch * exchange)
        notes.append(f"expert parallelism: one of {ep} ranks, holding 1/{ep} of the routed experts "
                     f"({_gib(weights['experts'])} of each rank's {_gib(sum(weights.values()))}; the whole model "
                     f"{_gib(whole)}), the rest replicated; the {ep} ranks together need {ep} times this plan")
    resident = dict(weights)
    if dtype == "packed":
        prefill["dequantized"] = decode["dequantized"] = dequantized_bytes(config)
        tokens = batch * context
        resident["embedding"] = min(weights["embedding"],
                                    -(-weights["embedding"] * min(tokens, config.vocab_size) // config.vocab_size))
        share = experts_touched(config, tokens) / config.n_routed_experts
        resident["experts"] = round(weights["experts"] * share)
        if not speculative:
            resident["mtp"] = 0
        notes.append("packed: weights mapped from the files, resident where touched (embedding rows of the tokens, "
                     f"{share:.0%} of the routed experts, the MTP block {'with' if speculative else 'without'} "
                     "speculative decoding); dequantized to float32 one expert or one tile of rows at a time")
    return MemoryPlan(source=source, dtype=dtype, context=context, batch=batch, prefill_chunk=prefill_chunk,
                      prompt=prompt,
                      weights=weights, resident=resident, kv=kv, prefill=prefill, decode=decode,
                      loading_bytes=int(loading_bytes), runtime_bytes=RUNTIME_BYTES, memory_bytes=memory_bytes,
                      memory_source=memory_source, notes=notes, expert_parallel=ep)


def plan_checkpoint(path: str | Path, context: int = 4096, batch: int = 1, dtype: str | None = None,
                    **kwargs) -> MemoryPlan:
    """``plan_memory`` for a checkpoint directory, from its ``config.json`` and safetensors headers only.
    ``dtype`` None: "packed" for DeepSeek's official layout, "float32" for HF layout (what ``from_pretrained``
    makes of each)."""
    from dsv4.atomic import recover_directory

    path = Path(path)
    recover_directory(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (not a checkpoint directory)")
    config = ModelConfig.from_json(path / "config.json")
    tensors = checkpoint_tensors(path)
    counted, stored, layout = checkpoint_weights(tensors, "packed")
    if dtype is None:
        dtype = "packed" if layout == "official" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if dtype != "packed":
        counted = checkpoint_weights(tensors, dtype)[0]
    loading = materialized_loading_bytes(tensors) if dtype != "packed" else 0
    plan = plan_memory(config, weights=counted, context=context, batch=batch, dtype=dtype,
                       loading_bytes=loading, source=f"{path} ({layout} layout)", **kwargs)
    plan.notes.append(f"checkpoint: {sum(stored.values()):,} bytes stored")
    return plan


# ----------------------------------------------------------------------------------------------------------- text
def format_plan(plan: MemoryPlan) -> str:
    """The text of ``dsv4 cost --fit``."""
    d = plan.to_dict()
    lines = [f"dsv4 cost --fit: {plan.source}, weights {plan.dtype}, context {plan.context:,} (prompt "
             f"{plan.prompt:,} in chunks of {plan.prefill_chunk:,}), batch {plan.batch}"
             + (f", one of {plan.expert_parallel} expert-parallel ranks" if plan.expert_parallel > 1 else ""), ""]

    def row(label: str, value: int, indent: int = 0) -> None:
        lines.append(f"{' ' * indent}{label:<{34 - indent}}{_gib(value):>12}")

    labels = {"embedding": "embedding", "head": "head", "attention": "attention", "experts": "routed experts",
              "shared_experts": "shared experts", "norms_other": "norms, mHC, routers", "mtp": "MTP block",
              "window": "window rings", "compressed": "compressed entries", "indexer": "indexer keys",
              "compressor_state": "compressors' partial blocks", "activations": "activations",
              "scores": "largest score block", "logits": "logits (float32)", "allocator": "allocator slack",
              "dequantized": "one weight dequantized", "exchange": "experts' exchange"}
    packed = plan.resident != plan.weights
    row("weights (resident of the mapped)" if packed else "weights", plan.resident_bytes)
    for k, v in plan.weights.items():
        if v:
            lines.append(f"  {labels[k]:<32}{_gib(plan.resident[k]):>12}"
                         + (f"  of {_gib(v)}" if plan.resident[k] != v else ""))
    if packed:
        lines.append(f"  {'mapped from the files':<32}{_gib(plan.weights_bytes):>12}")
    row("KV cache", plan.kv_bytes)
    for k, v in plan.kv.items():
        row(labels[k], v, 2)
    which = "prefill chunk" if sum(plan.prefill.values()) >= sum(plan.decode.values()) else "decoding step"
    row(f"working memory ({which})", plan.working_bytes)
    for phase in ("prefill", "decode"):
        lines.append(f"  {phase}: " + ", ".join(f"{labels[k]} {_gib(v)}" for k, v in d["working"][phase].items()))
    row("runtime", plan.runtime_bytes)
    row("total", plan.total_bytes)
    if plan.loading_bytes:
        row("loading peak (materialized)", plan.loading_peak_bytes)
    row(f"memory ({plan.memory_source})", plan.memory_bytes)
    lines += ["", *(f"note: {n}" for n in plan.notes), "", plan.verdict()]
    return "\n".join(lines)
