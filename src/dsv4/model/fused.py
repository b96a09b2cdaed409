"""The fused dequantize-and-multiply kernel for decoding rows against stored weights (``csrc/packed_matmul.cpp``):
built once per machine with ``torch.utils.cpp_extension`` (the project's install runs ``python -m
dsv4.model.fused``; the first use builds it otherwise), cached by PyTorch between runs, compiled for this CPU
(``-march=native``: AVX2 + FMA where present, portable C++ otherwise).

``packed_matmul(x, weight, scale, fmt)``: x [..., K] float32 @ W^T -> [..., N], W as ``dsv4.model.packed``
stores it ("bf16", "fp8" or "fp4"). It reads each weight byte once and writes no dequantized copy, which is what a
decoding step needs to run at the memory's speed; for many rows the tile-by-tile dequantization and a matmul are
faster (compute-bound), and ``dsv4.model.packed`` chooses between the two (``FUSED_MAX_ROWS``).

``act_round(x, block, amax_floor)``: the official numerics' FP8 rounding of activations
(``dsv4.quant.fp8_act_round``) in one pass; eager calls on the CPU take it, compiled graphs the operators.

``sparse_attend(q, entries, rows, mask)``: CSA's attention of each query over its own top-k entries in one pass
(the gather, the logits, the exponentials and the weighted sum tile by tile): ``kernels.attend`` of the gathered
entries without gathering them, for prefill without autograd (``dsv4.model.prefill``).

``hc_expand`` and ``hc_sinkhorn``: mHC's per-token mixing and Sinkhorn projection in one pass a token, for
prefill without autograd (``dsv4.model.hyper``); ``topk_lower``: the indexer's top-k with the lower-index tie rule
in one selection a row and ``index_scores``: the indexer's scores without the [queries, heads, entries] dots
(``dsv4.model.indexer``); ``serves(...)`` says when these inference kernels take the work.

``attend_picks(q, window, entries, rows, mask, sink)``: a decoding step's attention over its picks of each row's
window and entries (the decode state's buffers, read in place) and the sink, finished, each key read once and a
query's picks split over the threads (``decode.attend_rows``, eager and compiled).

``expert_matvec(x, w, idx)``: each token's product with its own expert's matrix of stacked weights [E, N, K], read
in place: the compiled decoding step's routed experts (a dispatcher operator, ``torch.ops.dsv4``, so that compiled
graphs call it).

Where no compiler works, or ``DSV4_FUSED=0`` is set, ``available()`` is False (one warning says why) and the
packed modules keep the dequantize-then-multiply path, which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("packed_matmul.cpp", "sparse_attention.cpp",
                                                              "expert_matvec.cpp", "hyper_connections.cpp",
                                                              "topk.cpp", "index_scores.cpp", "bindings.cpp")]
FORMATS = {"bf16": 0, "fp8": 1, "fp4": 2}
_LOCK = threading.Lock()
_STATE: dict = {}


def _build(verbose: bool = False):
    from torch.utils import cpp_extension

    try:  # the ninja the install put in the environment, also where its bin/ is not on PATH (.venv/bin/python)
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    flags = ["-O3", "-fopenmp"] + (["-march=native"] if _is_x86() else [])
    name = f"dsv4_packed_matmul_{_cpu_tag()}_{_source_tag()}"
    _remove_stale_lock(cpp_extension, name)
    # torch's own libgomp has the soname libgomp.so.1: the kernel joins PyTorch's OpenMP pool, not a second one
    return cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], verbose=verbose)


STALE_LOCK_SECONDS = 1200  # a build takes about a minute; a lock this old was left by a build that was killed


def _remove_stale_lock(cpp_extension, name: str) -> None:
    """PyTorch's build takes a lock file in the extension's directory and every later build waits for it to go: a
    build killed midway (an interrupted install) would leave every later process of this machine waiting forever.
    A lock older than ``STALE_LOCK_SECONDS`` is removed, with a warning."""
    try:
        lock = Path(cpp_extension._get_build_directory(name, False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (AttributeError, OSError):  # no lock (the usual case), or a PyTorch without this helper
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("removing the fused kernel's build lock %s, left %.0f minutes ago by a build that did not finish",
                    lock, age / 60)
        lock.unlink(missing_ok=True)


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags: a build for ``-march=native`` is cached per kind of CPU,
    so a home directory shared by machines of several kinds never loads another CPU's binary."""
    import hashlib
    import platform

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    return hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:10]


def _source_tag() -> str:
    """A short hash of the sources' directory: PyTorch's build directory is named by the extension alone and its
    build file names the sources by their absolute paths, so two checkouts of dsv4 on one machine (a clone beside a
    working copy, a CI clone) sharing one name would each rebuild over the other's build in turn (minutes each)."""
    import hashlib

    return hashlib.sha1(str(SOURCES[0].parent.resolve()).encode()).hexdigest()[:8]


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def kernel(verbose: bool = False):
    """The built extension module, or None (disabled, or the build failed: one warning)."""
    if "module" in _STATE:
        return _STATE["module"]
    with _LOCK:
        if "module" not in _STATE:
            module, why = None, None
            if os.environ.get("DSV4_FUSED", "1") == "0":
                why = "DSV4_FUSED=0"
            else:
                t0 = time.perf_counter()
                try:
                    module = _build(verbose)
                except Exception as e:  # no compiler, no ninja, a failed build: the dequantize-then-matmul path
                    why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                    log.warning("the fused packed-weight kernel is not available (%s); packed products "
                                "dequantize tile by tile", why)
                _STATE["seconds"] = time.perf_counter() - t0
            if module is not None:
                _register_fakes()
            _STATE["why"] = why
            _STATE["module"] = module
    return _STATE["module"]


def available() -> bool:
    return kernel() is not None


def _module():
    """The built module, or a RuntimeError saying why there is none."""
    module = kernel()
    if module is None:
        raise RuntimeError(f"the fused kernel is not available ({_STATE.get('why')})")
    return module


@torch.compiler.assume_constant_result
def built() -> bool:
    """``available()`` as a compiled graph sees it: a constant, decided when the graph is traced."""
    return available()


def packed_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """x [..., K] (float32) @ W^T -> [..., N] for a stored weight: "bf16" [N, K] bfloat16; "fp8" [N, K] E4M3 with
    [ceil(N/128), ceil(K/128)] E8M0 or float32 scales; "fp4" [N, K/2] packed bytes with [N, K/32] scales."""
    module = _module()
    if x.dtype != torch.float32:
        raise TypeError(f"packed_matmul computes in float32, got x of {x.dtype}")
    w = weight.view(torch.int16) if fmt == "bf16" else weight.view(torch.uint8)
    s = None
    if scale is not None:
        s = scale if scale.dtype == torch.float32 else scale.view(torch.uint8)
    lead = x.shape[:-1]
    out = module.packed_matmul(x.reshape(-1, x.shape[-1]), w, s, FORMATS[fmt])
    return out.view(*lead, out.shape[-1])


def dequant(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str, out: torch.Tensor) -> torch.Tensor:
    """A stored weight's rows decoded into ``out`` (float32 [N, K], contiguous), scales applied: the same values as
    ``quant.fp8_block_dequant`` / ``quant.mxfp4_dequant`` / ``.float()``."""
    module = _module()
    w = weight.view(torch.int16) if fmt == "bf16" else weight.view(torch.uint8)
    s = None if scale is None else scale if scale.dtype == torch.float32 else scale.view(torch.uint8)
    module.dequant(w, s, FORMATS[fmt], out)
    return out


def act_round(x: torch.Tensor, block: int, amax_floor: float) -> torch.Tensor:
    """``dsv4.quant.fp8_act_round``'s rounding of float32 ``x [..., n]`` (E4M3 in 1 x ``block`` power-of-two-scaled
    tiles) in one pass instead of a dozen elementwise operators: the same arithmetic, bit for bit."""
    module = _module()
    if x.dtype != torch.float32:
        raise TypeError(f"act_round rounds float32, got x of {x.dtype}")
    return module.act_round(x.reshape(-1, x.shape[-1]), block, float(amax_floor)).view(x.shape)


def sparse_attend(q: torch.Tensor, entries: torch.Tensor, rows: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kernels.attend(q, kernels.gather_rows(entries, rows), mask)``'s (out, m, s) without the gathered copy:
    q [..., H, c] float32 (scaled), entries [R, c] (every row's entries flattened), rows [...] x k int64 rows of
    entries, mask bool like rows or None. No autograd."""
    module = _module()
    lead, (h, c), k = q.shape[:-2], q.shape[-2:], rows.shape[-1]
    if rows.shape[:-1] != lead:
        raise ValueError(f"sparse_attend: rows {tuple(rows.shape)} do not match the queries {tuple(q.shape)}")
    out, m, s = module.sparse_attend(q.reshape(-1, h, c), entries.float(), rows.reshape(-1, k),
                                     None if mask is None else mask.expand(rows.shape).reshape(-1, k))
    return out.view(q.shape), m.view(*lead, h), s.view(*lead, h)


def attend_picks(q: torch.Tensor, window: torch.Tensor, entries: torch.Tensor, rows: torch.Tensor,
                 mask: torch.Tensor | None, sink: torch.Tensor) -> torch.Tensor:
    """A decoding step's attention, finished: each row's query q [R, H, c] float32 (scaled) against its picks
    ``rows`` [R, k] (int64; j < W: the row's window key ``window[r, j]``, else its entry ``entries[r, j - W]``, both
    [R, n, c] float32 read in place; ``mask`` [R, k] bool or None: which picks it sees) and the attention sink
    ``sink`` [H] (a logit with no value) -> [R, H, c], the softmax over the visible picks and the sink applied to the
    picks. The operator ``torch.ops.dsv4.attend_picks`` (``decode.attend_rows``, eager and compiled): each key read
    once, a query's picks split over the threads and merged. No autograd."""
    _module()
    return torch.ops.dsv4.attend_picks(q, window, entries, rows, mask, sink)


def expert_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Token m's product with its own expert's matrix: x [M, K] float32, w [E, N, K] float32 stacked, idx [M] int64
    -> [M, N] = x[m] @ w[idx[m]]^T, each picked weight row read once in place (``w[idx]`` and ``bmm``, the
    reference, write and read a copy of the picked matrices). The operator ``torch.ops.dsv4.expert_matvec``, which
    a compiled graph calls through the dispatcher (the routed experts of ``dsv4.model.decode``'s compiled step); no
    autograd."""
    _module()
    return torch.ops.dsv4.expert_matvec(x, w, idx)


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the inference kernels (``sparse_attend``, ``hc_expand``, ``hc_sinkhorn``, ``topk_lower``,
    ``index_scores``) take these tensors' work: float32 on the CPU, no autograd, outside a compiled graph (which
    fuses the operators itself), the kernel built. The operators they replace stay the reference and the training
    path."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available())


def inference_serves(*tensors: torch.Tensor) -> bool:
    """Whether a kernel that is also a dispatcher operator (``hc_sinkhorn``, ``index_scores_rows``,
    ``attend_picks``) takes these tensors' work: without autograd, eager where ``serves``, inside a compiled graph
    where ``operators_serve``."""
    if torch.is_grad_enabled():
        return False
    return operators_serve(*tensors) if torch.compiler.is_compiling() else serves(*tensors)


def operators_serve(*tensors: torch.Tensor) -> bool:
    """Whether a compiled graph calls the kernel's dispatcher operators (``expert_matvec``, ``topk_lower``,
    ``hc_sinkhorn``, ``index_scores_rows``, ``attend_picks``) on these tensors: float32 on the CPU, the kernel
    built (decided when the graph is traced)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and built()


def hc_expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``HyperConnection.expand`` in one pass a token: streams [..., n, d], out [..., d], post [..., n], comb
    [..., n, n] (float32) -> post_k out + sum_j comb[j, k] streams_j [..., n, d]. No autograd."""
    module = _module()
    n, d = streams.shape[-2:]
    mixed = module.hc_expand(streams.reshape(-1, n, d), out.reshape(-1, d), post.reshape(-1, n),
                             comb.reshape(-1, n, n))
    return mixed.view(streams.shape)


def hc_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``hyper.sinkhorn`` of float32 logits [..., n, n] in one pass a matrix. The operator
    ``torch.ops.dsv4.hc_sinkhorn``: a compiled decoding step calls it too, where inductor's own code runs the
    iterations as one single-threaded region apiece, each ending in a barrier; no autograd."""
    _module()
    n = logits.shape[-1]
    return torch.ops.dsv4.hc_sinkhorn(logits.reshape(-1, n, n), iters, float(eps)).view(logits.shape)


def topk_lower(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``indexer.topk_lower_index`` of float32 scores [..., T] in one selection a row: the indices [..., k] of the k
    largest, ties toward the lower index, in index order. The operator ``torch.ops.dsv4.topk_lower`` (compiled
    decoding steps call it too); no autograd."""
    _module()
    t = scores.shape[-1]
    return torch.ops.dsv4.topk_lower(scores.reshape(-1, t), k).view(*scores.shape[:-1], k)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``indexer.chunk_scores``' values (the sums in another order): q [B, Q, H, c], w [B, Q, H], keys transposed
    keys_t [B, c, T] (a prefix of the entries: contiguous along them) -> [B, Q, T] float32, written into ``out``
    (a [B, Q, T] view contiguous along T) when given. Each 16-entry panel of keys meets four heads at a time in
    registers, the ReLU and the head weights applied there: no [Q H, T] dots are written. No autograd."""
    module = _module()
    b, nq, h, c = q.shape
    t = keys_t.shape[-1]
    if w.shape != (b, nq, h) or keys_t.shape[:2] != (b, c):
        raise ValueError(f"index_scores: q {tuple(q.shape)}, w {tuple(w.shape)} and keys_t {tuple(keys_t.shape)} "
                         "do not match ([B, Q, H, c], [B, Q, H], [B, c, T])")
    if out is None:
        out = q.new_empty(b, nq, t)
    for i in range(b):
        module.index_scores(q[i], w[i], keys_t[i], out[i])
    return out


def index_scores_rows(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``indexer.chunk_scores``' values for a decoding step's few queries a row: q [B, Q, H, c], w [B, Q, H] against
    the keys as a cache stores them, keys [B, T, c] (contiguous along c) -> [B, Q, T] float32, read in place (the
    keys' transposed view is what the matmul libraries handle worst). The operator
    ``torch.ops.dsv4.index_scores_rows`` (compiled decoding steps call it too); no autograd."""
    _module()
    return torch.ops.dsv4.index_scores_rows(q, w, keys)


def _register_fakes() -> None:
    """The shapes of the dispatcher's operators for tracing (once, after the kernel's library is loaded)."""
    @torch.library.register_fake("dsv4::expert_matvec")
    def _(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.register_fake("dsv4::topk_lower")
    def _(scores: torch.Tensor, k: int) -> torch.Tensor:
        return scores.new_empty(scores.shape[0], k, dtype=torch.long)

    @torch.library.register_fake("dsv4::index_scores_rows")
    def _(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[1], keys.shape[1])

    @torch.library.register_fake("dsv4::attend_picks")
    def _(q: torch.Tensor, window: torch.Tensor, entries: torch.Tensor, rows: torch.Tensor,
          mask: torch.Tensor | None, sink: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(q)

    @torch.library.register_fake("dsv4::hc_sinkhorn")
    def _(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        return torch.empty_like(logits)


def main(argv: list[str] | None = None) -> int:
    """Build the kernel now (``make install`` runs this) and print what was built, as JSON."""
    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    module = kernel(verbose=verbose)
    print(json.dumps({"built": module is not None, "vectorized": bool(module and module.vectorized()),
                      "seconds": round(_STATE.get("seconds", 0.0), 1), "why_not": _STATE.get("why")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
