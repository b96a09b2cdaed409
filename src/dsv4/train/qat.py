"""FP4 quantization-aware training of the routed experts (spec 6.4).

V4 trains its MoE expert weights with MXFP4 QAT so that the released FP4 experts are the weights the model was
trained with. Here the switch is an attribute of each ``dsv4.model.moe.Experts`` (``fp4_qat``), honoured by
``Experts.expert_weights()``: the forward then uses ``fake_quant_fp4`` of the float32 masters (E2M1 values, one
power-of-two scale ``2^ceil(log2(amax / 6))`` per 1x32 tile along each matrix's input dim) and the backward passes
the gradient of those quantized weights straight through to the masters, which the optimizer updates as usual.

    from dsv4.train.qat import enable_fp4_qat
    enable_fp4_qat(model)            # every routed expert of the main layers and of the MTP blocks
    ... train ...
    save_official(model, path)       # FP4 experts = exactly the weights the QAT forward used

The official recipe dequantizes the FP4 weights losslessly to FP8 (128x128 blocks) and runs an FP8 GEMM; with the
official converter's FP8 block scale (the block's largest 1x32 scale / 2^6) that cast is exact whenever every 1x32
scale of a 128x128 block is at least 2^-14 times the largest (what the official converter assumes), so simulating
the FP4 rounding alone gives the same weights. ``enable_indexer_fp4`` switches the report's second QAT target, the
CSA indexer's QK path (Hadamard rotation, then MXFP4), which the indexer itself implements.

``real_fp4_experts(model)`` is the inference side: the masters replaced, in place and for the duration of a
``with`` block, by their MXFP4 quantize-dequantize, which is what an official FP4 checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dsv4.model.moe import Experts
from dsv4.quant import fake_quant_fp4

__all__ = ["expert_modules", "enable_fp4_qat", "fp4_qat_enabled", "fp4_expert_weights", "real_fp4_experts"]


def expert_modules(model: nn.Module) -> list[Experts]:
    """Every routed-expert module of ``model`` (main layers and MTP blocks), in module order."""
    return [m for m in model.modules() if isinstance(m, Experts)]


def _check_fp4_shapes(experts: Experts, name: str) -> None:
    block = experts.fp4_block
    for leaf in ("w1", "w2", "w3"):
        n = getattr(experts, leaf).shape[-1]
        if n % block:
            what = "hidden_size" if leaf != "w2" else "moe_intermediate_size"
            raise ValueError(f"FP4 QAT: {name}.{leaf} has input dim {n} ({what}), not a multiple of the MXFP4 "
                             f"block {block}")


def enable_fp4_qat(model: nn.Module, on: bool = True) -> int:
    """Switch FP4 quantization-aware training of the routed experts on (or off) in every ``Experts`` of ``model``.

    Returns how many expert modules were switched. Raises ``ValueError`` (changing nothing) when the model has no
    routed experts, or when an input dim (``hidden_size`` for w1 / w3, ``moe_intermediate_size`` for w2) is not a
    multiple of 32.
    """
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]
    if not named:
        raise ValueError(f"FP4 QAT: {type(model).__name__} has no routed experts (dsv4.model.moe.Experts)")
    if on:
        for name, m in named:
            _check_fp4_shapes(m, name)
    for _, m in named:
        m.fp4_qat = bool(on)
    return len(named)


def enable_indexer_fp4(model: nn.Module, on: bool = True) -> int:
    """Switch the lightning indexers' FP4 query / key path (Hadamard rotation, then MXFP4 fake quantization with a
    straight-through gradient; spec 2.7, 6.4) on or off; returns how many indexers were switched."""
    from dsv4.model.indexer import Indexer

    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    for m in indexers:
        if on and m.head_dim % 32:
            raise ValueError(f"FP4 indexer: index_head_dim {m.head_dim} is not a multiple of the MXFP4 block 32")
    for m in indexers:
        m.fp4_qk = bool(on)
    return len(indexers)


def fp4_qat_enabled(model: nn.Module) -> bool:
    """True when every routed-expert module of ``model`` runs its forward with FP4 QAT (False if it has none)."""
    experts = expert_modules(model)
    return bool(experts) and all(m.fp4_qat for m in experts)


def fp4_expert_weights(experts: Experts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MXFP4 quantize-dequantize of an ``Experts``' masters (w1, w2, w3), detached: what the QAT forward uses
    and what an official FP4 checkpoint of these masters stores."""
    with torch.no_grad():
        return tuple(fake_quant_fp4(w.detach(), experts.fp4_block) for w in (experts.w1, experts.w2, experts.w3))


@contextmanager
def real_fp4_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every routed expert's weights are their real FP4 values (quantized and dequantized once,
    in place) and QAT is off, so the forward does no further quantization; the masters and the QAT switches are
    restored on exit. Raises ``ValueError`` as ``enable_fp4_qat`` does for shapes MXFP4 cannot hold."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]
    if not named:
        raise ValueError(f"real FP4 experts: {type(model).__name__} has no routed experts")
    for name, m in named:
        _check_fp4_shapes(m, name)
    saved = []
    try:
        for _, m in named:
            saved.append((m, m.fp4_qat, [w.detach().clone() for w in (m.w1, m.w2, m.w3)]))
            q = fp4_expert_weights(m)
            with torch.no_grad():
                for w, wq in zip((m.w1, m.w2, m.w3), q):
                    w.copy_(wq)
            m.fp4_qat = False
        yield model
    finally:
        with torch.no_grad():
            for m, flag, masters in saved:
                for w, master in zip((m.w1, m.w2, m.w3), masters):
                    w.copy_(master)
                m.fp4_qat = flag
