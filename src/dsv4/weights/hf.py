"""HF transformers' checkpoint layout, and loading a model from any layout.

``save_pretrained`` writes what HF transformers 5.x writes (``dsv4.weights.names``: the official names under
``model.``), plain floats, which ``transformers.DeepseekV4ForCausalLM.from_pretrained`` loads; MTP weights go under
``mtp.`` with the official names (transformers ignores them). The target directory is replaced atomically
(``dsv4.atomic.write_directory_atomically``).

``from_pretrained`` reads a directory in HF layout (saved or in-memory names, plain or FP8 with
``weight_scale_inv``) or in DeepSeek's official layout (FP8 / FP4, ``dsv4.weights.official``), after recovering a
directory whose writer was killed (``dsv4.atomic.recover_directory``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dsv4.atomic import recover_directory, write_directory_atomically
from dsv4.config import ModelConfig
from dsv4.weights.files import read_tensors, write_safetensors
from dsv4.weights.names import (internal_to_official, keeps_fp32, official_state_of, official_to_hf_saved,
                                official_to_model_state)
from dsv4.weights.official import official_state

log = logging.getLogger(__name__)

_META_BUILD_ABOVE = 20_000_000  # parameters


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


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, numerics: str | None = None, *,
                    compute_dtype: torch.dtype = torch.float32, experts: tuple[int, int] | None = None):
    """Build a ``Transformer`` from a directory in HF or official layout (see the module docstring), after putting
    back the previous version of it if a writer was killed while replacing it.

    ``dtype`` None: an official-layout checkpoint with FP8 / FP4 weights keeps them as stored, memory-mapped
    (``dsv4.weights.packed.load_packed``; products in ``compute_dtype``); any other loads in float32. A ``dtype``
    loads every weight dequantized into that dtype (a materialized model). ``numerics`` (``dsv4.model.numerics``):
    default "official" for an official-layout checkpoint, "plain" for an HF-layout one. ``experts`` (rank, ranks):
    a packed model maps only that rank's slice of each layer's routed experts (``load_packed``; a materialized one
    loads whole: ``dsv4.parallel.inference.split_experts`` cuts it); a bad split is refused before any weight is
    read."""
    from dsv4.model.numerics import set_numerics
    from dsv4.weights.files import read_headers
    from dsv4.weights.packed import (check_quantization_config, expert_slice, is_official_layout, is_packed_layout,
                                     load_packed)

    path = Path(path)
    recover_directory(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    config = ModelConfig.from_json(path / "config.json")
    if experts is not None:
        expert_slice(config.n_routed_experts, experts)
    check_quantization_config(config, str(path / "config.json"))
    names = read_headers(path)
    if numerics is None:
        numerics = "official" if is_official_layout(names) else "plain"
    if dtype is None and is_packed_layout(names):
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"a packed model runs on the CPU; pass dtype= to load {path} materialized on {device}")
        return set_numerics(load_packed(path, config, compute_dtype, headers=names, experts=experts), numerics)
    return set_numerics(_materialized(path, config, dtype, device), numerics)


def _materialized(path: Path, config: ModelConfig, dtype: torch.dtype | None, device) -> torch.nn.Module:
    """A model with every weight dequantized into ``dtype`` (default float32)."""
    from dsv4.model import Transformer

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


def save_pretrained(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 4 << 30) -> None:
    """Write ``config.json`` and safetensors in the layout transformers writes (sharded above ``max_shard_bytes``).

    The weights are plain floats (``dtype``, or the model's), so the config carries no ``quantization_config`` even
    when the model was loaded from a quantized checkpoint. ``path`` is replaced atomically.
    """
    tensors = {}
    for name, t in official_state_of(model).items():
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not keeps_fp32(name):
            t = t.to(dtype)
        tensors[official_to_hf_saved(name)] = t.contiguous().cpu()
    config = model.config.replace(quantization_config=None)

    def write(tmp: Path) -> None:
        config.to_json(tmp / "config.json")
        write_safetensors(tmp, tensors, max_shard_bytes)

    write_directory_atomically(path, write)
