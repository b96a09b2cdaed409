"""Checkpoints in the formats people have (spec 9). Only safetensors is ever read; never pickle.

Three namings of the same tensors are read:
  - DeepSeek's official layout: ``layers.N.attn.wq_a.weight``, ``hc_head_fn``, ``layers.N.ffn.experts.E.w1.weight``,
    with FP8 E4M3 weights + ``.scale`` (128x128 blocks) and FP4 E2M1 experts packed two per byte + ``.scale`` (1x32);
  - what HF transformers 5.x writes: the official names under ``model.`` (``head.weight`` excepted), with
    ``model.embed_tokens.weight``, ``model.hc_head.hc_fn`` and the attention kv norm as ``attn.norm``;
  - HF transformers' in-memory names (``model.layers.N.self_attn.q_a_proj.weight``, ``mlp.experts.gate_up_proj``...).
``save_pretrained`` writes the second, which ``transformers.DeepseekV4ForCausalLM.from_pretrained`` loads; MTP weights
go under ``mtp.`` with the official names (transformers ignores them). ``save_official`` writes the first, quantized
as the released checkpoints are (FP8 matrices, FP4 routed experts). Both replace the target directory atomically
(``dsv4.atomic.write_directory_atomically``), and ``from_pretrained`` first recovers a directory whose writer was
killed (``dsv4.atomic.recover_directory``).

dsv4's own module names are the official ones, with the mHC units as modules (``hc_attn.fn``) and the routed experts
stacked per layer (``ffn.experts.w1`` [E, I, d]).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch

from dsv4.config import ModelConfig
from dsv4.atomic import recover_directory, write_directory_atomically

log = logging.getLogger(__name__)

_STACKED_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(w[123])$")
_ONE_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")
_HC = re.compile(r"^(.*?)(?:^|(?<=\.))hc_(head|attn|ffn)_(fn|base|scale)$")

# HF in-memory names -> official names, applied in order to the part after "model." (spec 9 table).
_HF_MEMORY_RULES = [
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.position_bias$", ".ape"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
]


# ------------------------------------------------------------------------------------------------------- naming
def internal_to_official(name: str) -> str:
    """dsv4 module name -> official name (stacked experts are split separately)."""
    return re.sub(r"(^|\.)hc_(head|attn|ffn)\.(fn|base|scale)$", r"\1hc_\2_\3", name)


def official_to_internal(name: str) -> str:
    return re.sub(r"(^|\.)hc_(head|attn|ffn)_(fn|base|scale)$", r"\1hc_\2.\3", name)


def official_to_hf_saved(name: str) -> str:
    """Official name -> the name HF transformers 5.x writes in ``save_pretrained``."""
    if name.startswith("mtp.") or name == "head.weight":
        return name
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    m = re.match(r"^hc_head_(fn|base|scale)$", name)
    if m:
        return f"model.hc_head.hc_{m.group(1)}"
    return "model." + re.sub(r"\.attn\.kv_norm\.", ".attn.norm.", name)


def to_official(key: str) -> str:
    """Any of the three namings -> official naming (experts of HF's merged tensors handled by the caller)."""
    if key == "lm_head.weight":
        return "head.weight"
    if not key.startswith("model."):
        return key  # official, or mtp.*, or head.weight
    rest = key[len("model."):]
    if rest.startswith("hc_head.") or rest.startswith("embed_tokens") or ".self_attn." in rest \
            or ".mlp." in rest or "_layernorm." in rest or ".attn_hc." in rest or ".ffn_hc." in rest:
        for pattern, repl in _HF_MEMORY_RULES:
            rest = re.sub(pattern, repl, rest)
        return rest
    # what transformers writes: official names, kv norm as attn.norm
    return re.sub(r"\.attn\.norm\.", ".attn.kv_norm.", rest)


# ------------------------------------------------------------------------------------------------------ reading
def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index ({e!r})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
                         for p in path.glob(pattern))
        hint = f" (found {pickles}: pickle checkpoints are never read; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors files in {path}{hint}")
    return files


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by its stored name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f in _safetensor_files(path):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise ValueError(f"tensor(s) {dup[:5]} appear in more than one shard ({where[dup[0]]} and {f.name})")
        tensors.update(part)
        where.update(dict.fromkeys(part, f.name))
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        absent = sorted(k for k in weight_map if k not in tensors)
        if absent:
            raise ValueError(f"{index} lists tensor(s) that no shard holds: {absent[:5]}")
        moved = sorted(k for k in tensors if weight_map.get(k, where[k]) != where[k])
        if moved:
            raise ValueError(f"{index} places tensor(s) {moved[:5]} in a different shard than the one holding them")
    return tensors


def _dequantize(name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
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
        m = _ONE_EXPERT.match(key)
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


def official_to_model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> dsv4 state dict names, experts stacked."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for name, t in state.items():
        m = _ONE_EXPERT.match(name)
        if m:
            experts[(m.group(1), m.group(3))][int(m.group(2))] = t
        else:
            out[official_to_internal(name)] = t
    for (prefix, w), per in experts.items():
        n = max(per) + 1
        missing = [e for e in range(n) if e not in per]
        if missing:
            raise ValueError(f"{prefix}: expert(s) {missing[:8]} of {w} are missing")
        out[f"{prefix}.{w}"] = torch.stack([per[e] for e in range(n)])
    return out


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy ``state`` (dsv4 names) into ``model``; a missing, unexpected or mis-shaped tensor is an error naming it
    (by its official name; stacked experts as ``layers.N.ffn.experts.w1`` for all ``experts.E.w1.weight``)."""
    own = model.state_dict()
    show = internal_to_official
    missing = sorted(show(k) for k in set(own) - set(state))
    unexpected = sorted(show(k) for k in set(state) - set(own))
    shapes = [f"{show(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected and strict:
        problems.append(f"unexpected tensor(s): {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if shapes:
        problems.append("mis-shaped tensor(s): " + "; ".join(shapes[:10]))
    if problems:
        raise ValueError("checkpoint does not match the model: " + " | ".join(problems))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k].to(t.dtype))


_META_BUILD_ABOVE = 20_000_000  # parameters


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None):
    """Build a ``Transformer`` from a directory in HF or official layout (see the module docstring), after putting
    back the previous version of it if a writer was killed while replacing it."""
    from dsv4.model import Transformer

    path = Path(path)
    recover_directory(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    config = ModelConfig.from_json(path / "config.json")
    state = official_to_model_state(official_state(read_tensors(path)))
    if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
        log.warning("%s has no MTP weights (transformers does not save them): loading without the MTP block", path)
        config = config.replace(num_nextn_predict_layers=0)
    if config.num_parameters() > _META_BUILD_ABOVE:
        # no memory or time spent on random weights that are overwritten at once
        with torch.device("meta"):
            model = Transformer(config)
        model = model.to_empty(device=device or "cpu")
        model.init_nonpersistent_buffers()
    else:
        # small models build directly: cheaper than the one-off cost of the first meta-device construction;
        # the random init must not move the caller's RNG
        with torch.random.fork_rng(devices=[]):
            model = Transformer(config).to(device or "cpu")
    load_state(model, state)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ writing
def official_state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under official names, experts one tensor each."""
    out = {}
    for name, t in model.state_dict().items():
        m = _STACKED_EXPERT.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
        else:
            out[internal_to_official(name)] = t
    return out


def _write_safetensors(tmp: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")


def save_pretrained(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 4 << 30) -> None:
    """Write ``config.json`` and safetensors in the layout transformers writes (sharded above ``max_shard_bytes``).

    The weights are plain floats (``dtype``, or the model's), so the config carries no ``quantization_config`` even
    when the model was loaded from a quantized checkpoint. ``path`` is replaced atomically.
    """
    tensors = {}
    for name, t in official_state_of(model).items():
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not _keeps_fp32(name):
            t = t.to(dtype)
        tensors[official_to_hf_saved(name)] = t.contiguous().cpu()
    config = model.config.replace(quantization_config=None)

    def write(tmp: Path) -> None:
        config.to_json(tmp / "config.json")
        _write_safetensors(tmp, tensors, max_shard_bytes)

    write_directory_atomically(path, write)


def _keeps_fp32(name: str) -> bool:
    """Tensors the released checkpoints keep in float32 whatever the weight dtype (spec 1.3)."""
    return bool(re.search(r"(hc_\w+_(fn|base|scale)|attn_sink|\.ape|gate\.bias|tid2eid)$", name))


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
            if dtype is not None and t.is_floating_point() and not _keeps_fp32(name):
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
        _write_safetensors(tmp, tensors, max_shard_bytes)

    write_directory_atomically(path, write)
