"""``linear``: ``F.linear`` with faster forms for a few rows on the CPU; ``Linear``, the ``nn.Linear`` using it.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts.

Without autograd, on the CPU:
- one row (a decoding step) on more than one thread: the weight's output rows split into one part per thread, one
  ``bmm`` of the parts.
  ``F.linear`` of one row runs on one core, which alone does not draw the machine's full memory bandwidth to read
  the weight; the parts run on every thread.
- 2 to 64 rows (a decoding step of a few rows, a speculative draft's check, an expert's few tokens): weight x^T,
  which this CPU's BLAS runs faster than x weight^T. Inside a compiled graph, up to ``FUSE_ROWS`` rows against a
  weight that fits the cache (``FUSE_MAX``): a product and a sum, which inductor fuses with the ops around it; a
  library call's set-up costs more than such a product. A two-token speculative check of the demo model: 0.73 ms
  against 0.90 with ``FUSE_ROWS = 0`` (both compiled in one process, timed alternately); the small preset's
  (whose head keeps the library call; the form for every weight made it slower): unchanged within the noise.
The result is the same product up to rounding; tests hold it to ``F.linear``. With autograd (training) it is
``F.linear``. Measurements: docs/performance-notes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.numerics import round_activations

FEW_ROWS = (1, 64)  # rows for which a faster form is taken (tests set an empty range to pin F.linear)
# inside a compiled graph, a product of 2 to FUSE_ROWS rows with a weight of at most FUSE_MAX elements (2 MiB in
# float32: it stays in the cache while each row reads it) is written as a product and a sum that inductor fuses with
# its neighbours, instead of a library call (a speculative check's two tokens, a decoding step of a few rows)
FUSE_ROWS, FUSE_MAX = 4, 1 << 19
PARTS_MIN = 1 << 16  # weight elements from which one row is split across threads (below, waking them costs more)


@torch.compiler.assume_constant_result
def threads() -> int:
    """torch's intra-op threads (``torch.get_num_threads``); inside a compiled step, a constant of its graph (which
    is compiled for the threads it runs on) instead of a graph break."""
    return torch.get_num_threads()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in] -> [..., out]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or not FEW_ROWS[0] <= rows <= FEW_ROWS[1] or torch.is_grad_enabled():
        return F.linear(x, weight, bias)  # training keeps F.linear's numerics (its rows are many anyway)
    if 2 <= rows <= FUSE_ROWS and weight.numel() <= FUSE_MAX and torch.compiler.is_compiling():
        y = (x.reshape(rows, 1, x.shape[-1]) * weight).sum(-1)
    elif rows == 1:
        parts = threads() if weight.numel() >= PARTS_MIN else 1  # below PARTS_MIN waking the threads costs more
        if parts == 1:  # one thread: F.linear itself, without the reshapes
            return F.linear(x, weight, bias)
        y = row_parts(x.reshape(1, x.shape[-1]), weight, parts)
    else:  # contiguous like F.linear's result: a transposed one sends later kernels (SDPA's flash path) to slow paths
        y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def row_parts(x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """x [1, in] weight^T as ``parts`` slices of the weight's output rows in one ``bmm`` (its batch runs in
    parallel); with fewer rows than that, or rows not divisible into parts of equal size, the largest divisor that
    fits."""
    out = weight.shape[0]
    parts = max(1, min(parts, out))
    while out % parts:
        parts -= 1
    if parts == 1 or not weight.is_contiguous():
        return torch.mm(x, weight.t())
    w = weight.view(parts, out // parts, weight.shape[1])
    return torch.bmm(w, x.t().unsqueeze(0).expand(parts, -1, -1)).view(1, out)


def activation_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a projection or embedding computes in: its ``compute_dtype`` (a packed module's, whose stored
    weight is FP8, FP4 or BF16: ``dsv4.model.packed``), else its weight's dtype."""
    dtype = getattr(module, "compute_dtype", None)
    return dtype if dtype is not None else module.weight.dtype


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by ``linear``; the linear interface of
    ``dsv4.model.packed`` (``grouped``, ``compute_dtype``)."""

    # official numerics (dsv4.model.numerics, rule 4): the input rounded to FP8 in 1 x act_quant_block tiles; 0: off
    act_quant_block = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant_block:
            x = round_activations(x, self.act_quant_block)
        return linear(x, self.weight, self.bias)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., g, in] -> [..., g, out / g]: a block-diagonal projection, group j through output rows
        [j out / g, (j + 1) out / g) (bias-free)."""
        g = x.shape[-2]
        w = self.weight.view(g, -1, x.shape[-1])  # [g, out / g, in]
        return torch.einsum("...gi,goi->...go", x, w)
