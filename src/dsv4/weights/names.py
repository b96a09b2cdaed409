"""The names of a DeepSeek-V4 model's tensors in dsv4, in DeepSeek's official layout and in HF transformers' layouts.

Three namings of the same tensors are read:
  - DeepSeek's official layout: ``layers.N.attn.wq_a.weight``, ``hc_head_fn``, ``layers.N.ffn.experts.E.w1.weight``;
  - what HF transformers 5.x writes: the official names under ``model.`` (``head.weight`` excepted), with
    ``model.embed_tokens.weight``, ``model.hc_head.hc_fn`` and the attention kv norm as ``attn.norm``;
  - HF transformers' in-memory names (``model.layers.N.self_attn.q_a_proj.weight``, ``mlp.experts.gate_up_proj``...).
MTP weights keep the official names under ``mtp.`` in every layout.

dsv4's own module names are the official ones, with the mHC units as modules (``hc_attn.fn``) and the routed experts
stacked per layer (``ffn.experts.w1`` [E, I, d]). Everything here maps names (and splits or stacks the experts);
nothing reads or writes files.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

STACKED_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(w[123])$")
ONE_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")

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


def internal_to_official(name: str) -> str:
    """dsv4 module name -> official name (stacked experts are split separately)."""
    return re.sub(r"(^|\.)hc_(head|attn|ffn)\.(fn|base|scale)$", r"\1hc_\2_\3", name)


def official_to_internal(name: str) -> str:
    """Official name -> dsv4 module name (one expert's name is stacked separately)."""
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


def keeps_fp32(name: str) -> bool:
    """Tensors (by official name) the released checkpoints keep in float32 whatever the weight dtype (spec 1.3)."""
    return bool(re.search(r"(hc_\w+_(fn|base|scale)|attn_sink|\.ape|gate\.bias|tid2eid)$", name))


def official_to_model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> dsv4 state dict names, experts stacked."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for name, t in state.items():
        m = ONE_EXPERT.match(name)
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


def official_state_of(model: torch.nn.Module, as_stored: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under official names, experts one tensor each, as plain floats: the weights a packed
    model keeps as stored (``dsv4.model.packed``) dequantized, or with ``as_stored`` as they are stored (the mapped
    bytes and their scales)."""
    out, packed = {}, []
    for mname, module in model.named_modules():
        tensors = getattr(module, "stored_tensors" if as_stored else "dense_tensors", None)
        if tensors is not None:
            packed.append(mname + ".")
            out.update({f"{mname}.{k}": t for k, t in tensors().items()})
    for name, t in model.state_dict().items():
        if packed and name.startswith(tuple(packed)):
            continue
        m = STACKED_EXPERT.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
        else:
            out[internal_to_official(name)] = t
    return out
