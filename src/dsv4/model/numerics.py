"""The numerics of DeepSeek's official inference, as a switch: ``set_numerics(model, "official" | "plain")``.

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also r rope dims.

"plain" (the default of every model built in code, and what HF transformers computes) leaves every value in the
model's dtype. "official" adds the roundings that the official inference code applies on top of its BF16 model
(spec 2.2 item 5, 2.7, 6.4), each switched by an attribute of the module that applies it (no global state):

1. **KV** (spec 2.2 item 5, 6.4 "KV: nope dims FP8 (block 64), rope dims BF16"): after RoPE, the non-RoPE dims of
   the window K=V (``Attention.official_kv``) and of the main compressor's entries (``Compressor.official_kv``, CSA
   and HCA; not the indexer's compressor, rule 2) are rounded to FP8 E4M3 in tiles of 64 with power-of-two (UE8M0)
   scales, ``quant.fp8_act_round(., 64)``; the trailing r RoPE dims are rounded to BF16, the precision the official
   cache holds them in (a no-op for a BF16 model). Applied where the vector is made, so the window ring, the
   compressed entries and the current token's own key all hold the rounded vector, in every attention path.
2. **Indexer queries and keys** (spec 2.7, 6.4): after RoPE, the normalized Walsh-Hadamard rotation of the whole
   ``index_head_dim`` vector, then MXFP4 rounding (E2M1 values, 1x32 tiles, power-of-two scales): ``Indexer.fp4_qk``,
   the same switch that the indexer's FP4 QAT uses (``dsv4.train.qat.enable_indexer_fp4``).
3. **Index scores** (spec 2.7 "index scores are quantized FP32->BF16 for top-k", 6.4): rounded to BF16 before top-k
   (``Indexer.bf16_scores``), so scores within a BF16 step tie and the lower index wins (DESIGN: ties). The official
   code runs its score einsum, ReLU, head weighting and head sum in BF16 (three roundings); the spec states the one
   rounding of the FP32 score, which is what this rule does.
4. **Activations before FP8 / FP4 matmuls** (spec 6.4: 1x128 activation tiles; 1.3: which weights are FP8 / FP4):
   the input of every matmul whose weight the official checkpoints store in FP8 or FP4 is rounded to E4M3 in 1x128
   tiles along its input dim with UE8M0 scales, ``quant.fp8_act_round(., 128)`` (amax floored at 1e-4 as the official
   ``act_quant`` kernel does): ``wq_a``, ``wq_b``, ``wkv``, ``wo_b`` of every attention (MTP's included), the
   indexer's ``wq_b``, the shared expert's ``w1`` / ``w3`` / ``w2``, the routed experts' ``w1`` / ``w3`` and ``w2``
   (whose input is the SwiGLU output times the routing weight), and MTP's ``e_proj`` / ``h_proj``. The switch is
   ``act_quant_block`` (128; 0 off) on those ``Linear`` modules and on ``Experts``; a module that replaces one of
   them must honour it. Not rounded: ``wo_a`` (the official inference dequantizes it to BF16 and runs a BF16 einsum,
   spec 2.2 item 8), and the BF16 weights (compressor / indexer ``wkv`` ``wgate`` ``weights_proj``, router, head).

Everything else follows the model's dtype and DESIGN's numerics (compressor, router, mHC, sinks, norms and softmax in
float32); with a BF16 model that is the official inference's dtype too. Not simulated: the official sparse-attention
kernel's BF16 rounding of the probabilities before their product with the values (a kernel detail the spec does not
state), and the exact BF16 chain of the index scores (rule 3).

Dimensions that are not whole tiles (small models: e.g. 48 non-RoPE dims, a hidden size of 64) end in one shorter
tile; the released configs always divide. The indexer's head dim must be a power of two (Hadamard) and a multiple of
32 (MXFP4).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.quant import bf16_round, fp8_act_round

NUMERICS = ("plain", "official")
KV_BLOCK = 64  # tile of the KV's non-RoPE dims (spec 2.2 item 5)
ACT_BLOCK = 128  # activation tile before an FP8 / FP4 matmul (spec 6.4)
FP4_BLOCK = 32  # MXFP4 tile of the indexer's queries and keys (spec 2.7)


def round_kv(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Rule 1: K=V vectors [..., c] after RoPE: the leading c - r dims rounded to FP8 E4M3 in tiles of 64 with
    power-of-two scales, the trailing r RoPE dims to BF16."""
    nope = kv.shape[-1] - rope_dim
    return torch.cat([fp8_act_round(kv[..., :nope], KV_BLOCK), bf16_round(kv[..., nope:])], dim=-1)


def round_activations(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """Rule 4: a matmul's input [..., in] rounded to FP8 E4M3 in 1 x ``block`` tiles along ``in``."""
    return fp8_act_round(x, block)


def round_scores(scores: torch.Tensor) -> torch.Tensor:
    """Rule 3: index scores rounded to BF16 (in their own dtype); + 0.0 turns -0.0 into +0.0 (the tie rule compares
    bits)."""
    return bf16_round(scores) + 0.0


def _act_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose input rule 4 rounds (see the module docstring)."""
    from dsv4.model.attention import Attention
    from dsv4.model.moe import MoE
    from dsv4.model.transformer import MTPBlock

    out = []
    for m in model.modules():
        if isinstance(m, Attention):
            out += [m.wq_a, m.wq_b, m.wkv, m.wo_b] + ([m.indexer.wq_b] if m.indexer is not None else [])
        elif isinstance(m, MoE):
            out.append(m.experts)
            if m.shared_experts is not None:
                out += [m.shared_experts.w1, m.shared_experts.w2, m.shared_experts.w3]
        elif isinstance(m, MTPBlock):
            out += [m.e_proj, m.h_proj]
    return out


def set_numerics(model: nn.Module, numerics: str) -> nn.Module:
    """Switch every rule of the official inference numerics on (``"official"``) or off (``"plain"``) in ``model``
    (a ``Transformer``, or any module holding attention / MoE blocks); returns the model. ``"plain"`` computes
    exactly what a model built in code computes (it also switches off the indexer's FP4 QAT path). Raises
    ``ValueError`` (changing nothing) for another value, or when the indexer's head dim cannot take rule 2."""
    from dsv4.model.attention import Attention
    from dsv4.model.indexer import Indexer

    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    on = numerics == "official"
    if on:
        for m in model.modules():
            if isinstance(m, Indexer) and (m.head_dim % FP4_BLOCK or m.head_dim & (m.head_dim - 1)):
                raise ValueError(f"official numerics: index_head_dim {m.head_dim} must be a power of two (Hadamard "
                                 f"rotation) and a multiple of {FP4_BLOCK} (MXFP4 tiles)")
    for m in model.modules():
        if isinstance(m, Attention):
            m.official_kv = on
            if m.compressor is not None:
                m.compressor.official_kv = on
        elif isinstance(m, Indexer):
            m.fp4_qk = on
            m.bf16_scores = on
    for m in _act_modules(model):
        m.act_quant_block = ACT_BLOCK if on else 0
    return model


def numerics_of(model: nn.Module) -> str:
    """``"plain"`` or ``"official"`` as ``set_numerics`` left the model; ``"mixed"`` when the switches disagree
    (set by hand)."""
    from dsv4.model.attention import Attention
    from dsv4.model.indexer import Indexer

    flags = []
    for m in model.modules():
        if isinstance(m, Attention):
            flags.append(m.official_kv)
            if m.compressor is not None:
                flags.append(m.compressor.official_kv)
        elif isinstance(m, Indexer):
            flags += [m.fp4_qk, m.bf16_scores]
    flags += [bool(m.act_quant_block) for m in _act_modules(model)]
    if all(flags):
        return "official" if flags else "plain"
    return "plain" if not any(flags) else "mixed"
