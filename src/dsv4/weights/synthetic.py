"""Random checkpoints in DeepSeek's released layout, for tests and benchmarks (the real files cannot be downloaded
here): ``write_synthetic(config, path)`` writes any config's tensors with the released names, dtypes and scales
(FP8 E4M3 projections with 128x128 UE8M0 scales, MXFP4 or FP8 routed experts, BF16 embedding, head and the other
matrices, FP32 mHC, sinks, ``ape`` and router bias), streamed tensor by tensor to the files, so that a checkpoint far
larger than memory is written in memory of one tensor. ``flash_slice_config()`` is a few layers of V4-Flash at its
real width.

Values: matrices about N(0, 0.02) (FP8: codes of a normal draw times 8 with the scale 2^-9; FP4: uniform codes
with the scale 2^-7, so |w| <= 0.047), norms 1, mHC as ``dsv4.model.init.init_weights`` starts it up to its
random part, sinks, ``ape`` and router bias 0, hash routing tables balanced. Deterministic: each tensor is drawn
from its own generator, seeded by ``seed`` and its name.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from dsv4.atomic import write_directory_atomically
from dsv4.config import CSA, HASH_MOE, HCA, MOE, ModelConfig
from dsv4.weights.files import SAFETENSORS_DTYPE
from dsv4.weights.names import keeps_fp32, official_state_of
from dsv4.weights.official import _OFFICIAL_EXPERT, _OFFICIAL_FP8, official_config_dict

_FP8_SCALE_EXP = -9  # FP8 codes ~ N(0, 8): values ~ N(0, 8 / 512 = 0.016)
_FP4_SCALE_EXP = -7  # uniform E2M1 codes (|code| <= 6, rms 2.9): values rms 0.023
_ROWS = 4096  # rows drawn at a time for large matrices


def flash_slice_config(layers: tuple[str, ...] = (CSA, HCA), mtp: int = 1) -> ModelConfig:
    """V4-Flash at its real width with only ``layers`` (default: a CSA layer, hash-routed as Flash's first layers
    are, then an HCA layer with learned routing) and ``mtp`` MTP blocks."""
    base = ModelConfig.preset("v4-flash")
    mlp = [HASH_MOE] + [MOE] * (len(layers) - 1)
    return base.replace(num_hidden_layers=len(layers), layer_types=list(layers), mlp_layer_types=mlp,
                        num_nextn_predict_layers=mtp)


def _tensor_specs(config: ModelConfig, fp4_experts: bool, dtype: torch.dtype) -> dict[str, tuple]:
    """Official name -> (kind, shape, dtype) for every tensor of the layout (scales included)."""
    from dsv4.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    specs = {}
    for name, t in official_state_of(model).items():
        shape = tuple(t.shape)
        base = name[:-len(".weight")]
        if _OFFICIAL_EXPERT.search(name) and fp4_experts:
            specs[name] = ("fp4", (shape[0], shape[1] // 2), torch.int8)
            specs[base + ".scale"] = ("fp4_scale", (shape[0], shape[1] // 32), _scale_dtype())
        elif _OFFICIAL_EXPERT.search(name) or _OFFICIAL_FP8.search(name):
            specs[name] = ("fp8", shape, torch.float8_e4m3fn)
            specs[base + ".scale"] = ("fp8_scale", tuple(-(-s // 128) for s in shape), _scale_dtype())
        elif not t.is_floating_point():
            specs[name] = ("table", shape, t.dtype)
        else:
            specs[name] = ("plain", shape, torch.float32 if keeps_fp32(name) else dtype)
    return specs


def _scale_dtype() -> torch.dtype:
    from dsv4.quant import SCALE_DTYPE

    return SCALE_DTYPE


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _scale(shape, exp: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, 2.0 ** exp).to(dtype)


def _plain_values(name: str, shape, gen: torch.Generator, config: ModelConfig) -> torch.Tensor:
    """A float32 value for one unquantized tensor (see the module docstring)."""
    n = config.hc_mult
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(("attn_sink", ".ape", "gate.bias")):
        return torch.zeros(shape)
    if name.endswith("_scale") and "hc_" in name:
        return torch.full(shape, 0.01)
    if name.endswith("_base") and "hc_" in name:
        base = torch.zeros(shape)
        if shape[0] == (2 + n) * n:  # [pre | post | comb]: comb starts near the identity
            base[2 * n:] = 4.0 * torch.eye(n).flatten()
        return base
    return torch.randn(shape, generator=gen) * 0.02


def _chunks(kind: str, name: str, shape, dtype, gen: torch.Generator, config: ModelConfig, layer_of: dict):
    """The bytes of one tensor, in pieces of at most ``_ROWS`` rows."""
    if kind == "fp4":
        for r0 in range(0, shape[0], _ROWS):
            rows = min(_ROWS, shape[0] - r0)
            yield torch.randint(0, 256, (rows, *shape[1:]), generator=gen, dtype=torch.uint8).view(torch.int8)
    elif kind == "fp8":
        for r0 in range(0, shape[0], _ROWS):
            rows = min(_ROWS, shape[0] - r0)
            yield (torch.randn((rows, *shape[1:]), generator=gen) * 8).clamp(-448, 448).to(torch.float8_e4m3fn)
    elif kind in ("fp4_scale", "fp8_scale"):
        yield _scale(shape, _FP4_SCALE_EXP if kind == "fp4_scale" else _FP8_SCALE_EXP, dtype)
    elif kind == "table":  # the hash routing table, as the model builds it
        from dsv4.model.moe import balanced_tid2eid

        yield balanced_tid2eid(config.vocab_size, config.n_routed_experts, config.num_experts_per_tok,
                               seed=layer_of.get(name, 0)).to(dtype)
    elif len(shape) == 2 and shape[0] > _ROWS:
        for r0 in range(0, shape[0], _ROWS):
            rows = min(_ROWS, shape[0] - r0)
            yield (torch.randn((rows, shape[1]), generator=gen) * 0.02).to(dtype)
    else:
        yield _plain_values(name, shape, gen, config).to(dtype)


def write_synthetic(config: ModelConfig, path: str | Path, seed: int = 0, fp4_experts: bool = True,
                    dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 4 << 30) -> dict:
    """Write a random checkpoint of ``config`` in the released layout at ``path`` (replaced atomically); returns
    ``{"bytes": payload bytes, "tensors": count, "parameters": ...}``."""
    specs = _tensor_specs(config, fp4_experts, dtype)
    layer_of = {name: int(name.split(".")[1]) for name in specs if name.startswith("layers.")}
    names = sorted(specs)
    nbytes = {k: math.prod(specs[k][1]) * torch.empty(0, dtype=specs[k][2]).element_size() for k in names}
    shards: list[list[str]] = [[]]
    size = 0
    for k in names:
        if shards[-1] and size + nbytes[k] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes[k]
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def write(tmp: Path) -> None:
        cfg = official_config_dict(config, fp8=True, fp4_experts=fp4_experts)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for fname, keys in zip(files, shards):
            header, at = {"__metadata__": {"format": "pt"}}, 0
            for k in keys:
                header[k] = {"dtype": SAFETENSORS_DTYPE[specs[k][2]], "shape": list(specs[k][1]),
                             "data_offsets": [at, at + nbytes[k]]}
                at += nbytes[k]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned
            with open(tmp / fname, "wb") as fh:
                fh.write(len(raw).to_bytes(8, "little"))
                fh.write(raw)
                for k in keys:
                    kind, shape, dt = specs[k]
                    written = 0
                    for piece in _chunks(kind, k, shape, dt, _generator(seed, k), config, layer_of):
                        data = piece.contiguous().view(torch.uint8).numpy().tobytes()
                        fh.write(data)
                        written += len(data)
                    if written != nbytes[k]:
                        raise AssertionError(f"synthetic writer: {k} wrote {written} bytes, expected {nbytes[k]}")
        if len(files) > 1:
            weight_map = {k: f for f, keys in zip(files, shards) for k in keys}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, indent=2) + "\n")

    write_directory_atomically(path, write)
    params = sum(math.prod(s) * (2 if kind == "fp4" else 1) for kind, s, _ in specs.values()
                 if not kind.endswith("scale"))
    return {"bytes": sum(nbytes.values()), "tensors": len(specs), "parameters": params}
