"""The official inference numerics (dsv4.model.numerics): each rule held to an independent re-implementation written
here from the spec (numpy: the E4M3 and E2M1 values enumerated from their bit layouts, BF16 rounding on the float32
bits, Hadamard by Sylvester's construction, power-of-two scales by exact comparisons), on the values the model itself
computes at the places the spec names; the logits of official numerics equal those of the model with every rounding
replaced by the re-implementation; prefill, cached decode, the reference path and DecodeState rows agree under
official numerics; "plain" is what a model built in code computes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsv4 import ModelConfig, Transformer
from dsv4.model import numerics as official
from dsv4.model.decode import DecodeState
from dsv4.model.indexer import topk_lower_index, topk_mask
from dsv4.model.linear import Linear
from dsv4.model.moe import Experts
from dsv4.model.rope import apply_rope
from dsv4.quant import bf16_round, fp8_act_round, hadamard
from lively import lively
from numerics import assert_close_scaled, logits_in_calls, prefill_rows

VOCAB = 257


# ------------------------------------------------------------------------------------------------ re-implementation
def e4m3_values() -> np.ndarray:
    """The non-negative FP8 E4M3 (fn) values in code order: 4 exponent bits (bias 7), 3 mantissa bits, subnormals at
    exponent 0, no infinity, code 0x7F is NaN. 127 values, 0 ... 448."""
    out = []
    for e in range(16):
        for m in range(8):
            if (e, m) == (15, 7):
                continue
            out.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(out)


E4M3 = e4m3_values()
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # code order: 2 exponent bits (bias 1), 1 mantissa bit


def to_grid(v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Nearest value of ``grid`` (ascending, index = code) to each |v| <= grid.max(), ties to the even code, sign
    kept."""
    a = np.abs(v)
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    dl, dh = a - grid[lo], grid[hi] - a
    pick = np.where(dl < dh, lo, np.where(dh < dl, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.copysign(grid[pick], v)


def pow2_scale(amax: np.ndarray, qmax: float, floor: float) -> np.ndarray:
    """The least power of two 2^e with qmax 2^e >= max(amax, floor), by exact comparisons."""
    amax = np.maximum(amax, floor)
    e = np.ceil(np.log2(amax / qmax))
    e = np.where(qmax * 2.0 ** (e - 1) >= amax, e - 1, e)
    e = np.where(qmax * 2.0 ** e < amax, e + 1, e)
    return 2.0 ** e


def ref_tiles(x, block: int, grid: np.ndarray, floor: float) -> np.ndarray:
    """Quantize-dequantize along the last dim in tiles of ``block`` (the last one shorter if need be): per tile the
    power-of-two scale of its amax, each value / scale rounded to the grid, times the scale (float64)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    qmax = grid[-1]
    for a in range(0, x.shape[-1], block):
        t = x[..., a:a + block]
        s = pow2_scale(np.abs(t).max(-1, keepdims=True), qmax, floor)
        out[..., a:a + block] = to_grid(np.clip(t / s, -qmax, qmax), grid) * s
    return out


def ref_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Spec 6.4 / 2.2 item 5: E4M3 in 1 x block tiles, UE8M0 scales; amax floored at 1e-4 (the official kernel)."""
    return torch.from_numpy(ref_tiles(x.detach().double().numpy(), block, E4M3, 1e-4)).to(x.dtype)


def ref_fp4(x: torch.Tensor) -> torch.Tensor:
    """Spec 6.4: MXFP4, E2M1 in 1x32 tiles, scale 2^ceil(log2(amax / 6)), amax floored at 6 2^-126."""
    return torch.from_numpy(ref_tiles(x.detach().double().numpy(), 32, E2M1, 6 * 2.0 ** -126)).to(x.dtype)


def ref_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest BF16 (the top 16 bits), ties to even, by integer arithmetic on the bits."""
    bits = x.detach().float().contiguous().numpy().view(np.uint32).astype(np.uint64)
    low, top = bits & 0xFFFF, bits >> 16
    up = (low > 0x8000) | ((low == 0x8000) & (top & 1 == 1))
    out = ((top + up) << 16).astype(np.uint32).view(np.float32)
    return torch.from_numpy(out.copy()).to(x.dtype)


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def ref_kv(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Spec 2.2 item 5 / 6.4: the non-RoPE dims FP8 in blocks of 64, the RoPE dims BF16."""
    nope = kv.shape[-1] - rope_dim
    return torch.cat([ref_fp8(kv[..., :nope], 64), ref_bf16(kv[..., nope:])], -1)


# ------------------------------------------------------------------------------------------------------ models
def tiny(dtype=torch.float32, numerics="official", **changes):
    # window 16, CSA rate 4 (top-8), HCA rate 16; 48 non-RoPE dims (one short KV tile), hidden 128, latent 64
    cfg = ModelConfig.preset("tiny").replace(vocab_size=VOCAB, **changes)
    torch.manual_seed(0)
    return official.set_numerics(lively(Transformer(cfg).eval()).to(dtype), numerics)


def whole_tiles(dtype=torch.float32, numerics="official"):
    """Head dim 160 with 32 RoPE dims: the 128 non-RoPE dims are two whole KV tiles of 64, as in the released 448."""
    return tiny(dtype, numerics, head_dim=160, partial_rotary_factor=0.2)


def ids_of(rows, length, seed=0):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def rules_only(model, *, kv=False, fp4=False, scores=False, act=False):
    """Only the named rules of official numerics on (the attributes ``set_numerics`` sets)."""
    official.set_numerics(model, "official")
    for m in model.modules():
        if hasattr(m, "official_kv"):
            m.official_kv = kv
        if hasattr(m, "fp4_qk"):
            m.fp4_qk, m.bf16_scores = fp4, scores
        if hasattr(m, "act_quant_block") and not act:
            m.act_quant_block = 0
    return model


# ------------------------------------------------------------------------------------------------- quantizers
def test_the_grids_are_the_formats():
    assert len(E4M3) == 127 and E4M3[-1] == 448 and E4M3[1] == 2.0 ** -9 and np.all(np.diff(E4M3) > 0)
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.sort(np.unique(every[~np.isnan(every) & (every >= 0)])), E4M3)


@pytest.mark.parametrize("block, n", [(128, 256), (128, 200), (64, 48), (64, 448)])
def test_fp8_rounding_equals_the_e4m3_grid(block, n):
    g = torch.Generator().manual_seed(n)
    # rows at very different magnitudes: a tile below the 1e-4 floor, zeros, large values
    x = torch.randn(6, n, generator=g) * torch.tensor([1e-6, 1e-3, 1.0, 37.0, 1e4, 0.0]).unsqueeze(1)
    x[2, :8] = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 0.5 + 2.0 ** -11, 2.0 ** -10, 3 * 2.0 ** -10, 465.0])
    got = fp8_act_round(x, block)
    assert got.dtype == x.dtype and torch.equal(got, ref_fp8(x, block))
    assert got[2, 1] == 1.0 and got[2, 2] == 1.25 and got[2, 3] == -1.0  # ties to the even code
    assert torch.equal(fp8_act_round(got, block), got)  # values on the grid stay
    assert torch.equal(fp8_act_round(x.double(), block), got.double())


def test_fp8_rounding_has_a_straight_through_gradient():
    x = torch.randn(3, 130, requires_grad=True)
    g = torch.randn(3, 130)
    fp8_act_round(x, 128).backward(g)
    assert torch.equal(x.grad, g)


def test_bf16_rounding_equals_the_bits():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g) * 10.0 ** torch.randint(-8, 8, (4096,), generator=g).float()
    ties = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 2.0 ** -130])
    x = torch.cat([x, ties])
    assert torch.equal(bf16_round(x), ref_bf16(x))
    assert bf16_round(ties)[0] == 1.0 and bf16_round(ties)[1] == 1 + 2 * 2.0 ** -7


def test_hadamard_is_sylvesters():
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(hadamard(x), torch.from_numpy(x.numpy() @ sylvester(32)), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ the switch
def test_plain_is_the_default_and_official_switches_every_rule():
    model = tiny(numerics="plain")
    assert official.numerics_of(Transformer(model.config)) == "plain"
    ids = ids_of(1, 40)
    with torch.no_grad():
        plain = model(ids)
        official.set_numerics(model, "official")
        assert official.numerics_of(model) == "official"
        moved = model(ids)
        official.set_numerics(model, "plain")
        again = model(ids)
    assert torch.equal(again, plain)
    assert not torch.equal(moved, plain)
    # rule 4's modules: those whose weights the official checkpoints store as FP8 / FP4 (spec 1.3), wo_a aside
    official.set_numerics(model, "official")
    quantized = {n for n, m in model.named_modules() if getattr(m, "act_quant_block", 0) == 128}
    fp8 = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.shared_experts.w1", "ffn.shared_experts.w2",
           "ffn.shared_experts.w3", "ffn.experts")
    expected = {f"layers.{i}.{leaf}" for i in range(4) for leaf in fp8}
    expected |= {f"layers.{i}.attn.indexer.wq_b" for i in (1, 3)}
    expected |= {f"mtp.0.{leaf}" for leaf in fp8 + ("e_proj", "h_proj")}
    assert quantized == expected
    assert all(getattr(m, "act_quant_block", 0) == 0 for n, m in model.named_modules() if n not in expected)


def test_bad_numerics_are_a_clear_error():
    model = tiny(numerics="plain")
    with pytest.raises(ValueError, match="numerics must be one of"):
        official.set_numerics(model, "bf16")
    odd = tiny(numerics="plain", index_head_dim=48)
    with pytest.raises(ValueError, match="index_head_dim 48"):
        official.set_numerics(odd, "official")
    assert official.numerics_of(odd) == "plain"


# ------------------------------------------------------------------------------------- each rule in the model
def _attention_inputs(model):
    """Forward pre-hooks that keep each main attention's input x."""
    seen, hooks = {}, []
    for i, block in enumerate(model.layers):
        hooks.append(block.attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0])))
    return seen, hooks


@pytest.mark.parametrize("build", [tiny, whole_tiles])
def test_window_and_compressed_kv_are_rounded_after_rope(build):
    """Rule 1 alone: the window ring and the main compressors' entries of a cache hold exactly the re-implemented
    rounding of what plain numerics compute from the same layer input; the indexer's entries are not rounded."""
    model = rules_only(build(), kv=True)
    seen, hooks = _attention_inputs(model)
    ids = ids_of(1, 40)
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids, cache=cache)
        for h in hooks:
            h.remove()
        pos = torch.arange(40)
        for i, block in enumerate(model.layers):
            attn, x, lc = block.attn, seen[i], cache.layers[i]
            cos, sin = attn.rotary.cos_sin(pos, attn.rope_kind)
            kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin)
            expect = ref_kv(kv, attn.rotary.rope_dim)
            assert not torch.equal(expect, kv)
            assert torch.equal(lc.kv[0, lc.pos % attn.window], expect[0, lc.pos])  # slot = position % window
            if attn.compressor is not None:
                attn.compressor.official_kv = False
                plain = attn.compressor(x, attn.rotary)[0]
                attn.compressor.official_kv = True
                assert torch.equal(lc.compressor.entries, ref_kv(plain, attn.rotary.rope_dim))
            if attn.indexer is not None:
                assert torch.equal(lc.indexer.entries, attn.indexer.compressor(x, attn.rotary)[0])


def test_indexer_queries_and_keys_are_rotated_then_fp4():
    """Rule 2 alone: the indexer's queries and keys after RoPE, Hadamard-rotated over all 32 dims (Sylvester),
    then MXFP4 (E2M1 in 1x32 tiles)."""
    model = rules_only(tiny(), fp4=True)
    indexer, rotary = model.layers[1].attn.indexer, model.layers[1].attn.rotary
    g = torch.Generator().manual_seed(3)
    x, latent = torch.randn(1, 24, 128, generator=g), torch.randn(1, 24, 64, generator=g)
    pos = torch.arange(24)
    with torch.no_grad():
        q, w = indexer.queries(x, latent, pos, rotary)
        keys = indexer.keys(x, rotary, None)
        indexer.fp4_qk = False
        q_plain, w_plain = indexer.queries(x, latent, pos, rotary)
        keys_plain = indexer.keys(x, rotary, None)
    assert torch.equal(w, w_plain)
    for got, plain in ((q, q_plain), (keys, keys_plain)):
        rotated = hadamard(plain)
        torch.testing.assert_close(rotated.double(), torch.from_numpy(plain.double().numpy() @ sylvester(32)),
                                   atol=1e-6 * float(plain.abs().max()), rtol=0)
        assert torch.equal(got, ref_fp4(rotated))
        assert not torch.equal(got, rotated)


def test_index_scores_are_rounded_to_bf16_and_ties_go_to_the_lower_index():
    """Rule 3: scores within a BF16 step tie after rounding, and top-k takes the lower index; the reference
    path's scores are the rounded ones."""
    model = rules_only(tiny(), scores=True)
    indexer, rotary = model.layers[1].attn.indexer, model.layers[1].attn.rotary
    scores = torch.tensor([[[0.5, 1.0, 0.25, -1.0, 1.0 + 2.0 ** -10, 0.0]]])
    assert torch.equal(topk_lower_index(scores, 1), torch.tensor([[[4]]]))  # plain: the larger float
    rounded = indexer.round_scores(scores)
    assert torch.equal(rounded, ref_bf16(scores))
    assert torch.equal(topk_lower_index(rounded, 1), torch.tensor([[[1]]]))  # official: a tie, the lower index
    visible = torch.ones(1, 1, 6, dtype=torch.bool)
    assert topk_mask(rounded, visible, 1)[0, 0].nonzero().item() == 1
    g = torch.Generator().manual_seed(4)
    x, latent = torch.randn(1, 24, 128, generator=g), torch.randn(1, 24, 64, generator=g)
    with torch.no_grad():
        keys = indexer.keys(x, rotary, None)
        got = indexer.scores(x, latent, torch.arange(24), keys, rotary)
        indexer.bf16_scores = False
        plain = indexer.scores(x, latent, torch.arange(24), keys, rotary)
    assert torch.equal(got, ref_bf16(plain)) and not torch.equal(got, plain)


def test_linear_inputs_are_rounded_in_1x128_tiles():
    """Rule 4 on a projection: F.linear of the re-implemented rounding (a 200-wide input: one whole tile and a
    short one)."""
    lin = Linear(200, 96, bias=False)
    lin.act_quant_block = 128
    x = torch.randn(100, 200) * 3  # 100 rows: F.linear's own path
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(ref_fp8(x, 128), lin.weight))


@pytest.mark.parametrize("n, per_token", [(1, False), (7, False), (7, True), (16, True)])
def test_routed_experts_round_their_inputs_and_the_scaled_swiglu(n, per_token):
    """Rule 4 on the routed experts, in every path (one token, grouped, per token, all experts batched): w1 / w3
    take the rounded token, w2 the rounded (SwiGLU times routing weight); float64, so that the paths' last-bit
    differences never move a rounding."""
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(1)
    experts = Experts(cfg).double()
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.3)
    experts.act_quant_block = 128
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 128, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n)])
    weights = torch.rand(n, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = experts(x, weights, indices, per_token=per_token)
    expect = torch.zeros_like(x)
    xr = ref_fp8(x, 128)
    for t in range(n):
        for e, wt in zip(indices[t].tolist(), weights[t].tolist()):
            gate, up = experts.w1[e] @ xr[t], experts.w3[e] @ xr[t]
            h = F.silu(gate.clamp(max=cfg.swiglu_limit)) * up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit) * wt
            expect[t] += experts.w2[e] @ ref_fp8(h, 128)
    assert_close_scaled(got, expect.detach(), 1e-12)


# --------------------------------------------------------------------------------------- the whole model
def test_official_logits_move_by_what_the_reimplementation_predicts(monkeypatch):
    """Every rounding of the model replaced by this file's re-implementation gives the official logits exactly;
    and they differ from plain numerics' (on this random, lively model by some 30% rms: it turns a 1% noise on the
    K=V projection's input into 12%, and a bfloat16 copy of it differs from float32 by 8%)."""
    model = whole_tiles()
    ids = ids_of(2, 48, seed=6)
    with torch.no_grad():
        got = model(ids)
        plain = official.set_numerics(model, "plain")(ids)
        official.set_numerics(model, "official")
        import dsv4.model.attention as attention_mod
        import dsv4.model.compressor as compressor_mod
        import dsv4.model.indexer as indexer_mod
        import dsv4.model.linear as linear_mod
        import dsv4.model.moe as moe_mod
        import dsv4.quant as quant_mod

        act = lambda x, block: ref_fp8(x, block)  # noqa: E731
        monkeypatch.setattr(linear_mod, "round_activations", act)
        monkeypatch.setattr(moe_mod, "round_activations", act)
        monkeypatch.setattr(attention_mod, "round_kv", ref_kv)
        monkeypatch.setattr(compressor_mod, "round_kv", ref_kv)
        monkeypatch.setattr(indexer_mod, "round_scores", lambda s: ref_bf16(s) + 0.0)
        monkeypatch.setattr(quant_mod, "fake_quant_fp4", ref_fp4)
        predicted = model(ids)
    assert torch.equal(got, predicted)
    change = float((got - plain).abs().max()) / float(plain.abs().max())
    assert change > 1e-3


@pytest.mark.parametrize("splits", [(1,) * 5, (16, 1, 1), (33, 7), (3, 29, 2, 1)])
def test_prefill_then_decode_equals_one_forward(splits):
    """float64, so that the two computation orders never differ by a rounding step."""
    model = tiny(torch.float64)
    ids = ids_of(2, 80, seed=7)
    with torch.no_grad():
        full = model(ids)
        ref = model.set_attention("reference")(ids)
        model.set_attention("fast")
    assert_close_scaled(ref, full)
    assert_close_scaled(logits_in_calls(model, ids, splits), full)


def test_decode_state_rows_equal_cached_decode():
    """Rows prefilled to different lengths, then one token per row per call (attend_rows) and three per call
    (attend_rows_many), equal one forward."""
    model = tiny(torch.float64)
    ids = ids_of(3, 70, seed=8)
    with torch.no_grad():
        full = model(ids)
        state = DecodeState(model, rows=3, capacity=80)
        got = [[logits] for logits in prefill_rows(model, state, ids, [1, 13, 30])]
        while int(state.lengths.min()) < 40:  # one token a row
            lengths = state.lengths.tolist()
            logits = model(torch.tensor([[ids[r, lengths[r]]] for r in range(3)]), cache=state)
            for r in range(3):
                got[r].append(logits[r])
        while int(state.lengths.max()) + 3 <= 70:  # three tokens a row
            lengths = state.lengths.tolist()
            logits = model(torch.stack([ids[r, lengths[r]:lengths[r] + 3] for r in range(3)]), cache=state)
            for r in range(3):
                got[r].append(logits[r])
    for r in range(3):
        row = torch.cat(got[r])
        assert_close_scaled(row, full[r, :row.shape[0]])


def test_static_emission_rounds_the_entries_too(monkeypatch):
    """The compiled step's static-shape emission (``_emit_static``, run here eagerly) gives the same rows."""
    model = tiny(torch.float64)
    ids = ids_of(2, 40, seed=9)
    with torch.no_grad():
        full = model(ids)
        state = DecodeState(model, rows=2, capacity=48)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        state.active[:] = True
        steps = [model(ids[:, j:j + 1], cache=state) for j in range(40)]
    assert_close_scaled(torch.cat(steps, dim=1), full)
