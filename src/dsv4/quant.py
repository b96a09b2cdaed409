"""Number formats of DeepSeek-V4's released checkpoints and of its FP4 quantization-aware training.

Spec references (docs/spec.md): §1.3 (which tensors use which dtype), §2.2 item 5 (FP8 simulation
of the KV nope dims), §2.7 (Hadamard + FP4 on the indexer q/k), §6.4 (FP8 / MXFP4 recipe), §9 (checkpoint layout).

Formats
-------
* **FP8 E4M3 weights** (``torch.float8_e4m3fn``, max 448) with one power-of-two (UE8M0) scale per 128x128 block,
  stored as ``<name>.scale`` with shape ``[ceil(out/128), ceil(in/128)]``. The scale is *multiplicative*:
  ``w = fp8_value * scale`` (HF calls it ``weight_scale_inv``, but it is multiplied, not divided).
* **MXFP4** (routed experts, and the indexer QK simulation): E2M1 values {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}, two per
  byte in an int8 tensor ``[out, in/2]`` (low nibble = even element, high nibble = odd element), with one UE8M0 scale
  per 1x32 tile along the input (last) dim, shape ``[out, in/32]``.
* **FP8 activation / KV tiles**: 1 x ``block`` tiles along the last dim (block 64 for the KV nope dims), power-of-two
  scales, E4M3 rounding; only simulated (quantize-dequantize) in this project. ``fp8_act_round`` is the rounding of
  the official inference's ``act_quant`` (amax floored at 1e-4), which ``dsv4.model.numerics`` applies.

Scales are returned as ``torch.float8_e8m0fnu`` when this torch has that dtype (an 8-bit biased exponent, i.e. exactly
a power of two), otherwise as float32 holding powers of two. Every function that takes a scale accepts either.

Rounding choices
----------------
* Power-of-two scales are ``2^ceil(log2(amax / qmax))`` (qmax = 448 for E4M3, 6 for E2M1): rounding the exponent *up*
  guarantees ``|x / scale| <= qmax``, so nothing is clipped. The exponent is computed exactly with ``torch.frexp``
  (no floating-point ``log2``), and the scaled values are additionally clamped to ±qmax to absorb the last-ulp rounding
  of the division ``amax / qmax``.
* amax is floored at ``qmax * 2^-126`` so the smallest scale is 2^-126 (the smallest normal float32); all-zero blocks
  therefore quantize to zero with scale 2^-126 (this floor is the official MXFP4 one, 6·2^-126; we use the same
  shape of floor for FP8).
* E4M3 rounding is torch's float32 -> float8_e4m3fn cast (round to nearest, ties to even).
* E2M1 rounding is round-to-nearest on the E2M1 grid with **ties to the value whose mantissa bit is 0**, i.e. the even
  3-bit magnitude code (e.g. 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). This is IEEE-style
  round-half-to-even, which is what a hardware cvt to e2m1 does.
* The sign of zero is kept: a negative value that rounds to zero becomes code 0x8 (-0.0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "FP8_E4M3_MAX",
    "FP4_E2M1_MAX",
    "E2M1_VALUES",
    "HAS_E8M0",
    "SCALE_DTYPE",
    "power_of_two_scale",
    "fp8_block_quant",
    "fp8_block_dequant",
    "fp8_tile_quant",
    "fp8_tile_dequant",
    "fp4_encode",
    "fp4_decode",
    "fp4_pack",
    "fp4_unpack",
    "mxfp4_quant",
    "mxfp4_dequant",
    "fake_quant_fp4",
    "fake_quant_fp8",
    "FP8_ACT_AMAX_FLOOR",
    "fp8_act_round",
    "bf16_round",
    "hadamard",
]

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0

# Magnitudes addressed by the 3 low bits of an E2M1 code (bit 3 = sign). Code = exponent (2 bits) | mantissa (1 bit),
# exponent bias 1; code 1 (exponent 0, mantissa 1) is the subnormal 0.5.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_SIGN = 0x8

HAS_E8M0 = hasattr(torch, "float8_e8m0fnu")
SCALE_DTYPE = torch.float8_e8m0fnu if HAS_E8M0 else torch.float32

_MIN_SCALE_EXP = -126  # smallest scale 2^-126: smallest normal float32, representable in E8M0


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def power_of_two_scale(amax: Tensor, qmax: float) -> Tensor:
    """Return the float32 power-of-two scale ``2^ceil(log2(amax / qmax))`` (elementwise).

    amax is floored at ``qmax * 2^-126`` so the result is at least 2^-126 (all-zero blocks work). The exponent is taken
    with ``frexp`` so that exact powers of two are not bumped up by a rounding error of ``log2``.
    """
    amax = amax.to(torch.float32).clamp(min=qmax * 2.0**_MIN_SCALE_EXP)
    ratio = amax / qmax
    # ratio = m * 2^e with m in [0.5, 1): ceil(log2(ratio)) = e - 1 when m == 0.5 (exact power of two), else e.
    mant, exp = torch.frexp(ratio)
    exp = torch.where(mant == 0.5, exp - 1, exp).clamp(min=_MIN_SCALE_EXP)
    return torch.ldexp(torch.ones_like(ratio), exp)


def _to_scale_dtype(scale_f32: Tensor) -> Tensor:
    # Exact: scale_f32 holds powers of two in [2^-126, 2^127], all representable in E8M0.
    return scale_f32.to(SCALE_DTYPE)


def _scale_to_f32(scale: Tensor) -> Tensor:
    if not (scale.is_floating_point()):
        raise ValueError(
            f"scale must be a floating tensor (float8_e8m0fnu or float32), got dtype {scale.dtype}"
        )
    return scale.to(torch.float32)


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")


def _check_last_dim_multiple(x: Tensor, block: int, what: str) -> None:
    if x.dim() < 1:
        raise ValueError(f"{what}: expected at least 1 dimension, got a 0-d tensor")
    n = x.shape[-1]
    if n % block != 0:
        raise ValueError(f"{what}: last (input) dim {n} is not a multiple of the block size {block}")


# ----------------------------------------------------------------------------------------------------------------------
# FP8 E4M3 weights with 128x128 power-of-two block scales
# ----------------------------------------------------------------------------------------------------------------------


def _expand_block_scale(scale: Tensor, out: int, inp: int, block: int) -> Tensor:
    # [ceil(out/b), ceil(in/b)] -> [out, in]; the last row/column block may be partial, so crop.
    return scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)[:out, :inp]


def fp8_block_dequant(weight: Tensor, scale: Tensor, block: int = 128) -> Tensor:
    """Dequantize an FP8 E4M3 weight with per-(block x block) multiplicative scales to float32.

    weight: ``torch.float8_e4m3fn`` ``[out, in]``; scale: ``[ceil(out/block), ceil(in/block)]`` in float8_e8m0fnu or
    float32. Returns ``weight * scale`` (scale broadcast over its block, cropped at the edges) as float32.
    """
    _check_block(block)
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_block_dequant: weight must be torch.float8_e4m3fn, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"fp8_block_dequant: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out, inp = weight.shape
    expected = (math.ceil(out / block), math.ceil(inp / block))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"fp8_block_dequant: scale shape mismatch for weight {tuple(weight.shape)} and block {block}: "
            f"expected {expected}, got {tuple(scale.shape)}"
        )
    s = _expand_block_scale(_scale_to_f32(scale), out, inp, block)
    return weight.to(torch.float32) * s


def fp8_block_quant(w: Tensor, block: int = 128) -> tuple[Tensor, Tensor]:
    """Quantize a 2-D weight to FP8 E4M3 with one power-of-two scale per (block x block) tile.

    Returns ``(weight_fp8 [out, in] float8_e4m3fn, scale [ceil(out/block), ceil(in/block)])`` with
    ``scale = 2^ceil(log2(amax / 448))`` (SCALE_DTYPE: float8_e8m0fnu when available, else float32).
    """
    _check_block(block)
    if w.dim() != 2:
        raise ValueError(f"fp8_block_quant: w must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"fp8_block_quant: w must be a floating tensor, got {w.dtype}")
    out, inp = w.shape
    nb_o, nb_i = math.ceil(out / block), math.ceil(inp / block)
    wf = w.to(torch.float32)
    # Zero padding to whole blocks does not change any block's amax.
    padded = torch.nn.functional.pad(wf, (0, nb_i * block - inp, 0, nb_o * block - out))
    amax = padded.abs().view(nb_o, block, nb_i, block).amax(dim=(1, 3))
    scale = power_of_two_scale(amax, FP8_E4M3_MAX)
    s = _expand_block_scale(scale, out, inp, block)
    q = (wf / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, _to_scale_dtype(scale)


# ----------------------------------------------------------------------------------------------------------------------
# FP8 E4M3 1 x block tiles along the last dim (activations / KV)
# ----------------------------------------------------------------------------------------------------------------------


def fp8_tile_quant(x: Tensor, block: int = 64) -> tuple[Tensor, Tensor]:
    """Quantize ``x [..., n]`` to E4M3 with one power-of-two scale per 1 x ``block`` tile along the last dim.

    Returns ``(q [..., n] float8_e4m3fn, scale [..., n/block] SCALE_DTYPE)``. ``n`` must be a multiple of ``block``.
    """
    _check_block(block)
    _check_last_dim_multiple(x, block, "fp8_tile_quant")
    xf = x.to(torch.float32)
    tiles = xf.unflatten(-1, (-1, block))
    scale = power_of_two_scale(tiles.abs().amax(dim=-1), FP8_E4M3_MAX)
    q = (tiles / scale.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), _to_scale_dtype(scale)


def fp8_tile_dequant(q: Tensor, scale: Tensor, block: int = 64) -> Tensor:
    """Inverse of :func:`fp8_tile_quant`: ``q [..., n]`` (float8_e4m3fn) times ``scale [..., n/block]`` -> float32."""
    _check_block(block)
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_tile_dequant: q must be torch.float8_e4m3fn, got {q.dtype}")
    _check_last_dim_multiple(q, block, "fp8_tile_dequant")
    expected = tuple(q.shape[:-1]) + (q.shape[-1] // block,)
    if tuple(scale.shape) != expected:
        raise ValueError(f"fp8_tile_dequant: scale shape mismatch: expected {expected}, got {tuple(scale.shape)}")
    tiles = q.to(torch.float32).unflatten(-1, (-1, block))
    return (tiles * _scale_to_f32(scale).unsqueeze(-1)).flatten(-2)


# ----------------------------------------------------------------------------------------------------------------------
# FP4 E2M1 codes, packing, MXFP4
# ----------------------------------------------------------------------------------------------------------------------

# Rounding boundaries between consecutive E2M1 magnitudes (midpoints). At a tie the value goes to the neighbour with the
# even code (mantissa bit 0): boundary k sits between codes k and k+1; if k is even the tie stays at k (strict ">"),
# if k is odd it moves up to the even code k+1 (">=").
_E2M1_MIDPOINTS = tuple((E2M1_VALUES[k] + E2M1_VALUES[k + 1]) / 2 for k in range(7))  # .25 .75 1.25 1.75 2.5 3.5 5


def fp4_encode(x: Tensor) -> Tensor:
    """Round (unscaled) values to the nearest E2M1 value and return the 4-bit codes as uint8 (0..15).

    Ties go to the even magnitude code (round-half-to-even on the grid); magnitudes above 6 saturate to 6; the sign bit
    (0x8) is taken from ``signbit`` so -0.0 and tiny negatives become code 0x8. NaN inputs are not supported.
    """
    xf = x.to(torch.float32)
    a = xf.abs()
    mag = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for k, mid in enumerate(_E2M1_MIDPOINTS):
        above = (a > mid) if k % 2 == 0 else (a >= mid)
        mag += above.to(torch.uint8)
    return mag | (torch.signbit(xf).to(torch.uint8) << 3)


def fp4_decode(codes: Tensor) -> Tensor:
    """Map 4-bit E2M1 codes (any integer dtype, values 0..15) to float32 values."""
    c = codes.to(torch.int64)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = lut[c & 0x7]
    return torch.where((c & _E2M1_SIGN) != 0, -mag, mag)


def _lut_values_on_grid(x: Tensor) -> bool:
    return bool((fp4_decode(fp4_encode(x)) == x.to(torch.float32)).all())


def fp4_pack(codes_or_values: Tensor) -> Tensor:
    """Pack E2M1 elements two per byte along the last dim: ``[..., n] -> int8 [..., n/2]``.

    Byte j holds element 2j in its low nibble and element 2j+1 in its high nibble. Each nibble is a code:
    sign bit 0x8 | 3-bit index into (0, 0.5, 1, 1.5, 2, 3, 4, 6).

    Input: an integer tensor of codes in 0..15, or a floating tensor whose values are already exactly on the E2M1 grid
    (anything else raises ValueError; use :func:`mxfp4_quant` or :func:`fp4_encode` to round arbitrary values).
    """
    x = codes_or_values
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        n = x.shape[-1] if x.dim() >= 1 else "a 0-d tensor"
        raise ValueError(f"fp4_pack: last (input) dim must be even to pack two FP4 values per byte, got {n}")
    if x.is_floating_point():
        if not _lut_values_on_grid(x):
            raise ValueError(
                "fp4_pack: floating input must already lie on the E2M1 grid {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}; "
                "quantize with mxfp4_quant / fp4_encode first"
            )
        codes = fp4_encode(x)
    elif x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"fp4_pack: expected integer codes or float values, got {x.dtype}")
    else:
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 15):
            raise ValueError(
                f"fp4_pack: integer codes must be in 0..15, got range [{int(x.min())}, {int(x.max())}]"
            )
        codes = x.to(torch.uint8)
    pairs = codes.unflatten(-1, (-1, 2))
    packed = pairs[..., 0] | (pairs[..., 1] << 4)  # low nibble = even element, high nibble = odd element
    return packed.view(torch.int8)


def _fp4_unpack_codes(packed: Tensor) -> Tensor:
    if packed.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"fp4_unpack: packed must be int8 (or uint8), got {packed.dtype}")
    if packed.dim() < 1:
        raise ValueError("fp4_unpack: packed must have at least 1 dimension")
    b = packed.view(torch.uint8)  # reinterpret the bits, do not convert values
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def fp4_unpack(packed: Tensor) -> Tensor:
    """Unpack ``int8 [..., m]`` (two E2M1 codes per byte, low nibble first) to float32 values ``[..., 2m]``."""
    return fp4_decode(_fp4_unpack_codes(packed))


def _mxfp4_codes(w: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Core MXFP4 quantizer: returns (codes uint8 [..., n], float32 scale [..., n/block], each block's largest
    |value| [..., n/block]: NaN or inf where the block holds one)."""
    _check_block(block)
    if not w.is_floating_point():
        raise ValueError(f"mxfp4_quant: w must be a floating tensor, got {w.dtype}")
    _check_last_dim_multiple(w, block, "mxfp4_quant")
    if block % 2 != 0:
        raise ValueError(f"mxfp4_quant: block must be even so tiles pack into whole bytes, got {block}")
    tiles = w.to(torch.float32).unflatten(-1, (-1, block))
    amax = tiles.abs().amax(dim=-1)
    scale = power_of_two_scale(amax, FP4_E2M1_MAX)
    codes = fp4_encode(tiles / scale.unsqueeze(-1))  # |tiles/scale| <= 6 by construction (saturation absorbs ulps)
    return codes.flatten(-2), scale, amax


def mxfp4_quant(w: Tensor, block: int = 32) -> tuple[Tensor, Tensor]:
    """Quantize ``w [..., in]`` to MXFP4.

    Returns ``(packed int8 [..., in/2], scale [..., in/block])``: one power-of-two scale
    ``2^ceil(log2(amax/6))`` per 1 x ``block`` tile along the last (input) dim, amax floored at 6·2^-126; each
    ``w / scale`` rounded to the nearest E2M1 value with ties to the even code. Scale dtype: SCALE_DTYPE.
    A NaN or infinite value is an error: FP4 has no code for it, and rounding it would hide a diverged weight.
    """
    codes, scale, amax = _mxfp4_codes(w, block)
    if not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"mxfp4_quant: w holds {bad} non-finite value(s) (NaN or inf), which FP4 cannot represent")
    return fp4_pack(codes), _to_scale_dtype(scale)


def mxfp4_dequant(packed: Tensor, scale: Tensor, block: int = 32) -> Tensor:
    """Dequantize MXFP4: ``packed int8 [..., in/2]`` and ``scale [..., in/block]`` -> float32 ``[..., in]``."""
    _check_block(block)
    values = fp4_unpack(packed)
    n = values.shape[-1]
    if n % block != 0:
        raise ValueError(f"mxfp4_dequant: unpacked input dim {n} is not a multiple of the block size {block}")
    expected = tuple(values.shape[:-1]) + (n // block,)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"mxfp4_dequant: scale shape mismatch for packed {tuple(packed.shape)} and block {block}: "
            f"expected {expected}, got {tuple(scale.shape)}"
        )
    tiles = values.unflatten(-1, (-1, block)) * _scale_to_f32(scale).unsqueeze(-1)
    return tiles.flatten(-2)


# ----------------------------------------------------------------------------------------------------------------------
# Fake quantization (quantize -> dequantize) with straight-through gradients, for QAT / precision simulation
# ----------------------------------------------------------------------------------------------------------------------


class _FakeQuantFP4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, block: int) -> Tensor:
        codes, scale, amax = _mxfp4_codes(w, block)
        # decode(code) * 2^k is exact in float32 and in bf16/fp16 ranges of interest; the final cast is to w's dtype.
        deq = fp4_decode(codes).unflatten(-1, (-1, block)) * scale.unsqueeze(-1)
        # a block holding NaN or inf comes out NaN (rounding would turn inf into 6 and hide a diverged weight)
        return deq.where(torch.isfinite(amax).unsqueeze(-1), float("nan")).flatten(-2).to(w.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, None  # straight-through estimator


class _FakeQuantFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, block: int) -> Tensor:
        q, scale = fp8_tile_quant(x, block)
        return fp8_tile_dequant(q, scale, block).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, None  # straight-through estimator


def fake_quant_fp4(w: Tensor, block: int = 32) -> Tensor:
    """MXFP4 quantize-dequantize of ``w [..., in]`` (1 x block tiles along the last dim), returned in ``w.dtype``.

    Forward equals ``mxfp4_dequant(*mxfp4_quant(w, block), block)``, except that a block holding NaN or inf comes out
    NaN (``mxfp4_quant`` refuses it); backward is straight-through (the incoming gradient is passed to ``w``
    unchanged).
    """
    return _FakeQuantFP4.apply(w, block)


def fake_quant_fp8(x: Tensor, block: int = 64) -> Tensor:
    """E4M3 quantize-dequantize of ``x [..., n]`` with 1 x block power-of-two-scaled tiles, returned in ``x.dtype``.

    Used to simulate the official KV precision on the 448 non-RoPE dims (block 64, spec §2.2 item 5). Straight-through
    gradient.
    """
    return _FakeQuantFP8.apply(x, block)


# ----------------------------------------------------------------------------------------------------------------------
# Rounding of the official inference (dsv4.model.numerics): activations and KV to FP8 tiles, BF16
# ----------------------------------------------------------------------------------------------------------------------

# The official act_quant kernel floors each tile's amax at 1e-4 before taking the scale (not stated in spec 6.4; the
# official kernel.py, as third-party ports of it agree): a tile below it keeps the scale 2^-22 instead of shrinking.
FP8_ACT_AMAX_FLOOR = 1e-4


def _fp8_act_round(x: Tensor, block: int, amax_floor: float) -> Tensor:
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        from dsv4.model import fused

        if fused.available():  # the same arithmetic in one pass (tests hold the two equal bit for bit)
            return fused.act_round(x.to(torch.float32), block, amax_floor).to(x.dtype)
    return _fp8_act_round_ops(x, block, amax_floor)


def _fp8_act_round_ops(x: Tensor, block: int, amax_floor: float) -> Tensor:
    """``fp8_act_round`` by tensor operators: the reference, and the form compiled graphs take."""
    n = x.shape[-1]
    full = n - n % block
    xf = x.to(torch.float32)

    def tiles(t: Tensor) -> Tensor:  # [..., tiles, size]
        scale = power_of_two_scale(t.abs().amax(dim=-1, keepdim=True).clamp(min=amax_floor), FP8_E4M3_MAX)
        return _round_e4m3((t / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)) * scale  # exact products

    # whole tiles, then a shorter last one if need be (a zero padding instead miscompiled under torch.compile)
    parts = [tiles(xf[..., :full].unflatten(-1, (-1, block))).flatten(-2)] if full else []
    if full < n:
        parts.append(tiles(xf[..., full:]))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)


# The roundings below are arithmetic (a power-of-two step from frexp, round half to even), not casts to float8 /
# bfloat16 and back: inside a compiled graph inductor drops such a round trip of casts (unless
# ``emulate_precision_casts``), which would silently skip the rounding of a compiled decoding step; its bit casts
# (``Tensor.view(dtype)``) were not reliable there either.


def _round_significand(y: Tensor, bits: int, min_exp: int) -> Tensor:
    """float32 ``y`` rounded to ``bits`` significant bits, ties to even, with the step floored at ``2^min_exp`` (the
    subnormals of the narrower format). Exact: the step is a power of two."""
    _, e = torch.frexp(y)  # |y| in [2^(e-1), 2^e)
    step = torch.ldexp(torch.ones_like(y), (e - bits).clamp(min=min_exp))
    return torch.round(y / step) * step


def _round_e4m3(y: Tensor) -> Tensor:
    """float32 ``y`` (|y| <= 448) to the nearest E4M3 value, ties to even, as the cast to float8_e4m3fn rounds:
    4 significant bits, subnormal step 2^-9."""
    return _round_significand(y, 4, -9)


class _FP8ActRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, block: int, amax_floor: float) -> Tensor:
        return _fp8_act_round(x, block, amax_floor)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, None, None  # straight-through estimator


def fp8_act_round(x: Tensor, block: int = 128, amax_floor: float = FP8_ACT_AMAX_FLOOR) -> Tensor:
    """E4M3 quantize-dequantize of ``x [..., n]`` in 1 x ``block`` tiles along the last dim, as the official inference
    rounds activations before an FP8 / FP4 matmul (block 128) and the KV's non-RoPE dims (block 64): per tile the
    power-of-two (UE8M0) scale ``2^ceil(log2(max(amax, amax_floor) / 448))``, each value divided by it, rounded to
    the nearest E4M3 value (ties to even) and multiplied back. Returned in ``x.dtype`` (the rounding itself is done in
    float32); straight-through gradient.

    When ``n`` is not a multiple of ``block`` (small models; the released configs always divide) the last tile is
    shorter: the first ``n // block`` tiles are those of the official layout and the rest forms one tile of its own.
    """
    _check_block(block)
    if x.dim() < 1:
        raise ValueError("fp8_act_round: expected at least 1 dimension, got a 0-d tensor")
    if x.shape[-1] == 0:
        return x
    return _FP8ActRound.apply(x, block, float(amax_floor))


def bf16_round(x: Tensor) -> Tensor:
    """``x`` rounded to bfloat16 (nearest, ties to even) and returned in its own dtype; identity for bfloat16. The
    gradient passes through (a cast)."""
    if x.dtype == torch.bfloat16:
        return x
    return _round_significand(x.to(torch.float32), 8, -133).to(x.dtype)  # 8 significant bits, step >= 2^-133


# ----------------------------------------------------------------------------------------------------------------------
# Walsh-Hadamard transform
# ----------------------------------------------------------------------------------------------------------------------


def hadamard(x: Tensor) -> Tensor:
    """Normalized Walsh-Hadamard transform over the last dim: ``x @ H_n / sqrt(n)``, H_n the Sylvester matrix
    (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``).

    Uses the O(n log n) butterfly; computed in (at least) float32 and returned in ``x.dtype``. The transform is
    symmetric and orthogonal, so ``hadamard(hadamard(x)) == x`` (up to rounding). ``n`` must be a power of two.
    """
    if x.dim() < 1:
        raise ValueError("hadamard: expected at least 1 dimension, got a 0-d tensor")
    n = x.shape[-1]
    if n < 1 or (n & (n - 1)) != 0:
        raise ValueError(f"hadamard: last dim must be a power of two, got size {n}")
    # Accumulate in at least float32 (bf16/fp16 inputs would otherwise round at each of the log2(n) stages).
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    h = 1
    while h < n:
        # Element index = i*2h + s*h + j; combine the pair (s=0, s=1) at distance h: (a + b, a - b).
        t = y.unflatten(-1, (n // (2 * h), 2, h))
        a, b = t[..., 0, :], t[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * (n ** -0.5)).to(x.dtype)
