"""``dsv4 lab million``: a million-token context prefilled, decoded and used for retrieval on a laptop CPU.

The model has the report's attention ratios (sliding window 128, CSA compressing 4x with a lightning indexer picking
the top 512 entries, HCA compressing 128x) at a small width: three layers (CSA, HCA, sliding window), hidden size
128, two residual streams, four routed experts, an indexer of 2 heads x 16 dims (its scores are the part of a long
prefill that grows with the square of the length; a long prefill picks through ``dsv4.model.indexer.select_topk``).
It is trained on key-value retrieval (``dsv4.data.retrieval``: needles ``NEEDLE key value`` hidden in the standard
library's source text, questions ``QUERY key`` answered by the value) through the project's loop
(``dsv4.train.loop.Trainer``: Muon + AdamW, warmup-stable-decay, the aux-loss-free bias, the indexer's KL loss, dense
-> indexer warm-up -> sparse) with sequence-length stages (``dsv4.train.stages.StagedLoader``: 256 -> 1024 -> 4096 ->
16384 tokens), the loss on the answers alone. A training row keeps its needles out of its second half, so that no
question reaches its needle through the sliding window: the answer has to come through the compressed entries (with
needles next to the questions the model learns nothing long-range).

Evaluation, per context length: one context of filler with ``questions`` needles (one in each of as many equal
stretches, from evaluation text the model never trained on) is prefilled once in chunks through the decode cache;
the cache's snapshot (``ModelCache.snapshot``) is taken, and each question is asked from it (``restore``, then
``QUERY``, ``key`` one token per call; the argmax after the key is the answer, which is then fed as one more decoded
token). Reported: accuracy per length; whether each CSA layer's indexer top-k at the key token holds a compressed entry
covering one of the needle's values (``topk_hit_rate``, counted where the layer had more entries than it picks); prefill
seconds per length (with a fit of chunk time against position, extrapolated to 1M when 1M is not run); decode ms per
token (single-token calls at the longest length); peak resident memory of the evaluation; ``cache.nbytes()`` against
the cost model's ``kv_cache_bytes`` (float32) and against the dense-attention cache of the same model
(``dsv4.bench.dense_kv_bytes``).

The trained model is saved to ``<out>/million-model[-quick]-s<seed>/`` (HF layout + ``million.json``) and reused by
the next run with the same settings, so the evaluation can be rerun without training. ``dsv4 lab million`` evaluates
16K, 128K and 1M; ``python -m dsv4.lab.million --lengths 16K,128K`` chooses the lengths (and takes ``--questions``,
``--model-dir``, ``--retrain``, ``--prefill-chunk`` besides the lab options).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsv4.bench import peak_rss_gib, reset_peak_rss
from dsv4.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig
from dsv4.data.retrieval import RetrievalLoader, RetrievalVocab, needle_context, question
from dsv4.model import fused

TITLE = "A million-token context: prefilled, decoded and used for retrieval on a 2-core CPU"
SPEC = ("max_position_embeddings 1,048,576 (spec 1); sequence length 4K -> 16K -> 64K -> 1M (spec 6.2); at 1M "
        "context the KV cache is a fraction of V3.2's and about 2% of a BF16 GQA-8 baseline (spec 8)")
THRESHOLD = ("retrieval accuracy >= 0.9 at 1,048,576 tokens of context, with that prefill and its decoding under 30 "
             "minutes and peak memory under 4 GiB on this machine")

ONE_M = 1 << 20
ACCURACY_BAR, MINUTES_BAR, GIB_BAR = 0.9, 30.0, 4.0


@dataclass
class Settings:
    """What a run trains and evaluates (``FULL`` / ``QUICK``, changed by the options)."""

    lengths: list[int]
    questions: int
    steps: int
    stages: list[tuple[int, int]]  # (first step, sequence length)
    tokens_per_step: int
    tokens_per_needle: int  # training rows: one needle per this many context tokens
    dense_steps: int
    indexer_warmup: int
    lr: float
    prefill_chunk: int
    quick: bool = False
    keys: int = 32
    values: int = 32
    repeats: int = 4
    # training rows keep their needles out of the last ``gap_fraction`` of the context: with the sliding window no
    # wider than that gap, the compressed entries are the only way from a question to its needle
    gap_fraction: float = 0.5
    # the indexer's heads x head dim: its scores and top-k are what grows with the square of the context (every query
    # scores every compressed entry), so a 1M prefill's time is mostly theirs: 2 x 16 (V4's is 64 x 128)
    index_heads: int = 2
    index_head_dim: int = 16

    def train_key(self) -> dict:
        """The settings that decide the trained model (a saved model is reused only when these match)."""
        return {k: v for k, v in asdict(self).items() if k not in ("lengths", "questions", "prefill_chunk")}


# The curriculum: at 256 tokens (64 CSA entries, all of them attended) the model learns to look a key up in the
# compressed entries (accuracy leaves chance after some 60 steps and passes 0.95 by step 90 at lr 1e-2); 1024 and
# 4096 tokens then stretch the distances and the entries, and the 4096 stage trains sparse (1024 CSA entries, twice
# the top-k) after the indexer's warm-up. At 4096 the top-k keeps half the entries, so the indexer hardly has to tell
# a needle from filler; the last stage, 16384 tokens (4096 entries, 8x the top-k), makes it (trained to 4096 alone,
# the model answered 0.9 at 128K and 0.8 at 1M, and its top-k missed the needle in 1 of 20 questions at 1M).
FULL = Settings(lengths=[16384, 131072, ONE_M], questions=20, steps=270,
                stages=[(0, 256), (150, 1024), (200, 4096), (240, 16384)],
                tokens_per_step=2048, tokens_per_needle=16, dense_steps=205, indexer_warmup=5, lr=1e-2,
                prefill_chunk=8192)
QUICK = Settings(lengths=[1024, 2048], questions=4, steps=4, stages=[(0, 64), (2, 128)], tokens_per_step=256,
                 tokens_per_needle=16, dense_steps=2, indexer_warmup=1, lr=1e-2, prefill_chunk=512, quick=True)


def lab_config(settings: Settings) -> ModelConfig:
    """The model: the report's ratios (window 128, rates 4 / 128, top-k 512) at width 128; quick: a tiny one at
    window 16, rates 4 / 16, top-k 16."""
    vocab = RetrievalVocab(settings.keys, settings.values, settings.repeats)
    common = dict(vocab_size=vocab.size, num_hidden_layers=3, layer_types=[CSA, HCA, SLIDING],
                  mlp_layer_types=[HASH_MOE, MOE, MOE], num_experts_per_tok=2, n_routed_experts=4, hc_mult=2,
                  o_groups=2, num_nextn_predict_layers=0)
    if settings.quick:
        return ModelConfig(**common, hidden_size=64, moe_intermediate_size=64, num_attention_heads=2, head_dim=32,
                           q_lora_rank=32, o_lora_rank=32, max_position_embeddings=8192, sliding_window=16,
                           compress_rates={CSA: 4, HCA: 16}, index_n_heads=settings.index_heads,
                           index_head_dim=settings.index_head_dim, index_topk=16,
                           partial_rotary_factor=0.25)
    # 1M + room for the question and its answer
    return ModelConfig(**common, hidden_size=128, moe_intermediate_size=128, num_attention_heads=4, head_dim=64,
                       q_lora_rank=64, o_lora_rank=64, max_position_embeddings=ONE_M + 1024, sliding_window=128,
                       compress_rates={CSA: 4, HCA: 128}, index_n_heads=settings.index_heads,
                       index_head_dim=settings.index_head_dim, index_topk=512,
                       partial_rotary_factor=0.125)


def settings_of(options) -> Settings:
    """The run's settings: ``QUICK`` or ``FULL`` with the options' ``lengths``, ``questions``, ``prefill_chunk``."""
    s = QUICK if getattr(options, "quick", False) else FULL
    lengths = getattr(options, "lengths", None)
    if lengths:
        s = replace(s, lengths=parse_lengths(lengths) if isinstance(lengths, str) else [int(x) for x in lengths])
    for name in ("questions", "prefill_chunk"):
        v = getattr(options, name, None)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
            s = replace(s, **{name: v})
    if s.questions > s.keys:
        raise ValueError(f"--questions must be at most {s.keys} (the distinct keys of one context), got {s.questions}")
    limit = lab_config(s).max_position_embeddings - 8
    for n in s.lengths:
        if n < 8 * s.questions or n > limit:
            raise ValueError(f"context length {n} must be in [{8 * s.questions}, {limit}] "
                             f"(8 tokens per question; max_position_embeddings leaves room to ask)")
    return s


def parse_lengths(text: str) -> list[int]:
    """'16K,128K,1M' -> [16384, 131072, 1048576]."""
    from dsv4.cost.report import parse_context

    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--lengths must name at least one context length, got {text!r}")
    try:
        return [parse_context(p) for p in parts]
    except ValueError:
        raise ValueError(f"--lengths must be context lengths such as 16K,128K,1M, got {text!r}") from None


# ------------------------------------------------------------------------------------------------------ training
def answer_losses(model, batch, alpha: float):
    """The loop's ``Losses`` of a retrieval batch: cross-entropy on the answers alone, the balance loss and expert
    loads, the indexer's KL; plus the answers' accuracy (returned second)."""
    from dsv4.train.balance import expert_loads, sequence_balance_loss
    from dsv4.train.loop import Losses

    out = model.forward_train(batch.inputs, batch.input_doc_ids)
    mask = batch.answer_targets
    logits, targets = out.logits[mask], batch.tokens[:, 1:][mask]
    lm = F.cross_entropy(logits, targets)
    accuracy = float((logits.argmax(-1) == targets).float().mean())
    balance = torch.zeros((), device=logits.device)
    loads = []
    for layer, route in zip(model.layers, out.routes):
        if not layer.ffn.gate.hashed:
            balance = balance + sequence_balance_loss(route, batch.inputs.shape[0], alpha)
            loads.append(expert_loads(route, model.config.n_routed_experts))
    return Losses(lm, torch.zeros((), device=logits.device), balance, loads, out.indexer_kl,
                  out.indexer_recall), accuracy


def train(settings: Settings, seed: int, log) -> tuple[torch.nn.Module, dict]:
    """A model trained on retrieval with the settings' stages; returns it and its training record."""
    from dsv4.model import Transformer
    from dsv4.train.loop import TrainConfig, Trainer
    from dsv4.train.stages import StagedLoader

    torch.manual_seed(seed)
    vocab = RetrievalVocab(settings.keys, settings.values, settings.repeats)
    model = Transformer(lab_config(settings))

    def make_loader(seq_len: int, rank: int = 0, world: int = 1) -> RetrievalLoader:
        return RetrievalLoader(vocab, max(1, settings.tokens_per_step // seq_len), seq_len, seed=seed,
                               tokens_per_needle=settings.tokens_per_needle,
                               gap=int(seq_len * settings.gap_fraction))

    cfg = TrainConfig(steps=settings.steps, lr=settings.lr, warmup_steps=min(10, settings.steps // 5), seed=seed,
                      val_every=0, ckpt_every=0, bias_speed=1e-2, mtp_weight=0.0, mtp_weight_decay_phase=0.0,
                      dense_steps=settings.dense_steps, indexer_warmup_steps=settings.indexer_warmup,
                      anticipatory_routing=False)
    record = {"loss": [], "accuracy": [], "indexer_kl": [], "seq_len": [], "phase": []}

    class RetrievalTrainer(Trainer):
        def losses(self, batch):
            losses, accuracy = answer_losses(self.model, batch, self.cfg.balance_alpha)
            record["accuracy"].append(accuracy)
            record["seq_len"].append(int(batch.inputs.shape[1]))
            return losses

    data = StagedLoader(make_loader, settings.stages)
    trainer = RetrievalTrainer(model, data, cfg, out=os.devnull)
    t0 = time.perf_counter()
    for step in range(1, settings.steps + 1):
        r = trainer.train_step()
        record["loss"].append(r.lm_loss)
        record["indexer_kl"].append(r.indexer_kl)
        record["phase"].append(r.phase)
        if step % max(1, settings.steps // 12) == 0 or step == settings.steps:
            recent = record["accuracy"][-10:]
            log(f"million: step {step}/{settings.steps} ({r.phase}, length {record['seq_len'][-1]}): answer loss "
                f"{r.lm_loss:.3f}, accuracy (last {len(recent)} steps) {sum(recent) / len(recent):.2f}, "
                f"{time.perf_counter() - t0:.0f} s")
    record["seconds"] = time.perf_counter() - t0
    last = record["accuracy"][-10:]
    record["final_train_accuracy"] = sum(last) / len(last)
    record["final_train_length"] = record["seq_len"][-1]
    return model.eval(), record


def model_dir(options, settings: Settings) -> Path:
    given = getattr(options, "model_dir", None)
    if given:
        return Path(given)
    return Path(options.out) / f"million-model{'-quick' if settings.quick else ''}-s{options.seed}"


def trained_model(options, settings: Settings, log) -> tuple[torch.nn.Module, dict, bool]:
    """The saved model of these settings if there is one (and not ``retrain``), else a newly trained one, saved.
    Returns (model, training record, reused)."""
    from dsv4.weights import from_pretrained

    where = model_dir(options, settings)
    meta_path = where / "million.json"
    if meta_path.exists() and not getattr(options, "retrain", False):
        meta = json.loads(meta_path.read_text())
        if meta.get("train_key") == json.loads(json.dumps(settings.train_key())) and meta.get("seed") == options.seed:
            log(f"million: reusing the trained model in {where}")
            return from_pretrained(where).eval(), meta["training"], True
        log(f"million: {where} holds a model trained with other settings: training anew")
    model, record = train(settings, options.seed, log)
    model.save_pretrained(where)
    meta_path.write_text(json.dumps({"train_key": settings.train_key(), "seed": options.seed,
                                     "training": record}) + "\n")
    return model, record, False


# ---------------------------------------------------------------------------------------------------- evaluation
class TopkProbe:
    """Records, for the next call of the model while armed, whether each CSA layer's indexer top-k at the call's
    (single) token holds one of the given compressed entries. The indexer's choice is recomputed from the layer's
    input and its cache after the call, as ``dsv4.model.decode.attend_cached`` makes it."""

    def __init__(self, model):
        self.layers = [b.attn for b in model.layers if b.attn.indexer is not None]
        self.seen: dict[int, tuple] = {}
        self.picks: list[set[int] | None] = []  # the last ``hits``' top-k entries per CSA layer
        self.armed = False
        self.handles = [attn.register_forward_pre_hook(self._hook(i)) for i, attn in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args):
            if self.armed:
                self.seen[i] = (args[0], args[1], args[2])
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    @torch.inference_mode()
    def hits(self, entries: list[int]) -> list[bool | None]:
        """Per CSA layer: whether its top-k at the recorded token held one of ``entries`` (None: it had no more
        entries than it picks, so it chose none out)."""
        from dsv4.model.indexer import chunk_scores, topk_lower_index
        from dsv4.model.precision import upcast

        out, self.picks = [], []
        for i, attn in enumerate(self.layers):
            x, positions, cache = self.seen[i]
            idx = attn.indexer
            keys = cache.indexer.entries
            n = 0 if keys is None else keys.shape[1]
            if n <= idx.topk:
                out.append(None)
                self.picks.append(None)
                continue
            q_latent = attn.q_norm(attn.wq_a(x))
            qi, wi = idx.queries(x, q_latent, positions, attn.rotary)
            scores = idx.round_scores(chunk_scores(qi, wi, upcast(idx._fp4(keys)).transpose(1, 2)))[0, -1]
            pick = set(topk_lower_index(scores, idx.topk).tolist())
            self.picks.append(pick)
            out.append(any(e in pick for e in entries))
        self.seen.clear()
        return out


@torch.inference_mode()
def evaluate_length(model, settings: Settings, length: int, seed: int, log) -> dict:
    """One context of ``length`` tokens with ``settings.questions`` needles, prefilled once; every question asked
    from the snapshot after the prefill."""
    vocab = RetrievalVocab(settings.keys, settings.values, settings.repeats)
    rng = np.random.default_rng([seed, 1, length])
    tokens, needles = needle_context(length, settings.questions, vocab, rng, split="eval")
    ids = torch.from_numpy(tokens).unsqueeze(0)
    cache = model.new_cache(1)
    chunk = settings.prefill_chunk
    chunk_seconds, t0 = [], time.perf_counter()
    for a in range(0, length, chunk):
        tc = time.perf_counter()
        model(ids[:, a:a + chunk], cache=cache, last_only=True)
        chunk_seconds.append(time.perf_counter() - tc)
        if length >= 32 * chunk and (len(chunk_seconds) % 16 == 0 or a + chunk >= length):
            log(f"million: {length}: prefilled {min(a + chunk, length)} tokens in {time.perf_counter() - t0:.0f} s")
    prefill = time.perf_counter() - t0
    cache_bytes = cache.nbytes()
    snap = cache.snapshot()
    rate = model.config.compress_rates[CSA]
    probe = TopkProbe(model)
    step_seconds, rows = [], []
    try:
        for needle in needles:
            cache.restore(snap)
            q = question(needle, vocab)
            for j, token in enumerate(q):
                probe.armed = j == len(q) - 1
                tc = time.perf_counter()
                logits = model(torch.tensor([[token]]), cache=cache)
                step_seconds.append(time.perf_counter() - tc)
            probe.armed = False
            answer = int(logits[0, -1].argmax())
            # the CSA entries holding a value token: entry i pools tokens [4 (i - 1), 4 (i + 1)) (overlap)
            hits = probe.hits(sorted({e for v in needle.value_positions for e in (v // rate, v // rate + 1)}))
            tc = time.perf_counter()
            model(torch.tensor([[answer]]), cache=cache)  # the answer decoded as the next token
            step_seconds.append(time.perf_counter() - tc)
            rows.append({"position": needle.position, "distance": length - needle.position,
                         "correct": answer == vocab.value(needle.value), "topk_hits": hits})
    finally:
        probe.close()
    correct = [r["correct"] for r in rows]
    hits = [h for r in rows for h in r["topk_hits"] if h is not None]
    # how many CSA entries hold some needle's value: when they all fit in the top-k, an indexer that picks every
    # needle-like entry hits without telling one key from another
    needle_entries = len({e for n in needles for v in n.value_positions for e in (v // rate, v // rate + 1)})
    return {"length": length, "accuracy": sum(correct) / len(correct), "prefill_seconds": prefill,
            "prefill_tokens_per_s": length / prefill, "chunk_seconds": chunk_seconds,
            "decode_ms_per_token": 1000 * sum(step_seconds) / len(step_seconds),
            "decode_seconds": sum(step_seconds), "cache_bytes": cache_bytes,
            "topk_hit_rate": sum(hits) / len(hits) if hits else None, "topk_probes": len(hits),
            "needle_entries": needle_entries, "questions": rows}


def extrapolate_prefill(chunk_seconds: list[float], chunk: int, length: int) -> float | None:
    """Seconds to prefill ``length`` tokens in ``chunk``-token calls: the measured chunks' seconds, then for each
    further chunk a least-squares line of chunk time against chunk start (the indexer's scores per chunk grow with
    the entries before it), fitted to the measured chunks but the first (which has no past); None with fewer than 4
    chunks measured. The early chunks' steeper growth (before ``dsv4.model.prefill.SELECT_MIN_ENTRIES``) makes the
    line's slope, and so the projection, err on the high side."""
    n = len(chunk_seconds)
    if n < 4:
        return None
    starts = np.arange(n) * chunk
    b, a = np.polyfit(starts[1:], np.asarray(chunk_seconds[1:]), 1)
    measured = float(sum(chunk_seconds[:-(-length // chunk)]))
    return measured + float(sum(max(a + b * s, 0.0) for s in range(n * chunk, length, chunk)))


def run(options) -> dict:
    """The lab (see the module docstring); ``options``: ``dsv4.lab.common.LabOptions``, optionally with
    ``lengths``, ``questions``, ``prefill_chunk``, ``model_dir``, ``retrain``."""
    from dsv4.bench import dense_kv_bytes
    from dsv4.cost import kv_cache_bytes
    from dsv4.runtime import tune_allocator

    log = getattr(options, "log", lambda msg: print(msg, file=sys.stderr, flush=True))
    settings = settings_of(options)
    tune_allocator()
    fused.kernel()  # built (or loaded) before any prefill is timed: a first build takes minutes
    model, training, reused = trained_model(options, settings, log)
    config = model.config
    dtype_bytes = model.embed.weight.element_size()
    reset_peak_rss()
    per_length = {}
    for length in sorted(settings.lengths):
        log(f"million: evaluating {length} tokens of context, {settings.questions} questions ...")
        r = evaluate_length(model, settings, length, options.seed, log)
        r["cost_model_cache_bytes"] = kv_cache_bytes(config, length, dtype_bytes)
        r["dense_cache_bytes"] = dense_kv_bytes(config, length, dtype_bytes)
        per_length[str(length)] = r
        log(f"million: {length}: accuracy {r['accuracy']:.2f}, prefill {r['prefill_seconds']:.1f} s, decode "
            f"{r['decode_ms_per_token']:.1f} ms/token, top-k hit rate {r['topk_hit_rate']}")
    peak = peak_rss_gib()
    longest = per_length[str(max(settings.lengths))]
    one_m = per_length.get(str(ONE_M))
    projected = None if one_m is not None or settings.quick else extrapolate_prefill(
        longest["chunk_seconds"], settings.prefill_chunk, ONE_M)
    hits = [h for r in per_length.values() for q in r["questions"] for h in q["topk_hits"] if h is not None]
    result = {
        "accuracy": {k: r["accuracy"] for k, r in per_length.items()},
        "longest": longest["length"],
        "prefill_seconds": longest["prefill_seconds"],
        "decode_ms_per_token": longest["decode_ms_per_token"],
        "peak_rss_gib": peak,
        "cache_bytes": longest["cache_bytes"],
        "cost_model_cache_bytes": longest["cost_model_cache_bytes"],
        "dense_cache_bytes": longest["dense_cache_bytes"],
        "cache_vs_cost_model": longest["cache_bytes"] / longest["cost_model_cache_bytes"],
        "cache_vs_dense": longest["cache_bytes"] / longest["dense_cache_bytes"],
        "topk_hit_rate": sum(hits) / len(hits) if hits else None,
        "prefill_seconds_by_length": {k: r["prefill_seconds"] for k, r in per_length.items()},
        "prefill_tokens_per_s_by_length": {k: r["prefill_tokens_per_s"] for k, r in per_length.items()},
        "decode_ms_per_token_by_length": {k: r["decode_ms_per_token"] for k, r in per_length.items()},
        "topk_hit_rate_by_length": {k: r["topk_hit_rate"] for k, r in per_length.items()},
        "needle_entries_by_length": {k: r["needle_entries"] for k, r in per_length.items()},
        "cache_bytes_by_length": {k: r["cache_bytes"] for k, r in per_length.items()},
        "prefill_seconds_1m_extrapolated": projected,
        "questions_per_length": settings.questions,
        "chance_accuracy": 1 / settings.values,
        "train_accuracy": training["final_train_accuracy"],
        "train_length": training["final_train_length"],
        "train_seconds": training["seconds"],
        "train_steps": len(training["loss"]),
        "model_reused": reused,
        "model_dir": str(model_dir(options, settings)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {"hidden_size": config.hidden_size, "layer_types": config.layer_types,
                   "sliding_window": config.sliding_window, "compress_rates": config.compress_rates,
                   "index_topk": config.index_topk, "index_heads": config.index_n_heads,
                   "index_head_dim": config.index_head_dim, "hc_mult": config.hc_mult},
        "training": {k: training[k] for k in ("loss", "accuracy", "seq_len")},
        "per_length": per_length,  # with each prefill call's seconds (chunk_seconds): the projection's data
    }
    result.update(judge(result, per_length))
    extra = command_extras(options)
    if extra:  # the lab's own options: the command that reproduces this run is this module's
        base = options.command("million") if hasattr(options, "command") else "dsv4 lab million"
        result["command"] = base.replace("dsv4 lab million", "python -m dsv4.lab.million") + extra
    return result


def command_extras(options) -> str:
    """The lab's own options given (``--lengths``, ``--questions``, ``--prefill-chunk``) on a command line."""
    out = ""
    for name in ("lengths", "questions", "prefill_chunk"):
        v = getattr(options, name, None)
        if v is not None:
            v = ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v
            out += f" --{name.replace('_', '-')} {v}"
    return out


def judge(result: dict, per_length: dict) -> dict:
    """The verdict: holds if 1M was evaluated with accuracy >= 0.9, prefill + decoding < 30 min, peak < 4 GiB."""
    from dsv4.lab.common import verdict

    held = [k for k, a in result["accuracy"].items() if a >= ACCURACY_BAR]
    where = f"accuracy >= {ACCURACY_BAR} at {', '.join(held) if held else 'no length'}"
    r = per_length.get(str(ONE_M))
    if r is None:
        projected = result["prefill_seconds_1m_extrapolated"]
        extra = (f"; a 1M prefill extrapolated from the {result['longest']}-token run: {projected / 60:.0f} min"
                 if projected is not None else "")
        return verdict(False, f"1,048,576 tokens were not evaluated in this run (lengths "
                              f"{', '.join(result['accuracy'])}); {where}{extra}")
    minutes = (r["prefill_seconds"] + r["decode_seconds"]) / 60
    ok = r["accuracy"] >= ACCURACY_BAR and minutes < MINUTES_BAR and result["peak_rss_gib"] < GIB_BAR
    return verdict(ok, f"at 1M: accuracy {r['accuracy']:.2f} (bar {ACCURACY_BAR}), prefill + decoding "
                       f"{minutes:.1f} min (bar {MINUTES_BAR:.0f}), peak {result['peak_rss_gib']:.2f} GiB (bar "
                       f"{GIB_BAR:.0f}); {where}")


def figures(result: dict) -> list[tuple[str, object]]:
    rows = [(f"accuracy at {k} tokens", v) for k, v in result["accuracy"].items()]
    rows += [(f"prefill seconds at {k}", v) for k, v in result["prefill_seconds_by_length"].items()]
    keys = ("decode_ms_per_token", "peak_rss_gib", "cache_bytes", "cost_model_cache_bytes", "dense_cache_bytes",
            "topk_hit_rate", "prefill_seconds_1m_extrapolated", "chance_accuracy", "train_accuracy", "train_length",
            "train_seconds", "parameters")
    return rows + [(k, result.get(k)) for k in keys]


def plot(result: dict, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv4.lab.common import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    lengths = [int(k) for k in result["accuracy"]]
    a.plot(lengths, list(result["accuracy"].values()), "o-", label="retrieval accuracy")
    hits = [v for v in result["topk_hit_rate_by_length"].values()]
    a.plot(lengths, [math.nan if v is None else v for v in hits], "s--", label="needle entry in the indexer's top-k")
    a.axhline(result["chance_accuracy"], color="gray", lw=0.8, ls=":", label="chance")
    a.set_xscale("log", base=2)
    a.set_ylim(-0.02, 1.02)
    a.set_xlabel("context length (tokens)")
    a.legend(fontsize=8)
    acc = result["training"]["accuracy"]
    b.plot(range(1, len(acc) + 1), acc, lw=0.8)
    b.set_xlabel("training step")
    b.set_ylabel("answer accuracy (training batch)")
    fig.suptitle("million: retrieval through V4 attention")
    return [save_figure(fig, prefix, "accuracy", dpi=110)]


# ------------------------------------------------------------------------------------------------ the command
def main(argv: list[str] | None = None) -> int:
    """``python -m dsv4.lab.million``: the lab with its own options (``dsv4 lab million`` takes the common ones)."""
    from dsv4.lab.common import LabOptions, json_safe, run_lab

    p = argparse.ArgumentParser(prog="python -m dsv4.lab.million", description=TITLE)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default="runs/lab")
    p.add_argument("--save", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lengths", default=None, help="context lengths, e.g. 16K,128K,1M (default: 16K,128K,1M; quick "
                                                   "1K,2K)")
    p.add_argument("--questions", type=int, default=None, help="questions (needles) per length")
    p.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill call")
    p.add_argument("--model-dir", default=None, help="where the trained model is saved and reused from")
    p.add_argument("--retrain", action="store_true", help="train anew even if a saved model matches")
    args = p.parse_args(argv)
    try:
        options = LabOptions(quick=args.quick, out=args.out, save=args.save, json=args.json, seed=args.seed,
                             threads=args.threads)
        for name in ("lengths", "questions", "prefill_chunk", "model_dir", "retrain"):
            setattr(options, name, getattr(args, name))
        settings_of(options)  # bad options fail before any work
        from dsv4.lab import LABS

        if "million" in LABS:
            result = run_lab("million", options)
        else:  # before registration: the bare lab
            options.out.mkdir(parents=True, exist_ok=True)
            result = json_safe(run(options))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else json.dumps({k: v for k, v in result.items()
                                                           if k not in ("training", "per_length")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
