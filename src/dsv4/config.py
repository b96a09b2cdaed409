"""ModelConfig: the shape of a DeepSeek-V4 model.

Field names are those of HF transformers' ``DeepseekV4Config`` so that a ``config.json`` moves between the two
unchanged. ``from_json`` also reads the legacy fields of DeepSeek's released configs (``compress_ratios``,
``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``) and the ``inference/config.json`` names of the official
reference code (``dim``, ``n_layers``, ``window_size``, ...). Facts: spec sections 1 and 9.
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

# Legacy per-layer integers of DeepSeek's configs (0 and 1 both mean "no compressor").
_RATIO_TO_TYPE = {0: SLIDING, 1: SLIDING, 4: CSA, 128: HCA}

# The official inference/config.json (ModelArgs) names -> HF names.
_OFFICIAL_ARG_NAMES = {
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
    "dtype": None,
    "scale_fmt": None,
    "expert_dtype": None,
    "scale_dtype": None,
}


def _default_rope_parameters(rope_theta: float, compress_rope_theta: float, prf: float, yarn: dict | None) -> dict:
    main = {"rope_type": "default", "rope_theta": float(rope_theta), "partial_rotary_factor": prf}
    compress: dict[str, Any] = {"rope_type": "default", "rope_theta": float(compress_rope_theta),
                                "partial_rotary_factor": prf}
    if yarn:
        compress.update(yarn)
        compress["rope_type"] = "yarn"
        compress["rope_theta"] = float(compress_rope_theta)
        compress["partial_rotary_factor"] = prf
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

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.compress_rates is None:
            self.compress_rates = {CSA: 4, HCA: 128}
        else:
            self.compress_rates = {str(k): int(v) for k, v in self.compress_rates.items()}
        if self.layer_types is None:
            # HF's default: two HCA layers, then CSA / HCA alternating (the V4-Pro schedule).
            self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 == 0 else HCA for i in range(max(n - 2, 0))]
        self.layer_types = list(self.layer_types)
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [HASH_MOE] * min(n, 3) + [MOE] * max(0, n - 3)
        self.mlp_layer_types = list(self.mlp_layer_types)
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = 64 / 512
        rp = self.rope_parameters or {}
        if not (isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)):
            yarn = {k: v for k, v in rp.items() if k not in ("main", "compress")}
            if yarn.get("rope_type", yarn.get("type")) != "yarn":
                yarn = None
            else:
                yarn.pop("type", None)
            self.rope_parameters = _default_rope_parameters(self.rope_theta, self.compress_rope_theta,
                                                            self.partial_rotary_factor, yarn)
        else:
            self.rope_parameters = {"main": dict(rp["main"]), "compress": dict(rp["compress"])}
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
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}: {msg}")

        positive = ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts", "hc_mult",
                    "hc_sinkhorn_iters", "sliding_window", "o_groups", "o_lora_rank", "index_n_heads",
                    "index_head_dim", "index_topk", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, f"must be a positive integer, got {v!r}")
        if self.num_key_value_heads != 1:
            raise bad("num_key_value_heads", f"DeepSeek-V4 has one shared K=V head, got {self.num_key_value_heads}")
        if self.n_shared_experts not in (0, 1):
            raise bad("n_shared_experts", f"must be 0 or 1, got {self.n_shared_experts}")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", f"must be >= 0, got {self.num_nextn_predict_layers}")
        if self.num_attention_heads % self.o_groups:
            raise bad("o_groups", f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                                  f"o_groups ({self.o_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"{self.num_experts_per_tok} is above the expert count "
                                             f"n_routed_experts={self.n_routed_experts}")
        if self.scoring_func != "sqrtsoftplus":
            raise bad("scoring_func", f"DeepSeek-V4 routes with 'sqrtsoftplus', got {self.scoring_func!r}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"DeepSeek-V4 experts use 'silu', got {self.hidden_act!r}")
        if not (0 < self.partial_rotary_factor <= 1):
            raise bad("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        r = self.head_dim * self.partial_rotary_factor
        if abs(r - round(r)) > 1e-6 or round(r) % 2:
            raise bad("partial_rotary_factor", f"head_dim * partial_rotary_factor = {r} must be an even integer")
        if self.qk_rope_head_dim > self.head_dim:
            raise bad("qk_rope_head_dim", f"rope dims {self.qk_rope_head_dim} are above head_dim {self.head_dim}")
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
        for key in (CSA, HCA):
            v = self.compress_rates.get(key)
            if not isinstance(v, int) or v <= 0:
                raise bad("compress_rates", f"{key!r} must be a positive integer, got {v!r}")
        unknown_rates = set(self.compress_rates) - {CSA, HCA}
        if unknown_rates:
            raise bad("compress_rates", f"unknown keys {sorted(unknown_rates)}")
        for kind in ("main", "compress"):
            p = self.rope_parameters.get(kind)
            if not isinstance(p, dict) or "rope_theta" not in p:
                raise bad("rope_parameters", f"needs a {kind!r} entry with a 'rope_theta'")
            if p.get("rope_type", "default") not in ("default", "yarn"):
                raise bad("rope_parameters", f"{kind}.rope_type {p.get('rope_type')!r} is not 'default' or 'yarn'")
            if p.get("rope_type") == "yarn":
                for k in ("factor", "original_max_position_embeddings"):
                    if k not in p:
                        raise bad("rope_parameters", f"{kind} YaRN needs {k!r}")
        if self.swiglu_limit is not None and self.swiglu_limit < 0:
            raise bad("swiglu_limit", f"must be >= 0, got {self.swiglu_limit}")

    # ------------------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d.get("quantization_config") is None:
            d.pop("quantization_config")
        d["qk_rope_head_dim"] = self.qk_rope_head_dim
        d["model_type"] = "deepseek_v4"
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        d = dict(raw)
        if "text_config" in d and isinstance(d["text_config"], dict):
            d = dict(d["text_config"])
        # Official inference/config.json (ModelArgs) names.
        if "dim" in d or "n_layers" in d:
            for old, new in _OFFICIAL_ARG_NAMES.items():
                if old in d:
                    v = d.pop(old)
                    if new is not None:
                        d.setdefault(new, v)
            if "rope_head_dim" in d:
                d["qk_rope_head_dim"] = d.pop("rope_head_dim")
            if "n_hash_layers" in d:
                d["num_hash_layers"] = d.pop("n_hash_layers")
            if "rope_factor" in d or "original_seq_len" in d:
                factor = d.pop("rope_factor", None)
                orig = d.pop("original_seq_len", None)
                yarn = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
                        "beta_fast": d.pop("beta_fast", 32), "beta_slow": d.pop("beta_slow", 1)}
                if factor and orig:
                    d.setdefault("rope_scaling", yarn)
        legacy_ratios = d.pop("compress_ratios", None)
        num_hash = d.pop("num_hash_layers", None)
        rope_head = d.pop("qk_rope_head_dim", None)
        csa_rate = d.pop("compress_rate_csa", None)
        hca_rate = d.pop("compress_rate_hca", None)
        rope_scaling = d.pop("rope_scaling", None)
        n = d.get("num_hidden_layers", cls.num_hidden_layers)
        if legacy_ratios is not None and d.get("layer_types") is None:
            unknown = [r for r in legacy_ratios if r not in _RATIO_TO_TYPE and r not in (csa_rate, hca_rate)]
            if unknown:
                raise ValueError(f"ModelConfig.compress_ratios: unknown ratio(s) {unknown}; allowed 0, 4, 128")
            lt = []
            for r in legacy_ratios[:n]:
                if r in (0, 1):
                    lt.append(SLIDING)
                elif r == (csa_rate or 4):
                    lt.append(CSA)
                else:
                    lt.append(HCA)
            d["layer_types"] = lt
        if d.get("compress_rates") is None and (csa_rate or hca_rate):
            d["compress_rates"] = {CSA: csa_rate or 4, HCA: hca_rate or 128}
        if d.get("mlp_layer_types") is None and num_hash is not None:
            d["mlp_layer_types"] = [HASH_MOE] * min(n, num_hash) + [MOE] * max(0, n - num_hash)
        if d.get("partial_rotary_factor") is None and rope_head is not None:
            d["partial_rotary_factor"] = rope_head / d.get("head_dim", cls.head_dim)
        if d.get("rope_parameters") is None and isinstance(rope_scaling, dict):
            d["rope_parameters"] = dict(rope_scaling)
        for k in ("layer_types", "mlp_layer_types"):
            if d.get(k) is not None:
                d[k] = list(d[k])[:n]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if isinstance(kwargs.get("eos_token_id"), list) and len(kwargs["eos_token_id"]) == 1:
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config must be a JSON object")
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

    def num_parameters(self, activated: bool = False) -> int:
        """Parameter count of the main model plus MTP (with ``activated``: per token, top-k experts only)."""
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
        index_n_heads=4, index_head_dim=32, index_topk=8, partial_rotary_factor=0.25,
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
