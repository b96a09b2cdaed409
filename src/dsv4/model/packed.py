"""Weights kept as the checkpoint stores them: FP8 E4M3 with 128x128 block scales, packed FP4 E2M1 experts with
1x32 scales, BF16, memory-mapped from the files (``dsv4.weights.files.map_tensors``) and dequantized tile by tile in
each product, so that a released checkpoint runs at its stored size (spec 1.3, 9).

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also I the experts' hidden size and g output groups.

The linear interface every projection of the model offers (``dsv4.model.linear.Linear`` and ``PackedLinear``
alike): ``forward(x)`` [..., in] -> [..., out]; ``grouped(x)`` for a block-diagonal projection, x [..., g, in] ->
[..., g, out / g] (group j uses output rows [j out / g, (j + 1) out / g)); ``compute_dtype``, the dtype of its
activations; ``in_features`` / ``out_features``. The routed experts offer ``Experts.expert_weights_of(e)``.

A stored module's data are buffers (so ``state_dict`` holds the stored bytes, and a fingerprint of them) that keep
their dtype through ``model.to(dtype)`` / ``model.double()``: only the compute dtype follows (a zero-size marker
buffer), and device moves follow. Products run in the compute dtype: the stored values are exactly representable
in float32, so a packed model computes what the model materialized from the same checkpoint computes, up to the
order of the sums (tests hold the two together, in float64 within 1e-9).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import quant
from dsv4.model import fused
from dsv4.model.linear import linear
from dsv4.model.moe import Experts, swiglu
from dsv4.model.numerics import round_activations

FP8_BLOCK = 128  # the FP8 matrices' square scale blocks (spec 1.3)
FP4_BLOCK = 32  # the FP4 experts' 1 x 32 scale tiles along the input dim
TILE_BYTES = 4 << 20  # a dequantized tile of output rows: about this many bytes in the compute dtype
# products of at most this many rows go through the fused kernel (dsv4.model.fused), which reads each stored byte
# once per 8 rows; more rows decode a tile and multiply it with a matmul (compute-bound, where the matmul is faster;
# measured here: the fused product 1.3-2x faster at 64 rows, the tile's at 256 for FP4)
FUSED_MAX_ROWS = 64


class Stored(nn.Module):
    """A module whose buffers named in ``_stored`` are a checkpoint's bytes: ``_apply`` (``to``, ``double``,
    ``to_empty``...) moves them to the device the other tensors go to and never converts them."""

    _stored: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_dtype", torch.empty(0), persistent=False)  # its dtype: the compute dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._dtype.dtype

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers.pop(n) for n in self._stored if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        device = self._dtype.device
        for n, t in kept.items():
            self._buffers[n] = t if t.device == device else t.to(device)
        return self


def dequant_rows(weight: torch.Tensor, scale: torch.Tensor | None, r0: int, r1: int,
                 dtype: torch.dtype, slot: str | None = None) -> torch.Tensor:
    """Rows [r0, r1) of a stored matrix as ``dtype``: FP8 E4M3 [out, in] with [ceil(out/128), ceil(in/128)] scales
    (r0 a multiple of 128), packed FP4 int8 [out, in/2] with [out, in/32] scales, or a plain float matrix. The same
    values as ``quant.fp8_block_dequant`` / ``quant.mxfp4_dequant`` (tests hold them equal), computed the fast way:
    on a CPU by the fused kernel's decoder (``dsv4.model.fused.dequant``) where it is built; otherwise bytes through a
    256-entry table (FP4: of value pairs) into a buffer, then the block scales multiplied in place.

    ``slot``: the result is written into this thread's scratch buffer of that name and is valid until the next call
    with the same slot (no fresh allocation per tile: a new buffer of this size costs more in page faults than the
    dequantization itself); None: a new tensor."""
    w = weight[r0:r1]
    rows = w.shape[0]
    fmt = kernel_format(weight, scale, r0, r1)
    if fmt is not None and (scale is not None or dtype == torch.float32) and w.device.type == "cpu" \
            and not torch.compiler.is_compiling() and fused.available():  # the kernel's decoder
        cols = w.shape[1] * (2 if fmt == "fp4" else 1)
        values = _buffer(f"{slot}.f32" if slot and dtype != torch.float32 else slot, (rows, cols), torch.float32,
                         w.device)
        values = fused.dequant(w, None if scale is None else _scale_rows(scale, fmt, r0, r1),
                               fmt, torch.empty(rows, cols) if values is None else values)
        if dtype == torch.float32:
            return values
        out = _buffer(slot, (rows, cols), dtype, w.device)
        return out.copy_(values) if out is not None else values.to(dtype)
    if scale is None:
        out = _buffer(slot, w.shape, dtype, w.device)
        return out.copy_(w) if out is not None else w.to(dtype)
    fp4 = weight.dtype in (torch.int8, torch.uint8)
    cols = w.shape[1] * (2 if fp4 else 1)
    if not fp4 and (rows % FP8_BLOCK or cols % FP8_BLOCK):  # partial blocks at the edges (small models)
        return quant.fp8_block_dequant(w, scale[r0 // FP8_BLOCK:-(-r1 // FP8_BLOCK)], FP8_BLOCK).to(dtype)
    codes = _buffer(f"{slot}.codes" if slot else None, (w.numel(),), torch.int32, w.device)
    codes = codes.copy_(w.reshape(-1).view(torch.uint8)) if codes is not None else \
        w.reshape(-1).view(torch.uint8).to(torch.int32)
    values = _buffer(f"{slot}.f32" if slot and dtype != torch.float32 else slot, (rows, cols), torch.float32,
                     w.device)
    if values is None:
        values = torch.empty(rows, cols, device=w.device)
    table = _tables(w.device)[1 if fp4 else 0]  # 1-D: a 1-D gather is several times faster than one of rows
    torch.index_select(table, 0, codes, out=values.view(-1).view(table.dtype))
    if fp4:
        values.view(rows, -1, FP4_BLOCK).mul_(quant._scale_to_f32(scale[r0:r1]).unsqueeze(-1))
    else:
        s = quant._scale_to_f32(scale[r0 // FP8_BLOCK:-(-r1 // FP8_BLOCK)])
        values.view(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK).mul_(s[:, None, :, None])
    if dtype == torch.float32:
        return values
    out = _buffer(slot, (rows, cols), dtype, w.device)
    return out.copy_(values) if out is not None else values.to(dtype)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_SCRATCH = threading.local()


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([256] float32: the E4M3 value of each byte, [256] float64 whose 8 bytes are the two float32 E2M1 values of
    each byte, low nibble first, as ``quant.fp4_pack`` packs them: gathered as float64, read as float32 pairs)."""
    if device not in _TABLES:
        codes = torch.arange(256, dtype=torch.uint8)
        fp8 = codes.view(torch.float8_e4m3fn).to(torch.float32)
        fp4 = torch.stack([quant.fp4_decode(codes & 0xF), quant.fp4_decode(codes >> 4)], -1).contiguous()
        _TABLES[device] = (fp8.to(device), fp4.view(torch.float64).view(256).to(device))
    return _TABLES[device]


def _buffer(slot: str | None, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """This thread's scratch buffer ``slot`` on ``device`` viewed as ``shape`` (grown when too small); None for no
    slot, and with autograd on (a product's saved weight must not be overwritten before backward)."""
    if slot is None or torch.is_grad_enabled():
        return None
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    n = math.prod(shape)
    key = (slot, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: written in place under inference mode and outside it
            buf = pool[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def tile_rows(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Output rows per dequantized tile: about ``TILE_BYTES``, a multiple of the FP8 block."""
    rows = TILE_BYTES // max(1, in_features * torch.empty(0, dtype=dtype).element_size())
    return min(out_features, max(FP8_BLOCK, rows // FP8_BLOCK * FP8_BLOCK))


def kernel_format(weight: torch.Tensor, scale: torch.Tensor | None, r0: int = 0, r1: int | None = None
                  ) -> str | None:
    """The fused kernel's name for rows [r0, r1) of a stored matrix ("fp8", "fp4", "bf16"), or None where it has
    none (a float32 or float16 matrix; FP8 rows that cut a 128-row scale block)."""
    if scale is None:
        return "bf16" if weight.dtype == torch.bfloat16 else None
    if weight.dtype in (torch.int8, torch.uint8):
        return "fp4" if weight.shape[1] * 2 % FP4_BLOCK == 0 else None
    r1 = weight.shape[0] if r1 is None else r1
    return None if r0 % FP8_BLOCK or (r1 % FP8_BLOCK and r1 != weight.shape[0]) else "fp8"


def _scale_rows(scale: torch.Tensor, fmt: str, r0: int, r1: int) -> torch.Tensor:
    """The scales of output rows [r0, r1) (FP8: of their 128-row blocks; r0 a multiple of 128)."""
    return scale[r0:r1] if fmt == "fp4" else scale[r0 // FP8_BLOCK:-(-r1 // FP8_BLOCK)]


def fuses(x: torch.Tensor, fmt: str | None) -> bool:
    """Whether ``stored_product`` of x takes the fused kernel: float32 CPU rows, few of them, no autograd, not
    inside a compiled graph, and the kernel built."""
    return (fmt is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() <= FUSED_MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and fused.available())


def stored_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, r0: int, r1: int,
                   dtype: torch.dtype, slot: str | None = None) -> torch.Tensor:
    """x [..., in] @ rows [r0, r1) of a stored matrix, transposed -> [..., r1 - r0], in ``dtype``: the fused kernel
    for a few float32 rows (each stored byte read once), else the rows dequantized (``dequant_rows``, into scratch
    ``slot``) and multiplied. The two differ only in the order of the sums (tests hold them together)."""
    fmt = kernel_format(weight, scale, r0, r1)
    if fuses(x, fmt) and dtype == torch.float32:
        return fused.packed_matmul(x, weight[r0:r1], None if scale is None else _scale_rows(scale, fmt, r0, r1), fmt)
    return linear(x, dequant_rows(weight, scale, r0, r1, dtype, slot))


class PackedLinear(Stored):
    """A bias-free projection whose weight stays as stored: ``fmt`` "fp8" (E4M3 + 128x128 UE8M0 scales), "fp4"
    (E2M1 packed two per byte + 1x32 scales) or "plain" (a float matrix in its stored dtype, e.g. the BF16 LM
    head). ``forward`` dequantizes one tile of output rows at a time (``tile_rows``) and multiplies it at once, so
    at most one tile is ever held in the compute dtype."""

    _stored = ("weight", "scale")
    act_quant_block = 0  # official numerics (dsv4.model.numerics, rule 4), as on ``Linear``

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if scale is None:
            if not weight.is_floating_point() or weight.dtype == torch.float8_e4m3fn:
                raise ValueError(f"a {weight.dtype} weight needs its scale tensor")
            self.fmt = "plain"
            self.out_features, self.in_features = weight.shape
        elif weight.dtype in (torch.int8, torch.uint8):
            self.fmt = "fp4"
            self.out_features, self.in_features = weight.shape[0], 2 * weight.shape[1]
            want = (self.out_features, self.in_features // FP4_BLOCK)
            if tuple(scale.shape) != want:
                raise ValueError(f"packed FP4 weight {tuple(weight.shape)} needs a scale of shape {want}, "
                                 f"got {tuple(scale.shape)}")
        elif weight.dtype == torch.float8_e4m3fn:
            self.fmt = "fp8"
            self.out_features, self.in_features = weight.shape
            want = (-(-self.out_features // FP8_BLOCK), -(-self.in_features // FP8_BLOCK))
            if tuple(scale.shape) != want:
                raise ValueError(f"FP8 weight {tuple(weight.shape)} needs a scale of shape {want}, "
                                 f"got {tuple(scale.shape)}")
        else:
            raise ValueError(f"a scale belongs to an FP8 E4M3 or packed FP4 weight, not to a {weight.dtype} one")
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self._dtype = self._dtype.to(compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}, compute_dtype={self.compute_dtype}"

    def rows(self, r0: int, r1: int, slot: str | None = None) -> torch.Tensor:
        """Output rows [r0, r1) of the weight in the compute dtype (in scratch buffer ``slot``: ``dequant_rows``)."""
        return dequant_rows(self.weight, self.scale, r0, r1, self.compute_dtype, slot)

    def dense_weight(self) -> torch.Tensor:
        """The whole weight [out, in] in the compute dtype (for tests and conversions; products go by tiles)."""
        return self.rows(0, self.out_features)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors as stored, by official name suffix."""
        return {"weight": self.weight} | ({} if self.scale is None else {"scale": self.scale})

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors as plain floats in the compute dtype, by official name suffix."""
        return {"weight": self.dense_weight()}

    def _tiles(self, count: int):
        step = tile_rows(count, self.in_features, self.compute_dtype)
        for r0 in range(0, count, step):
            yield r0, min(count, r0 + step)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        return round_activations(x, self.act_quant_block) if self.act_quant_block else x

    def _product(self, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        return stored_product(x, self.weight, self.scale, r0, r1, self.compute_dtype, "tile")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        tiles = list(self._tiles(self.out_features))
        if len(tiles) == 1 or fuses(x, kernel_format(self.weight, self.scale)):
            return self._product(x, 0, self.out_features)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for r0, r1 in tiles:
            out[..., r0:r1] = self._product(x, r0, r1)
        return out

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., g, in] -> [..., g, out / g]: group j through output rows [j out / g, (j + 1) out / g)."""
        g = x.shape[-2]
        per = self.out_features // g
        x = self._input(x)
        return torch.stack([self._product(x[..., j, :], j * per, (j + 1) * per) for j in range(g)], dim=-2)


class PackedEmbedding(Stored):
    """The token embedding in its stored dtype (BF16 in the releases): a lookup reads only its rows' pages."""

    _stored = ("weight",)

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)
        self._dtype = self._dtype.to(compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.compute_dtype)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.to(self.compute_dtype)}


class StoredExpert(Stored):
    """One routed expert's three matrices as stored (packed FP4, or FP8 in the Base releases), with their scales."""

    _stored = ("w1", "w2", "w3", "w1_scale", "w2_scale", "w3_scale")

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name in self._stored:
            self.register_buffer(name, tensors.get(name))

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, w3) dequantized to ``dtype`` (new tensors)."""
        return tuple(dequant_rows(getattr(self, w), getattr(self, f"{w}_scale"), 0, getattr(self, w).shape[0], dtype)
                     for w in ("w1", "w2", "w3"))


class PackedExperts(Experts):
    """The routed experts as stored, one ``StoredExpert`` each: ``Experts.forward``'s per-expert paths (never the
    stacked batched product), an expert dequantized only when some token is routed to it.

    ``first``: the layer's index of ``experts[0]``, where the module holds a slice of the layer's experts (one rank
    of expert-parallel inference, ``dsv4.parallel.inference``): its forward takes local indices, its stored
    tensors keep the checkpoint's names."""

    stacked = False

    def __init__(self, experts: list[dict[str, torch.Tensor]], limit: float | None,
                 compute_dtype: torch.dtype = torch.float32, first: int = 0) -> None:
        nn.Module.__init__(self)
        self.limit = limit
        self.first = first
        self.fp4_qat = False
        self.register_buffer("_dtype", torch.empty(0, dtype=compute_dtype), persistent=False)
        self.stored = nn.ModuleList(StoredExpert(t) for t in experts)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._dtype.dtype

    @property
    def num_experts(self) -> int:
        return len(self.stored)

    def expert_weights(self):
        raise TypeError("a packed model's experts are not stacked tensors: use expert_weights_of(e)")

    def expert_weights_of(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.stored[e].weights(self.compute_dtype)

    def weights_getter(self):
        """The forward's experts as stored: (weight, scale) pairs for w1, w2, w3, multiplied by ``_expert``."""
        return lambda e: tuple((getattr(self.stored[e], w), getattr(self.stored[e], f"{w}_scale"))
                               for w in ("w1", "w2", "w3"))

    def _expert(self, x, w1, w2, w3, gate) -> torch.Tensor:
        """``Experts._expert`` with stored matrices: each product fused for a few rows (decoding), else its matrix
        dequantized into this thread's scratch buffer and multiplied."""
        dtype = self.compute_dtype

        def product(v, w):
            return stored_product(v, w[0], w[1], 0, w[0].shape[0], dtype, "expert")

        h = swiglu(product(x, w1), product(x, w3), self.limit) * gate
        if self.act_quant_block:
            h = round_activations(h, self.act_quant_block)
        return product(h, w2).to(x.dtype)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for e, ex in enumerate(self.stored, self.first):
            for w in ("w1", "w2", "w3"):
                out[f"{e}.{w}.weight"] = getattr(ex, w)
                if getattr(ex, f"{w}_scale") is not None:
                    out[f"{e}.{w}.scale"] = getattr(ex, f"{w}_scale")
        return out

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for e in range(len(self.stored)):
            for w, t in zip(("w1", "w2", "w3"), self.expert_weights_of(e)):
                out[f"{e + self.first}.{w}.weight"] = t
        return out

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, per_token: bool = False
                ) -> torch.Tensor:
        return super().forward(x.to(self.compute_dtype), weights, indices, per_token)
