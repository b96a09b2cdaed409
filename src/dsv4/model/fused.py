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

SOURCE = Path(__file__).parent / "csrc" / "packed_matmul.cpp"
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
    name = f"dsv4_packed_matmul_{_cpu_tag()}"
    _remove_stale_lock(cpp_extension, name)
    # torch's own libgomp has the soname libgomp.so.1: the kernel joins PyTorch's OpenMP pool, not a second one
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                              verbose=verbose)


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
            _STATE["why"] = why
            _STATE["module"] = module
    return _STATE["module"]


def available() -> bool:
    return kernel() is not None


def packed_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """x [..., K] (float32) @ W^T -> [..., N] for a stored weight: "bf16" [N, K] bfloat16; "fp8" [N, K] E4M3 with
    [ceil(N/128), ceil(K/128)] E8M0 or float32 scales; "fp4" [N, K/2] packed bytes with [N, K/32] scales."""
    module = kernel()
    if module is None:
        raise RuntimeError(f"the fused kernel is not available ({_STATE.get('why')})")
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
    module = kernel()
    if module is None:
        raise RuntimeError(f"the fused kernel is not available ({_STATE.get('why')})")
    w = weight.view(torch.int16) if fmt == "bf16" else weight.view(torch.uint8)
    s = None if scale is None else scale if scale.dtype == torch.float32 else scale.view(torch.uint8)
    module.dequant(w, s, FORMATS[fmt], out)
    return out


def act_round(x: torch.Tensor, block: int, amax_floor: float) -> torch.Tensor:
    """``dsv4.quant.fp8_act_round``'s rounding of float32 ``x [..., n]`` (E4M3 in 1 x ``block`` power-of-two-scaled
    tiles) in one pass instead of a dozen elementwise operators: the same arithmetic, bit for bit."""
    module = kernel()
    if module is None:
        raise RuntimeError(f"the fused kernel is not available ({_STATE.get('why')})")
    if x.dtype != torch.float32:
        raise TypeError(f"act_round rounds float32, got x of {x.dtype}")
    return module.act_round(x.reshape(-1, x.shape[-1]), block, float(amax_floor)).view(x.shape)


def main(argv: list[str] | None = None) -> int:
    """Build the kernel now (``make install`` runs this) and print what was built, as JSON."""
    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    module = kernel(verbose=verbose)
    print(json.dumps({"built": module is not None, "vectorized": bool(module and module.vectorized()),
                      "seconds": round(_STATE.get("seconds", 0.0), 1), "why_not": _STATE.get("why")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
