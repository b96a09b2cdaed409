"""Loading an official-layout checkpoint at its stored size: a model whose FP8, FP4 and BF16 weights stay in the
memory-mapped files (``dsv4.model.packed``), and writing such a model back byte for byte.

``load_packed(path)`` builds the model on the meta device, puts a ``PackedLinear`` where the checkpoint stores a
projection as FP8 (and for the BF16 LM head), a ``PackedEmbedding`` for the embedding and ``PackedExperts`` for the
routed experts, all over tensors mapped from the files (``dsv4.weights.files.map_tensors``): nothing of them is read
before a product needs it. The few small tensors left (norms, mHC, sinks, compressor and router weights, about 0.1% of
V4-Flash) are materialized in the compute dtype. What the checkpoint holds is checked against the model before any
of it is used: a missing, unexpected or mis-shaped tensor, a scale of the wrong shape, an unknown quantization config
is an error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.weights.files import map_tensors, read_headers
from dsv4.weights.names import ONE_EXPERT, official_state_of, official_to_internal

_EMBED, _HEAD = "embed.weight", "head.weight"
_SCALE = re.compile(r"^(.*)\.(scale|weight_scale_inv)$")
_EXPERT_TENSOR = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.(weight|scale|weight_scale_inv)$")
_KNOWN_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}


def is_official_layout(names) -> bool:
    """Whether stored tensor names are DeepSeek's official layout (no ``model.`` prefix, ``head.weight``)."""
    return not any(n.startswith("model.") or n == "lm_head.weight" for n in names)


def is_packed_layout(names) -> bool:
    """Whether stored tensor names are DeepSeek's official layout with quantized weights (``X.weight`` beside
    ``X.scale``), the layout ``load_packed`` keeps as it is."""
    names = set(names)
    return is_official_layout(names) and any(n.endswith(".scale") and n[:-len("scale")] + "weight" in names
                                             for n in names)


def check_quantization_config(config: ModelConfig, source: str) -> None:
    """Refuse a ``quantization_config`` other than the releases' (FP8 E4M3, UE8M0 scales, 128x128 blocks)."""
    q = config.quantization_config
    if q is None:
        return
    odd = {k: q.get(k) for k, v in _KNOWN_QUANT.items() if k in q and q.get(k) != v}
    if odd:
        raise ValueError(f"{source}: unknown quantization_config {odd} (dsv4 reads {_KNOWN_QUANT})")


def expert_slice(n_experts: int, ranks: tuple[int, int] | None) -> tuple[int, int]:
    """The routed experts [lo, hi) of each layer that rank ``r`` of ``n`` holds (``ranks`` = (r, n); None: all):
    the ``r``-th of ``n`` equal slices. ``n`` must divide ``n_experts``."""
    if ranks is None:
        return 0, n_experts
    rank, size = ranks
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"expert parallelism: the number of ranks must be a positive integer, got {size!r}")
    if n_experts % size:
        fits = [d for d in range(1, n_experts + 1) if n_experts % d == 0]
        raise ValueError(f"expert parallelism: {size} ranks do not divide the {n_experts} routed experts of a layer "
                         f"evenly; launch a number of processes among {fits}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"expert parallelism: rank {rank!r} is not one of 0..{size - 1}")
    per = n_experts // size
    return rank * per, (rank + 1) * per


def load_packed(path: str | Path, config: ModelConfig | None = None, compute_dtype: torch.dtype = torch.float32,
                headers: dict | None = None, experts: tuple[int, int] | None = None):
    """The model of the official-layout checkpoint at ``path`` with its weights kept as stored (see the module
    docstring); products in ``compute_dtype``. ``headers``: the checkpoint's ``read_headers``, if already read.
    ``experts`` (rank, ranks): hold only that rank's slice of each layer's routed experts (``expert_slice``; the
    other experts' tensors are not even mapped), as ``PackedExperts(first=lo)`` whose forward takes local indices:
    the model runs once ``dsv4.parallel.inference`` has installed the token exchange among the ranks."""
    from dsv4.model import Transformer
    from dsv4.model.moe import Experts
    from dsv4.model.packed import PackedEmbedding, PackedExperts, PackedLinear

    path = Path(path)
    config = config or ModelConfig.from_json(path / "config.json")
    check_quantization_config(config, str(path / "config.json"))
    lo, hi = expert_slice(config.n_routed_experts, experts)
    if experts is not None:  # other ranks' experts: not mapped (out-of-range indices are kept, to be refused below)
        headers = read_headers(path) if headers is None else headers
        headers = {k: v for k, v in headers.items()
                   if not (m := _EXPERT_TENSOR.search(k)) or lo <= int(m.group(1)) < hi
                   or int(m.group(1)) >= config.n_routed_experts}
    stored = map_tensors(path, headers)
    scales = {}
    for name in list(stored):
        m = _SCALE.match(name)
        if m and m.group(1) + ".weight" in stored:
            scales[m.group(1) + ".weight"] = stored.pop(name)
    if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in stored):
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(config)

    taken: set[str] = set()  # stored names now held by packed modules

    def replace(name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)

    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in list(stored):
        m = ONE_EXPERT.match(name)
        if m:
            prefix, e, w = m.group(1), int(m.group(2)), m.group(3)
            per = experts.setdefault(prefix, {}).setdefault(e, {})
            per[w], per[f"{w}_scale"] = stored[name], scales.get(name)
            taken.add(name)
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        if isinstance(module, Experts):
            per = experts.pop(name, None)
            if per is None:
                raise ValueError(f"{path}: the checkpoint has no routed experts for {name}")
            want = config.n_routed_experts
            missing = [e for e in range(lo, hi) if e not in per or any(w not in per[e] for w in ("w1", "w2", "w3"))]
            if missing or len(per) != hi - lo:
                raise ValueError(f"{path}: {name} needs experts 0..{want - 1} with w1, w2, w3; "
                                 f"missing or extra: {missing[:8] or sorted(set(per) - set(range(want)))[:8]}")
            packed = PackedExperts([per[e] for e in range(lo, hi)], module.limit, compute_dtype, first=lo)
            _check_experts(packed, module, name, path)
            replace(name, packed)
        elif isinstance(module, nn.Linear) and key in stored and (key in scales or name == "head"):
            lin = _packed_linear(PackedLinear, stored[key], scales.get(key), compute_dtype, name, path)
            if (lin.out_features, lin.in_features) != tuple(module.weight.shape):
                raise ValueError(f"{path}: {key} holds a {lin.out_features} x {lin.in_features} matrix, the "
                                 f"config makes it {tuple(module.weight.shape)}")
            replace(name, lin)
            taken.add(key)
        elif name == "embed" and _EMBED in stored:
            if tuple(stored[_EMBED].shape) != tuple(module.weight.shape):
                raise ValueError(f"{path}: {_EMBED} has shape {tuple(stored[_EMBED].shape)}, the config makes it "
                                 f"{tuple(module.weight.shape)}")
            replace(name, PackedEmbedding(stored[_EMBED], compute_dtype))
            taken.add(_EMBED)
    if experts:
        raise ValueError(f"{path}: routed experts for modules the config does not have: {sorted(experts)[:5]}")
    unused_scales = sorted(k for k in scales if k not in taken)
    if unused_scales:
        raise ValueError(f"{path}: scale tensors for weights that are not FP8 projections or experts: "
                         f"{unused_scales[:5]}")

    model.to_empty(device="cpu")  # the small tensors left; packed modules keep theirs
    model.to(compute_dtype)
    rest = {official_to_internal(k): v for k, v in stored.items() if k not in taken}
    _load_rest(model, rest, path)
    model.stored_dtypes = {k: v.dtype for k, v in stored.items() if k not in taken}
    model.init_nonpersistent_buffers()
    return model.eval()


def _packed_linear(cls, weight, scale, dtype, name, path):
    try:
        return cls(weight, scale, dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {name}.weight: {e}") from None


def _check_experts(packed, module, name, path) -> None:
    """Every stored expert has the shapes the config gives (w1 / w3 [I, d], w2 [d, I]) and a usable scale."""
    from dsv4.model.packed import FP4_BLOCK, FP8_BLOCK

    want = {"w1": tuple(module.w1.shape[1:]), "w2": tuple(module.w2.shape[1:]), "w3": tuple(module.w3.shape[1:])}
    for e, ex in enumerate(packed.stored, packed.first):
        for w, (rows, cols) in want.items():
            t, s = getattr(ex, w), getattr(ex, f"{w}_scale")
            where = f"{path}: {name}.{e}.{w}.weight"
            if t.dtype in (torch.int8, torch.uint8):
                shape, sshape = (rows, cols // 2), (rows, cols // FP4_BLOCK)
            else:
                shape, sshape = (rows, cols), (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
            if tuple(t.shape) != shape:
                raise ValueError(f"{where} has shape {tuple(t.shape)} ({t.dtype}), the config needs {shape}")
            if s is None and not (t.is_floating_point() and t.dtype != torch.float8_e4m3fn):
                raise ValueError(f"{where} is stored as {t.dtype} but has no scale tensor")
            if s is not None and tuple(s.shape) != sshape:
                raise ValueError(f"{where}: its scale has shape {tuple(s.shape)}, expected {sshape}")


def _load_rest(model, rest: dict[str, torch.Tensor], path) -> None:
    """Copy the tensors not held by packed modules into the model's remaining parameters and buffers."""
    from dsv4.model.packed import Stored

    held = set()
    for mname, module in model.named_modules():
        if isinstance(module, Stored):
            held |= {f"{mname}.{b}" if mname else b for b in module._stored}
    own = {k: v for k, v in model.state_dict().items() if k not in held}
    missing = sorted(set(own) - set(rest))
    unexpected = sorted(set(rest) - set(own))
    shapes = [f"{k}: checkpoint {tuple(rest[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in rest and tuple(rest[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {unexpected[:10]}")
    if shapes:
        problems.append("mis-shaped tensor(s): " + "; ".join(shapes[:10]))
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the model: " + " | ".join(problems))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(rest[k].to(t.dtype))


def packed_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors of a packed model under their official names as stored: the mapped bytes of the packed modules,
    the other tensors in the dtypes the checkpoint held them in (``model.stored_dtypes``, exact: they were widened
    on loading). What ``save_official`` writes back, bit for bit."""
    dtypes = getattr(model, "stored_dtypes", {})
    return {k: t.detach().to(dtypes.get(k, t.dtype)) for k, t in official_state_of(model, as_stored=True).items()}


def stored_format(model) -> tuple[bool, bool]:
    """(FP8 projections, FP4 experts): how a packed model's weights are stored, in ``save_official``'s terms."""
    from dsv4.model.packed import PackedExperts, PackedLinear

    fp8 = any(isinstance(m, PackedLinear) and m.fmt == "fp8" for m in model.modules())
    fp4 = any(isinstance(m, PackedExperts) and m.stored[0].w1.dtype in (torch.int8, torch.uint8)
              for m in model.modules())
    return fp8, fp4


def is_packed(model) -> bool:
    """Whether some of ``model``'s weights are kept as stored (``dsv4.model.packed``)."""
    from dsv4.model.packed import Stored

    return any(isinstance(m, Stored) for m in model.modules())
