"""ModelConfig: the shape of a DeepSeek-V4 model, its presets and its validation.

Field names are those of HF transformers' ``DeepseekV4Config`` so that a ``config.json`` moves between the two
unchanged. ``from_dict`` / ``from_json`` also read the legacy fields of DeepSeek's released configs
(``compress_ratios``, ``num_hash_layers``, ...) and the ``inference/config.json`` names of the official reference code
(``dim``, ``n_layers``, ...): ``dsv4.config_compat`` folds them into the HF fields first. Facts: spec sections 1 and 9.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)
# router affinities: V4's sqrt(softplus(.)), and for experiments (``dsv4 lab routing``) V3's sigmoid and a softmax
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
HC_MODES = ("mhc", "hc", "residual")  # ModelConfig.hc_mode
EXPERIMENT_MODEL_TYPE = "dsv4_experiment"  # config.json's model_type for an hc_mode other than mhc (dsv4 only)

def _default_rope_parameters(rope_theta: float, compress_rope_theta: float, prf: float, flat: dict | None) -> dict:
    """HF's nesting: {"main": plain RoPE at rope_theta, "compress": ``flat`` (YaRN or plain) at compress_rope_theta}."""
    main = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": prf}
    compress: dict[str, Any] = dict(flat or {})
    compress.setdefault("rope_type", "default")
    compress["rope_theta"] = compress_rope_theta
    compress["partial_rotary_factor"] = prf
    if compress["rope_type"] == "yarn":
        # V4 never applies YaRN's attention magnitude factor (spec 10.3).
        compress["attention_factor"] = 1.0
    return {"main": main, "compress": compress}


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    layer_types: list[str] | None = None
    compress_rates: dict[str, int] | None = None
    compress_rope_theta: float = 160000.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: list[str] | None = None
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    partial_rotary_factor: float | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    # Not an HF field: the official checkpoints' quantization (None for plain float weights).
    quantization_config: dict | None = field(default=None, repr=False)
    # Not an HF field, for experiments (``dsv4 lab mhc``): the residual connection. "mhc" (DeepSeek-V4's
    # manifold-constrained hyper-connections), "hc" (unconstrained hyper-connections: the same streams and mixing
    # without the Sinkhorn projection and the sigmoid bounds) or "residual" (a plain residual). Written to
    # config.json only when it is not "mhc".
    hc_mode: str = "mhc"

    def __post_init__(self) -> None:
        # Shape checks that must hold before the defaults below can be derived; validate() does the rest.
        n = self.num_hidden_layers
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"ModelConfig.num_hidden_layers: must be a positive integer, got {n!r}")
        if self.compress_rates is None:
            self.compress_rates = {CSA: 4, HCA: 128}
        elif not isinstance(self.compress_rates, dict):
            raise ValueError(f"ModelConfig.compress_rates: must be a dict {{layer type: rate}}, "
                             f"got {self.compress_rates!r}")
        else:
            # a rate not given keeps its default (a model without HCA layers need not name the HCA rate)
            self.compress_rates = {CSA: 4, HCA: 128, **{str(k): v for k, v in self.compress_rates.items()}}
        for name in ("layer_types", "mlp_layer_types"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__")):
                raise ValueError(f"ModelConfig.{name}: must be a list of per-layer types, got {v!r}")
        if self.layer_types is None:
            # HF's default: two HCA layers, then CSA / HCA alternating (the V4-Pro schedule).
            self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 == 0 else HCA for i in range(max(n - 2, 0))]
        self.layer_types = list(self.layer_types)
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [HASH_MOE] * min(n, 3) + [MOE] * max(0, n - 3)
        self.mlp_layer_types = list(self.mlp_layer_types)
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = 64 / 512
        if not isinstance(self.partial_rotary_factor, (int, float)) or isinstance(self.partial_rotary_factor, bool):
            raise ValueError(f"ModelConfig.partial_rotary_factor: must be a number, got {self.partial_rotary_factor!r}")
        rp = self.rope_parameters if self.rope_parameters is not None else {}
        if not isinstance(rp, dict):
            raise ValueError(f"ModelConfig.rope_parameters: must be a dict, got {rp!r}")
        if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            self.rope_parameters = {"main": dict(rp["main"]), "compress": dict(rp["compress"])}
            for p in self.rope_parameters.values():
                if "type" in p:  # legacy spelling of rope_type
                    p.setdefault("rope_type", p.pop("type"))
        elif "main" in rp or "compress" in rp:
            raise ValueError("ModelConfig.rope_parameters: needs both a 'main' and a 'compress' dict, "
                             f"got keys {sorted(rp)}")
        else:
            # A flat dict (HF's legacy `rope_scaling` too) describes the compressed layers' RoPE; the main RoPE is
            # always plain. Anything but 'default' / 'yarn' is kept so that validate() names it.
            flat = dict(rp)
            if "type" in flat:
                flat.setdefault("rope_type", flat.pop("type"))
            flat.setdefault("rope_type", "default")
            self.rope_parameters = _default_rope_parameters(self.rope_theta, self.compress_rope_theta,
                                                            self.partial_rotary_factor, flat)
        self.validate()

    # ----------------------------------------------------------------------------------------------- derived facts
    @property
    def qk_rope_head_dim(self) -> int:
        return int(round(self.head_dim * self.partial_rotary_factor))

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    def compress_rate(self, layer_type: str) -> int:
        """Tokens per compressed entry for a layer type (0 for sliding-window-only layers)."""
        return 0 if layer_type == SLIDING else int(self.compress_rates[layer_type])

    def rope_kind(self, layer_type: str) -> str:
        """Which RoPE a layer uses: 'main' (plain) on sliding layers, 'compress' (YaRN) on CSA / HCA (spec 2.2.4)."""
        return "main" if layer_type == SLIDING else "compress"

    # -------------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ValueError("ModelConfig.<field>: ...")`` for the first inconsistent field."""
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        positive = ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts", "hc_mult",
                    "hc_sinkhorn_iters", "sliding_window", "o_groups", "o_lora_rank", "index_n_heads",
                    "index_head_dim", "index_topk", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            if not is_int(v) or v <= 0:
                raise bad(name, f"must be a positive integer, got {v!r}")
        for name in ("rms_norm_eps", "hc_eps", "rope_theta", "compress_rope_theta", "routed_scaling_factor"):
            v = getattr(self, name)
            if not is_num(v) or v <= 0:
                raise bad(name, f"must be a positive number, got {v!r}")
        if not is_num(self.initializer_range) or self.initializer_range < 0:
            raise bad("initializer_range", f"must be a number >= 0, got {self.initializer_range!r}")
        if self.num_key_value_heads != 1:
            raise bad("num_key_value_heads", f"DeepSeek-V4 has one shared K=V head, got {self.num_key_value_heads!r}")
        if self.n_shared_experts not in (0, 1) or isinstance(self.n_shared_experts, bool):
            raise bad("n_shared_experts", f"must be 0 or 1, got {self.n_shared_experts!r}")
        if not is_int(self.num_nextn_predict_layers) or self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", f"must be an integer >= 0, got {self.num_nextn_predict_layers!r}")
        if self.num_attention_heads % self.o_groups:
            raise bad("o_groups", f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                                  f"o_groups ({self.o_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"{self.num_experts_per_tok} is above the expert count "
                                             f"n_routed_experts={self.n_routed_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"DeepSeek-V4 routes with 'sqrtsoftplus' (experiments: 'sigmoid', "
                                      f"'softmax'), got {self.scoring_func!r}")
        if self.hc_mode not in HC_MODES:
            raise bad("hc_mode", f"must be one of {list(HC_MODES)}, got {self.hc_mode!r}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"DeepSeek-V4 experts use 'silu', got {self.hidden_act!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise bad("norm_topk_prob", f"must be true or false, got {self.norm_topk_prob!r}")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "DeepSeek-V4 keeps separate embedding and head weights")
        if self.swiglu_limit is not None and (not is_num(self.swiglu_limit) or self.swiglu_limit < 0):
            raise bad("swiglu_limit", f"must be a number >= 0 (0 = no clamp), got {self.swiglu_limit!r}")

        # RoPE: the last r = head_dim * partial_rotary_factor dims of each head rotate, in pairs.
        prf = self.partial_rotary_factor
        r = self.head_dim * prf
        if not (0 < prf <= 1):
            raise bad("partial_rotary_factor", f"must be in (0, 1], got {prf} (qk_rope_head_dim = {r:g} rope dims "
                                               f"with head_dim {self.head_dim})")
        if abs(r - round(r)) > 1e-6 or round(r) % 2:
            raise bad("partial_rotary_factor", f"head_dim * partial_rotary_factor = qk_rope_head_dim = {r:g} must "
                                               "be an even integer (RoPE rotates pairs of dims)")
        if self.qk_rope_head_dim > self.index_head_dim or self.index_head_dim % 2:
            raise bad("index_head_dim", f"{self.index_head_dim} must be even and hold the {self.qk_rope_head_dim} "
                                        "rope dims")

        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES)):
            if len(types) != self.num_hidden_layers:
                raise bad(name, f"has {len(types)} entries but num_hidden_layers is {self.num_hidden_layers}")
            unknown = [t for t in types if t not in allowed]
            if unknown:
                raise bad(name, f"unknown layer type(s) {unknown}; allowed: {list(allowed)}")

        unknown_rates = set(self.compress_rates) - {CSA, HCA}
        if unknown_rates:
            raise bad("compress_rates", f"unknown key(s) {sorted(unknown_rates)}; allowed: {[CSA, HCA]}")
        for key in (CSA, HCA):
            v = self.compress_rates[key]
            if not is_int(v) or v <= 0:
                raise bad("compress_rates", f"{key!r} must be a positive integer, got {v!r}")

        rp = self.rope_parameters
        if set(rp) != {"main", "compress"}:
            raise bad("rope_parameters", f"must have exactly the keys 'main' and 'compress', got {sorted(rp)}")
        for kind in ("main", "compress"):
            p = rp[kind]
            rope_type = p.get("rope_type", "default")
            if rope_type not in ("default", "yarn"):
                raise bad("rope_parameters", f"{kind}.rope_type {rope_type!r} is not 'default' or 'yarn'")
            theta = p.get("rope_theta")
            if not is_num(theta) or theta <= 0:
                raise bad("rope_parameters", f"{kind}.rope_theta must be a positive number, got {theta!r}")
            p_prf = p.get("partial_rotary_factor", prf)
            if not is_num(p_prf) or abs(p_prf - prf) > 1e-9:
                raise bad("rope_parameters", f"{kind}.partial_rotary_factor {p_prf!r} disagrees with "
                                             f"partial_rotary_factor {prf}")
            if rope_type == "yarn":
                factor = p.get("factor")
                if not is_num(factor) or factor < 1:
                    raise bad("rope_parameters", f"{kind} YaRN needs a 'factor' >= 1, got {factor!r}")
                orig = p.get("original_max_position_embeddings")
                if not is_int(orig) or orig <= 0:
                    raise bad("rope_parameters", f"{kind} YaRN needs a positive integer "
                                                 f"'original_max_position_embeddings', got {orig!r}")
                fast, slow = p.get("beta_fast", 32), p.get("beta_slow", 1)
                if not (is_num(fast) and is_num(slow) and fast > slow > 0):
                    raise bad("rope_parameters", f"{kind} YaRN needs beta_fast > beta_slow > 0, got "
                                                 f"beta_fast={fast!r}, beta_slow={slow!r}")
                if p.get("attention_factor", 1.0) != 1.0:
                    raise bad("rope_parameters", f"{kind}.attention_factor must be 1.0: DeepSeek-V4 applies no YaRN "
                                                 f"magnitude scaling (got {p['attention_factor']!r})")

    # ------------------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d.get("quantization_config") is None:
            d.pop("quantization_config")
        d["qk_rope_head_dim"] = self.qk_rope_head_dim
        if self.hc_mode == "mhc":  # V4's own: no hc_mode key
            d.pop("hc_mode")
            d["model_type"] = "deepseek_v4"
            d["architectures"] = ["DeepseekV4ForCausalLM"]
        else:  # a lab variant (hyper-connections without mHC's constraints, or a plain residual) is not DeepSeek-V4:
            # another model_type, so that transformers refuses it instead of loading it as V4 without hc_mode
            d["model_type"] = EXPERIMENT_MODEL_TYPE
            d["architectures"] = ["Dsv4ExperimentForCausalLM"]
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Build from a config dict: HF ``DeepseekV4Config`` names, legacy DeepSeek names, or official ModelArgs names.

        The legacy and official names are folded into HF's by ``dsv4.config_compat.to_hf_fields`` (spec 1.2, 9):
        ``compress_ratios`` -> ``layer_types`` (and the HCA rate), ``num_hash_layers`` -> ``mlp_layer_types``,
        ``qk_rope_head_dim`` -> ``partial_rotary_factor``, ``rope_scaling`` (YaRN) -> ``rope_parameters['compress']``,
        ``expert_dtype`` -> ``quantization_config``. Unknown keys (``torch_dtype``, ``transformers_version``, ...) are
        ignored.
        """
        from dsv4.config_compat import to_hf_fields

        if not isinstance(raw, dict):
            raise ValueError(f"ModelConfig.from_dict: a config must be a dict, got {type(raw).__name__}")
        d = to_hf_fields(raw, cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if isinstance(kwargs.get("eos_token_id"), list) and len(kwargs["eos_token_id"]) == 1:
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Read a ``config.json`` (or a directory holding one); see :meth:`from_dict` for the names understood."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config must be a JSON object, got a JSON {type(raw).__name__}")
        return cls.from_dict(raw)

    def replace(self, **changes: Any) -> "ModelConfig":
        d = dataclasses.asdict(self)
        d.update(changes)
        if ("rope_theta" in changes or "compress_rope_theta" in changes or "partial_rotary_factor" in changes) \
                and "rope_parameters" not in changes:
            d["rope_parameters"] = {k: v for k, v in self.rope_parameters["compress"].items()
                                    if k not in ("rope_theta", "partial_rotary_factor")} \
                if self.rope_parameters["compress"].get("rope_type") == "yarn" else None
        return ModelConfig(**d)

    # --------------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()

    def num_parameters(self, activated: bool = False, include_mtp: bool = True) -> int:
        """Parameter count of the main model plus (with ``include_mtp``) the MTP blocks.

        With ``activated``: what one token uses, i.e. top-k routed experts instead of all, and no embedding table
        (a lookup), the convention of the report's "284B total / 13B activated" (which exclude MTP).
        """
        d, h, c = self.hidden_size, self.num_attention_heads, self.head_dim
        hc = self.hc_mult
        mix = (2 + hc) * hc
        per_type = {}
        for lt in LAYER_TYPES:
            attn = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * c + d * c + c
            attn += h * c * self.o_lora_rank + self.o_groups * self.o_lora_rank * d + h
            if lt != SLIDING:
                m = self.compress_rate(lt)
                width = 2 * c if lt == CSA else c
                attn += 2 * d * width + m * width + c
            if lt == CSA:
                ic = self.index_head_dim
                attn += 2 * d * 2 * ic + self.compress_rate(lt) * 2 * ic + ic
                attn += self.q_lora_rank * self.index_n_heads * ic + d * self.index_n_heads
            per_type[lt] = attn
        expert = 3 * d * self.moe_intermediate_size
        n_exp = self.num_experts_per_tok if activated else self.n_routed_experts
        ffn = n_exp * expert + self.n_shared_experts * expert + self.n_routed_experts * d
        block_common = 2 * d + 2 * (mix * hc * d + mix + 3)
        total = 0
        for lt in self.layer_types:
            total += per_type[lt] + ffn + block_common
        total += (1 if activated else 2) * self.vocab_size * d + d + hc * hc * d + hc + 1
        mtp = per_type[SLIDING] + ffn + block_common + 2 * d * d + 3 * d + hc * hc * d + hc + 1
        if include_mtp:
            total += self.num_nextn_predict_layers * mtp
        return total


def _v4_schedule(n: int, first: list[str]) -> list[str]:
    return first + [CSA if i % 2 == 0 else HCA for i in range(n - len(first) - 1)] + [CSA]


_V4_YARN = {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
            "beta_fast": 32, "beta_slow": 1}


def _tiny() -> ModelConfig:
    # A couple of million parameters; every mechanism on, at rates small enough for a test sequence.
    return ModelConfig(
        vocab_size=4096, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, head_dim=64, q_lora_rank=64, num_experts_per_tok=2, n_routed_experts=8,
        routed_scaling_factor=1.5, max_position_embeddings=65536,
        layer_types=[SLIDING, CSA, HCA, CSA], compress_rates={CSA: 4, HCA: 16},
        mlp_layer_types=[HASH_MOE, MOE, MOE, MOE], sliding_window=16, o_groups=2, o_lora_rank=64,
        index_n_heads=8, index_head_dim=32, index_topk=8, partial_rotary_factor=0.25,
    )


def _small() -> ModelConfig:
    # Tens of millions of parameters with the report's ratios: window 128, rates 4 / 128, top-k 512 (spec 11).
    return ModelConfig(
        vocab_size=16384, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=8, head_dim=128, q_lora_rank=256, num_experts_per_tok=2, n_routed_experts=16,
        routed_scaling_factor=1.5, max_position_embeddings=1048576,
        layer_types=[SLIDING, SLIDING, CSA, HCA, CSA, HCA, CSA, HCA], compress_rates={CSA: 4, HCA: 128},
        mlp_layer_types=[HASH_MOE, HASH_MOE] + [MOE] * 6, sliding_window=128, o_groups=2, o_lora_rank=256,
        index_n_heads=8, index_head_dim=64, index_topk=512, partial_rotary_factor=0.25,
    )


def _v4_flash() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
        num_attention_heads=64, head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256,
        routed_scaling_factor=1.5, layer_types=_v4_schedule(43, [SLIDING, SLIDING]),
        mlp_layer_types=[HASH_MOE] * 3 + [MOE] * 40, sliding_window=128, o_groups=8, o_lora_rank=1024,
        index_n_heads=64, index_head_dim=128, index_topk=512, rope_parameters=dict(_V4_YARN),
    )


def _v4_pro() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61,
        num_attention_heads=128, head_dim=512, q_lora_rank=1536, num_experts_per_tok=6, n_routed_experts=384,
        routed_scaling_factor=2.5, layer_types=_v4_schedule(61, [HCA, HCA]),
        mlp_layer_types=[HASH_MOE] * 3 + [MOE] * 58, sliding_window=128, o_groups=16, o_lora_rank=1024,
        index_n_heads=64, index_head_dim=128, index_topk=1024, rope_parameters=dict(_V4_YARN),
    )


PRESETS = {"tiny": _tiny, "small": _small, "v4-flash": _v4_flash, "v4-pro": _v4_pro}
