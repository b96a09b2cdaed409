"""DeepSeek's official checkpoint layout and its precisions (spec 1.3, 9): read and write.

The released checkpoints store the attention, shared-expert and MTP projection matrices as FP8 E4M3 with one
power-of-two (UE8M0) scale per 128x128 block in ``<name>.scale``, and the routed experts as MXFP4: E2M1 codes packed
two per byte, int8 ``[out, in/2]``, with one UE8M0 scale per 1x32 in ``.scale`` (FP8 like the matrices in the Base
releases). HF's quantized checkpoints put the scale in ``<name>.weight_scale_inv``.

Reading (``official_state``): stored tensors in any naming (``dsv4.weights.names``) and any of these precisions ->
official names, dequantized. Writing (``save_official``): the official names, quantized as the released checkpoints
are, and the root ``config.json`` with its legacy fields; the target directory is replaced atomically
(``dsv4.atomic.write_directory_atomically``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from dsv4.atomic import write_directory_atomically
from dsv4.config import ModelConfig
from dsv4.weights.files import write_safetensors
from dsv4.weights.names import ONE_EXPERT, keeps_fp32, official_state_of, to_official

# The matrices the released checkpoints store as FP8 E4M3 with 128x128 block scales (spec 1.3), by official name.
_OFFICIAL_FP8 = re.compile(
    r"(^|\.)attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$"
    r"|\.attn\.indexer\.wq_b\.weight$"
    r"|\.ffn\.shared_experts\.w[123]\.weight$"
    r"|^mtp\.\d+\.(e_proj|h_proj)\.weight$")
# Routed experts: MXFP4 (instruct releases) or FP8 (Base releases).
_OFFICIAL_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")

OFFICIAL_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "weight_block_size": [128, 128]}


# ------------------------------------------------------------------------------------------------------ reading
def _dequantize(name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """One stored weight as floats: FP8 E4M3 with 128x128 block scales, packed FP4 with 1x32 scales, or as is."""
    from dsv4 import quant

    if scale is None:
        if weight.dtype in (torch.int8, torch.uint8) or str(weight.dtype).startswith("torch.float8"):
            raise ValueError(f"{name} is stored as {weight.dtype} but has no scale tensor")
        return weight
    try:
        if weight.dtype in (torch.int8, torch.uint8):  # FP4 E2M1, two per byte, 1x32 scales
            return quant.mxfp4_dequant(weight, scale)
        if weight.dtype == torch.float8_e4m3fn:
            return quant.fp8_block_dequant(weight, scale)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    raise ValueError(f"{name} has a scale but is stored as {weight.dtype}, neither FP8 E4M3 nor packed FP4")


def _dequantize_fp4_experts(plain: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dequantize the packed-FP4 experts of each layer and projection in one batched call (many small calls are
    slow), taking their scales out of ``scales``."""
    from dsv4 import quant

    groups: dict[tuple, list[str]] = defaultdict(list)
    for key, t in plain.items():
        m = ONE_EXPERT.match(key)
        if m and t.dtype in (torch.int8, torch.uint8) and key in scales:
            s = scales[key]
            groups[(m.group(1), m.group(3), tuple(t.shape), tuple(s.shape), s.dtype)].append(key)
    done = {}
    for keys in groups.values():
        packed = torch.stack([plain[k] for k in keys])
        scale = torch.stack([scales[k] for k in keys])
        try:
            values = quant.mxfp4_dequant(packed, scale)
        except ValueError as e:
            raise ValueError(f"{keys[0]}: {e}") from None
        for k, v in zip(keys, values.unbind(0)):
            done[k] = v
            del scales[k]
    return done


def official_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored tensors (any naming, any precision) -> official names, dequantized."""
    scales = {}
    plain = {}
    for key, t in tensors.items():
        # a quantization scale sits beside its weight: `X.scale` (official) or `X.weight_scale_inv` (HF)
        base = key.rsplit(".", 1)[0] + ".weight"
        if (key.endswith(".weight_scale_inv") or key.endswith(".scale")) and base in tensors:
            scales[base] = t
        else:
            plain[key] = t
    done = _dequantize_fp4_experts(plain, scales)
    out: dict[str, torch.Tensor] = {}
    for key, t in plain.items():
        t = done.pop(key) if key in done else _dequantize(key, t, scales.pop(key, None))
        m = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)$", key)
        if m:  # HF in-memory merged experts
            prefix = to_official(m.group(1))
            if m.group(2) == "gate_up_proj":
                w1, w3 = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.w1.weight"] = w1[e]
                    out[f"{prefix}.{e}.w3.weight"] = w3[e]
            else:
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.w2.weight"] = t[e]
            continue
        name = to_official(key)
        if name in out:
            raise ValueError(f"checkpoint holds {name} twice (as {key} and another name)")
        out[name] = t
    if scales:
        raise ValueError(f"scale tensor(s) without a weight: {sorted(scales)[:5]}")
    return out


# ------------------------------------------------------------------------------------------------------ writing
def official_config_dict(config: ModelConfig, fp8: bool = True, fp4_experts: bool = True) -> dict:
    """An HF-style config dict with the legacy fields of DeepSeek's released root ``config.json`` (spec 1.2, 9).

    ``compress_ratios`` has one entry per layer then a 0 per MTP layer (its sliding-window attention), next to the
    ``layer_types`` they mean; ``num_hash_layers`` when the hash layers are a prefix; ``qk_rope_head_dim``;
    ``rope_scaling`` = the compressed layers' YaRN; ``quantization_config`` and ``expert_dtype`` describe the weights.
    """
    d = config.replace(quantization_config=None).to_dict()
    d["compress_ratios"] = [config.compress_rate(t) for t in config.layer_types] + \
        [0] * config.num_nextn_predict_layers
    n_hash = sum(1 for t in config.mlp_layer_types if t == "hash_moe")
    if config.mlp_layer_types[:n_hash] == ["hash_moe"] * n_hash:
        d["num_hash_layers"] = n_hash
    compress = config.rope_parameters["compress"]
    if compress.get("rope_type") == "yarn":
        d["rope_scaling"] = {"type": "yarn", **{k: compress[k] for k in (
            "factor", "original_max_position_embeddings", "beta_fast", "beta_slow") if k in compress}}
    d["topk_method"] = "noaux_tc"
    if fp8 or fp4_experts:
        d["quantization_config"] = dict(OFFICIAL_QUANTIZATION_CONFIG)
    if fp4_experts:
        d["expert_dtype"] = "fp4"
    elif fp8:
        d["expert_dtype"] = "fp8"
    return d


def official_tensors(model: torch.nn.Module, fp8: bool = True, fp4_experts: bool = True,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of DeepSeek's official layout: FP8 matrices with ``.scale``, routed experts FP4 (or FP8 when
    ``fp8`` and not ``fp4_experts``), the rest unquantized (in ``dtype`` if given, the FP32 group always FP32)."""
    from dsv4 import quant
    from dsv4.weights.packed import is_packed, packed_tensors, stored_format

    if dtype is None and is_packed(model) and stored_format(model) == (fp8, fp4_experts):
        return packed_tensors(model)  # the bytes it was loaded from
    out: dict[str, torch.Tensor] = {}
    for name, t in official_state_of(model).items():
        t = t.detach().cpu()
        is_expert = bool(_OFFICIAL_EXPERT.search(name))
        if is_expert and fp4_experts:
            if t.shape[-1] % 32:
                raise ValueError(f"{name}: input dim {t.shape[-1]} is not a multiple of 32, so it cannot be stored "
                                 "as MXFP4; use fp4_experts=False")
            w, s = quant.mxfp4_quant(t.float())
        elif (is_expert or _OFFICIAL_FP8.search(name)) and fp8:
            w, s = quant.fp8_block_quant(t.float())
        else:
            if dtype is not None and t.is_floating_point() and not keeps_fp32(name):
                t = t.to(dtype)
            out[name] = t.contiguous()
            continue
        out[name] = w.contiguous()
        out[name[:-len(".weight")] + ".scale"] = s.contiguous()
    return out


def save_official(model: torch.nn.Module, path: str | Path, fp8: bool = True, fp4_experts: bool = True,
                  dtype: torch.dtype | None = None, max_shard_bytes: int = 4 << 30) -> None:
    """Write DeepSeek's official checkpoint layout (spec 9): no ``model.`` prefix, ``embed.weight``, ``head.weight``,
    ``hc_head_fn``, ``layers.N.attn.kv_norm.weight``, experts one tensor each, MTP under ``mtp.0.``.

    With ``fp8``: ``wq_a``, ``wq_b``, ``wkv``, ``wo_a``, ``wo_b``, the indexer's ``wq_b``, the shared experts and the
    MTP ``e_proj`` / ``h_proj`` are float8_e4m3fn + ``<name>.scale`` (one power-of-two scale per 128x128 block).
    With ``fp4_experts``: routed experts are MXFP4, int8 ``[out, in/2]`` (two E2M1 codes a byte) + ``.scale``
    ``[out, in/32]``; without it they are FP8 like the matrices above (the Base releases), or plain if not ``fp8``.
    Everything else (norms, embedding, head, router, compressor / indexer ``wkv`` ``wgate`` ``weights_proj``, mHC,
    sinks, ``ape``, router bias, ``tid2eid``) is stored unquantized, in ``dtype`` if given (mHC, sinks, ``ape`` and
    the router bias stay float32). ``config.json`` is HF-style plus the legacy fields of the released root config.
    ``dsv4.from_pretrained`` reads it back (dequantized); ``path`` is replaced atomically.
    """
    tensors = official_tensors(model, fp8=fp8, fp4_experts=fp4_experts, dtype=dtype)
    config = official_config_dict(model.config, fp8=fp8, fp4_experts=fp4_experts)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp, tensors, max_shard_bytes)

    write_directory_atomically(path, write)
