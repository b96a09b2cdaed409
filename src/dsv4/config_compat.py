"""The other namings of a DeepSeek-V4 config, folded into HF transformers' ``DeepseekV4Config`` fields (spec 1.2, 9).

``ModelConfig.from_dict`` (and so ``from_json``) passes every config dict through ``to_hf_fields`` first. Understood:
  - HF's composite form, the model's fields under ``text_config`` (a top-level ``quantization_config`` kept);
  - the official reference code's ``inference/config.json`` (``ModelArgs``: ``dim``, ``n_layers``, ``window_size``,
    ``rope_factor``, ``dtype``, ...), renamed by ``from_official_args``;
  - the legacy fields of DeepSeek's released root ``config.json``: ``compress_ratios`` (per layer) -> ``layer_types``
    and the HCA rate (``layer_types_from_ratios``), ``num_hash_layers`` -> ``mlp_layer_types``, ``qk_rope_head_dim``
    -> ``partial_rotary_factor``, ``rope_scaling`` -> ``rope_parameters``, ``expert_dtype`` -> ``quantization_config``,
    and the flat ``compress_rate_csa`` / ``compress_rate_hca`` -> ``compress_rates``.
A field given under its HF name wins over its legacy spelling. Writing the legacy fields back (the official layout's
``config.json``) is ``dsv4.weights.official.official_config_dict``.
"""

from __future__ import annotations

from typing import Any

from dsv4.config import CSA, HASH_MOE, HCA, MOE, SLIDING

# The official inference/config.json (ModelArgs) names -> HF names.
OFFICIAL_ARG_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "moe_inter_dim": "moe_intermediate_size",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "window_size": "sliding_window",
    "norm_eps": "rms_norm_eps",
    "n_mtp_layers": "num_nextn_predict_layers",
    "max_seq_len": None,  # a runtime buffer size of the reference code, not a model fact
    "max_batch_size": None,
    "dtype": "_dtype",  # "fp8" on the released checkpoints -> quantization_config
    "scale_fmt": "_scale_fmt",
    "expert_dtype": "_expert_dtype",
    "scale_dtype": None,
}


def to_hf_fields(raw: dict, defaults: Any) -> dict:
    """A config dict in any naming above -> one with HF field names (unknown keys are left for the caller to drop).

    ``defaults`` supplies ``num_hidden_layers`` and ``head_dim`` where the dict has none (``ModelConfig`` itself).
    Folding (spec 1.2, 9): ``compress_ratios`` (one entry per layer, MTP entries after the last layer are dropped;
    0 = sliding, 4 = CSA, any other positive ratio = HCA at that rate) -> ``layer_types`` (and the HCA rate);
    ``num_hash_layers`` -> ``mlp_layer_types``; ``qk_rope_head_dim`` -> ``partial_rotary_factor``; ``rope_scaling``
    (YaRN) -> ``rope_parameters['compress']``; ``expert_dtype`` -> ``quantization_config``. Like HF, a schedule
    longer than ``num_hidden_layers`` is cut (released configs list the MTP layer last).
    """
    d = dict(raw)
    if "text_config" in d and isinstance(d["text_config"], dict):
        d = {**{k: v for k, v in d.items() if k == "quantization_config"}, **d["text_config"]}
    # Official inference/config.json (ModelArgs) names.
    if "dim" in d or "n_layers" in d:
        d = from_official_args(d)
    legacy_ratios = d.pop("compress_ratios", None)
    num_hash = d.pop("num_hash_layers", None)
    rope_head = d.pop("qk_rope_head_dim", None)
    csa_rate = d.pop("compress_rate_csa", None)
    hca_rate = d.pop("compress_rate_hca", None)
    rope_scaling = d.pop("rope_scaling", None)
    expert_dtype = d.pop("expert_dtype", None)
    n = d.get("num_hidden_layers", defaults.num_hidden_layers)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"ModelConfig.num_hidden_layers: must be a positive integer, got {n!r}")
    rates = d.get("compress_rates")
    if rates is not None and not isinstance(rates, dict):
        raise ValueError(f"ModelConfig.compress_rates: must be a dict {{layer type: rate}}, got {rates!r}")
    rates = dict(rates or {})
    if csa_rate is not None:
        rates[CSA] = csa_rate
    if hca_rate is not None:
        rates[HCA] = hca_rate
    if legacy_ratios is not None and d.get("layer_types") is None:
        d["layer_types"], hca_from_ratios = layer_types_from_ratios(legacy_ratios, n, rates.get(CSA, 4))
        if hca_from_ratios is not None:
            if rates.get(HCA, hca_from_ratios) != hca_from_ratios:
                raise ValueError(f"ModelConfig.compress_ratios: HCA ratio {hca_from_ratios} disagrees with "
                                 f"compress_rates[{HCA!r}] = {rates[HCA]}")
            rates[HCA] = hca_from_ratios
    if rates:
        d["compress_rates"] = rates
    if d.get("mlp_layer_types") is None and num_hash is not None:
        if not isinstance(num_hash, int) or isinstance(num_hash, bool) or num_hash < 0:
            raise ValueError(f"ModelConfig.num_hash_layers: must be an integer >= 0, got {num_hash!r}")
        d["mlp_layer_types"] = [HASH_MOE] * min(n, num_hash) + [MOE] * max(0, n - num_hash)
    if d.get("partial_rotary_factor") is None and rope_head is not None:
        head_dim = d.get("head_dim", defaults.head_dim)
        if not isinstance(rope_head, (int, float)) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"ModelConfig.qk_rope_head_dim: must be a number of dims, got {rope_head!r} "
                             f"(head_dim {head_dim!r})")
        d["partial_rotary_factor"] = rope_head / head_dim
    if d.get("rope_parameters") is None and rope_scaling is not None:
        if not isinstance(rope_scaling, dict):
            raise ValueError(f"ModelConfig.rope_parameters: rope_scaling must be a dict, got {rope_scaling!r}")
        d["rope_parameters"] = dict(rope_scaling)
    q = d.get("quantization_config")
    if expert_dtype is not None and isinstance(q, dict) and "expert_dtype" not in q:
        d["quantization_config"] = {**q, "expert_dtype": expert_dtype}
    for k in ("layer_types", "mlp_layer_types"):
        if isinstance(d.get(k), list):
            d[k] = d[k][:n]
    return d


def from_official_args(d: dict) -> dict:
    """The official ``inference/config.json`` (``ModelArgs``) names -> HF / legacy names."""
    d = dict(d)
    for old, new in OFFICIAL_ARG_NAMES.items():
        if old in d:
            v = d.pop(old)
            if new is not None:
                d.setdefault(new, v)
    if "rope_head_dim" in d:
        d.setdefault("qk_rope_head_dim", d.pop("rope_head_dim"))
    if "n_hash_layers" in d:
        d.setdefault("num_hash_layers", d.pop("n_hash_layers"))
    factor = d.pop("rope_factor", None)
    orig = d.pop("original_seq_len", None)
    beta_fast, beta_slow = d.pop("beta_fast", 32), d.pop("beta_slow", 1)
    # ModelArgs applies YaRN (to the compressed layers only) when original_seq_len > 0.
    if factor and orig:
        d.setdefault("rope_scaling", {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
                                      "beta_fast": beta_fast, "beta_slow": beta_slow})
    if d.get("quantization_config") is None and d.get("_dtype") == "fp8":
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": d.get("_scale_fmt") or "ue8m0",
                                    "weight_block_size": [128, 128]}
        if d.get("_expert_dtype"):
            d["quantization_config"]["expert_dtype"] = d["_expert_dtype"]
    return d


def layer_types_from_ratios(ratios: Any, n: int, csa_rate: int) -> tuple[list[str], int | None]:
    """Legacy per-layer ``compress_ratios`` -> (layer_types for the first n layers, the HCA rate they use or None).

    0 (and 1) = no compressor; ``csa_rate`` (4) = CSA, with overlap and indexer; any other positive ratio = HCA.
    Entries past n (the MTP layers of the released configs) are dropped.
    """
    if not isinstance(ratios, (list, tuple)):
        raise ValueError(f"ModelConfig.compress_ratios: must be a list of per-layer ratios, got {ratios!r}")
    if len(ratios) < n:
        raise ValueError(f"ModelConfig.compress_ratios: has {len(ratios)} entries but num_hidden_layers is {n}")
    bad = [r for r in ratios if not isinstance(r, int) or isinstance(r, bool) or r < 0]
    if bad:
        raise ValueError(f"ModelConfig.compress_ratios: ratios must be integers >= 0, got {bad}")
    types, hca = [], set()
    for r in ratios[:n]:
        if r in (0, 1):
            types.append(SLIDING)
        elif r == csa_rate:
            types.append(CSA)
        else:
            types.append(HCA)
            hca.add(r)
    if len(hca) > 1:
        raise ValueError(f"ModelConfig.compress_ratios: more than one HCA ratio {sorted(hca)}; V4 has one")
    return types, (hca.pop() if hca else None)
