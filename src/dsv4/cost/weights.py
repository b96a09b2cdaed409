"""The weights of a model as ``dsv4 cost --fit`` counts them, by kind (``KINDS``): from a checkpoint directory's
safetensors headers (``checkpoint_weights``: at their stored bytes for a packed model, or as a materialized model
holds them), or from a config (``config_weights``, the model built on the meta device); and what loading or running
holds besides (``materialized_loading_bytes``, ``dequantized_bytes``). Nothing here reads tensor data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dsv4.config import ModelConfig
from dsv4.model.packed import TILE_BYTES

KINDS = ("embedding", "head", "attention", "experts", "shared_experts", "norms_other", "mtp")
DTYPES = ("packed", "float32", "bfloat16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
FLOAT = 4  # activations, scores, logits and compressed entries are float32 (dsv4.model.precision)

# safetensors dtype -> bytes per stored element
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
_ST_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

# -------------------------------------------------------------------------------------------------------- weights
def weight_kind(name: str) -> str:
    """The kind of a tensor by its official name (``dsv4.weights.names.to_official``); scales go with their weight."""
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head."):
        return "head"
    if ".ffn.experts." in name:
        return "experts"
    if ".ffn.shared_experts." in name:
        return "shared_experts"
    if ".attn." in name and not name.endswith("norm.weight"):
        return "attention"
    return "norms_other"  # norms, mHC, routers (gate weight, bias, tid2eid), the hc head


@dataclass
class TensorInfo:
    """One stored tensor, from a safetensors header: name as stored, dtype (safetensors spelling), shape, bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str = ""


def checkpoint_tensors(path: str | Path) -> list[TensorInfo]:
    """Every tensor of a checkpoint directory, from the headers of its shards alone, checked against its index
    (``dsv4.weights.files.read_headers``: a bad header, a truncated shard, a shard or tensor the index and the files
    disagree on is an error naming the file)."""
    from dsv4.weights.files import SAFETENSORS_DTYPE, read_headers

    return [TensorInfo(name, SAFETENSORS_DTYPE[info.dtype], info.shape, info.nbytes, f.name)
            for name, (f, info) in read_headers(path).items()]


def _is_scale(name: str, names: set[str]) -> str | None:
    """The weight a quantization scale belongs to (``X.scale`` official, ``X.weight_scale_inv`` HF), else None."""
    for suffix in (".weight_scale_inv", ".scale"):
        if name.endswith(suffix):
            base = name[:-len(suffix)] + ".weight"
            if base in names:
                return base
    return None


def _tensors(checkpoint: str | Path | list[TensorInfo]) -> list[TensorInfo]:
    return checkpoint if isinstance(checkpoint, list) else checkpoint_tensors(checkpoint)


def checkpoint_weights(checkpoint: str | Path | list[TensorInfo], dtype: str
                       ) -> tuple[dict[str, int], dict[str, int], str]:
    """(bytes by kind as ``dtype`` counts them, bytes by kind as stored, layout "hf" or "official") of a checkpoint
    directory (or its ``checkpoint_tensors``), from its headers. ``dtype``: "packed" (as stored) or "float32" /
    "bfloat16" (materialized)."""
    from dsv4.weights.names import to_official

    tensors = _tensors(checkpoint)
    names = {t.name for t in tensors}
    layout = "hf" if any(n.startswith("model.") or n == "lm_head.weight" for n in names) else "official"
    scaled = {_is_scale(t.name, names) for t in tensors} - {None}
    counted = dict.fromkeys(KINDS, 0)
    stored = dict.fromkeys(KINDS, 0)
    for t in tensors:
        base = _is_scale(t.name, names)
        kind = weight_kind(to_official(base or t.name))
        stored[kind] += t.nbytes
        if dtype == "packed":
            counted[kind] += t.nbytes
        elif base is None:  # a scale is folded into its weight when it is dequantized
            values = math.prod(t.shape)
            if t.name in scaled and t.dtype in ("I8", "U8"):
                values *= 2  # packed FP4: two E2M1 values a byte
            floating = t.dtype in _ST_FLOAT or t.name in scaled
            counted[kind] += values * DTYPE_BYTES[dtype] if floating else t.nbytes
    return counted, stored, layout


def decode_bytes_per_token(tensors, config: ModelConfig) -> int:
    """The weight bytes one decoding step of one row reads, from (official name, bytes) pairs (a checkpoint's
    headers, or a loaded model's ``official_state_of(model, as_stored=True)``): every tensor of the main layers and
    the head, the routed experts at k / E of their bytes (a token's k experts), one embedding row; not the MTP block
    (plain decoding reads none of it)."""
    total = 0.0
    share = config.num_experts_per_tok / config.n_routed_experts
    for name, nbytes in tensors:
        kind = weight_kind(name)
        if kind == "mtp":
            continue
        total += nbytes / config.vocab_size if kind == "embedding" else nbytes * share if kind == "experts" else nbytes
    return int(total)


def materialized_loading_bytes(checkpoint: str | Path | list[TensorInfo]) -> int:
    """The peak of ``dsv4.from_pretrained`` materializing a checkpoint, from its headers. The stored tensors are
    memory-mapped by safetensors (their pages resident once touched, and mapped while any tensor of the file lives);
    ``official_state`` dequantizes the quantized ones to float32; ``official_to_model_state`` stacks the routed
    experts (the per-expert copies are dropped after); the model is built in float32 and the state copied in
    (before any ``.to(dtype)``). Peak: stored + dequantized + stacked experts, or stored + dequantized without the
    experts' + stacked experts + the model. Measured (runtime included): tiny HF float32 46-48 MiB against 51.9
    predicted, tiny HF BF16 38.7 against 41.7, tiny official FP8 / FP4 as float32 44.0 against 47.5, small HF float32
    979 against 891 (its first meta-device construction adds some 75 MiB once)."""
    from dsv4.weights.names import to_official

    tensors = _tensors(checkpoint)
    names = {t.name for t in tensors}
    scaled = {_is_scale(t.name, names) for t in tensors} - {None}
    stored = dequantized = dequantized_experts = stacked = model = 0
    for t in tensors:
        stored += t.nbytes
        if _is_scale(t.name, names):
            continue
        values = math.prod(t.shape) * (2 if t.name in scaled and t.dtype in ("I8", "U8") else 1)
        state = values * FLOAT if t.name in scaled else t.nbytes
        expert = weight_kind(to_official(t.name)) == "experts"
        if t.name in scaled:
            dequantized += state
            dequantized_experts += state if expert else 0
        stacked += state if expert else 0
        model += values * FLOAT if (t.dtype in _ST_FLOAT or t.name in scaled) else t.nbytes
    return max(stored + dequantized + stacked, stored + dequantized - dequantized_experts + stacked + model)


def config_weights(config: ModelConfig, dtype: str) -> dict[str, int]:
    """Bytes by kind of the model a config describes: materialized at ``dtype``, or "packed" as
    ``dsv4.weights.official.save_official`` writes it (FP8 matrices with one scale byte per 128x128 block, MXFP4
    routed experts with one scale byte per 32 values, the rest BF16 but the float32 group of the release)."""
    import torch

    from dsv4.model import Transformer
    from dsv4.weights.names import STACKED_EXPERT, internal_to_official, keeps_fp32
    from dsv4.weights.official import _OFFICIAL_FP8

    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = Transformer(config)
    out = dict.fromkeys(KINDS, 0)
    for name, t in model.state_dict().items():
        experts = STACKED_EXPERT.match(name)
        official = f"{experts.group(1)}.0.{experts.group(2)}.weight" if experts else internal_to_official(name)
        kind = weight_kind(official)
        n = t.numel()
        if not t.is_floating_point():
            out[kind] += n * t.element_size()
        elif dtype != "packed":
            out[kind] += n * DTYPE_BYTES[dtype]
        elif experts:  # MXFP4: half a byte a value, one UE8M0 scale per 32
            out[kind] += n // 2 + n // 32
        elif _OFFICIAL_FP8.search(official) and t.dim() == 2:
            out[kind] += n + math.ceil(t.shape[0] / 128) * math.ceil(t.shape[1] / 128)
        else:
            out[kind] += n * (4 if keeps_fp32(official) else 2)
    return out


def dequantized_bytes(config: ModelConfig) -> int:
    """Float32 bytes a packed model holds dequantized at once (``dsv4.model.packed``): one routed expert's three
    matrices, dequantized whole when a token is routed to it, with the conversion's temporary of one more; or a
    tile of output rows of a packed matrix (``TILE_BYTES``) with its temporary."""
    return max(4 * config.hidden_size * config.moe_intermediate_size * FLOAT, 2 * TILE_BYTES)
