"""Tests for dsv4.quant: FP8 block scales, MXFP4 packing/quantization, fake quantization, Hadamard."""

import math

import pytest
import torch

from dsv4 import quant
from dsv4.quant import (
    E2M1_VALUES,
    SCALE_DTYPE,
    fake_quant_fp4,
    fake_quant_fp8,
    fp4_pack,
    fp4_unpack,
    fp8_block_dequant,
    fp8_block_quant,
    fp8_tile_dequant,
    fp8_tile_quant,
    hadamard,
    mxfp4_dequant,
    mxfp4_quant,
)

GRID = torch.tensor(E2M1_VALUES)
GRID_SIGNED = torch.cat([GRID, -GRID])


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Spread magnitudes over many octaves so that blocks get different scales.
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape, generator=g).float())
    return x.to(dtype)


def _is_pow2(t):
    t = t.float()
    m, _ = torch.frexp(t)
    return bool(((t > 0) & (m == 0.5)).all())


# ----------------------------------------------------------------------------------------------------------------------
# FP4 / MXFP4
# ----------------------------------------------------------------------------------------------------------------------


def test_pack_unpack_all_16_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = fp4_pack(codes)
    assert packed.dtype == torch.int8 and packed.shape == (8,)
    vals = fp4_unpack(packed)
    expected = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES])
    assert torch.equal(vals, expected)
    # code 0x8 is negative zero
    assert torch.signbit(vals[8]) and vals[8] == 0
    # values -> codes -> same bytes (sign of zero preserved)
    assert torch.equal(fp4_pack(vals), packed)
    # every pair of codes in every nibble position survives a round trip
    a, b = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], dim=-1).flatten()  # 512 codes
    unpacked = fp4_unpack(fp4_pack(pairs))
    assert torch.equal(fp4_pack(unpacked), fp4_pack(pairs))
    assert torch.equal(quant._fp4_unpack_codes(fp4_pack(pairs)).long(), pairs)


def test_pack_nibble_order_hand_example():
    # elements: [1.0, -3.0, 0.5, 6.0]
    # codes:    1.0 -> 0x2, -3.0 -> 0x8|0x5 = 0xD, 0.5 -> 0x1, 6.0 -> 0x7
    # byte 0 = low(even)=0x2 | high(odd)=0xD<<4 = 0xD2 ; byte 1 = 0x1 | 0x7<<4 = 0x71
    vals = torch.tensor([[1.0, -3.0, 0.5, 6.0]])
    packed = fp4_pack(vals)
    assert packed.shape == (1, 2)
    assert packed.view(torch.uint8).tolist() == [[0xD2, 0x71]]
    assert packed.tolist() == [[0xD2 - 256, 0x71]]  # stored as signed int8
    assert torch.equal(fp4_unpack(packed), vals)
    # the same from integer codes
    assert torch.equal(fp4_pack(torch.tensor([[0x2, 0xD, 0x1, 0x7]])), packed)


def test_e2m1_rounding_ties_to_even_code():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 0.74, 2.51, 4.99, 7.0, -0.25, -2.5, -5.0, 0.1])
    got = quant.fp4_decode(quant.fp4_encode(x))
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 0.5, 3.0, 4.0, 6.0, -0.0, -2.0, -4.0, 0.0])
    assert torch.equal(got, want)


def test_mxfp4_shapes_dtypes_and_scale_rule():
    w = _rand(16, 128, seed=1)
    packed, scale = mxfp4_quant(w)
    assert packed.dtype == torch.int8 and packed.shape == (16, 64)
    assert scale.dtype == SCALE_DTYPE and scale.shape == (16, 4)
    amax = w.abs().unflatten(-1, (4, 32)).amax(-1)
    expected = torch.exp2(torch.ceil(torch.log2(amax / 6)))
    assert torch.equal(scale.float(), expected)
    if hasattr(torch, "float8_e8m0fnu"):
        assert scale.dtype == torch.float8_e8m0fnu


def test_fake_quant_fp4_values_on_grid_times_block_pow2():
    w = _rand(8, 256, seed=2)
    fq = fake_quant_fp4(w)
    _, scale = mxfp4_quant(w)
    s = scale.float()
    assert _is_pow2(s)
    q = fq.unflatten(-1, (-1, 32)) / s.unsqueeze(-1)  # exact: division by a power of two
    on_grid = (q.unsqueeze(-1) == GRID_SIGNED).any(-1)
    assert bool(on_grid.all())
    # no clipping: the block max maps to at most 6 and the error is at most half a grid step (<= 1 * scale)
    assert bool((q.abs() <= 6).all())
    err = (fq - w).abs().unflatten(-1, (-1, 32))
    assert bool((err <= s.unsqueeze(-1)).all())


def test_fake_quant_fp4_idempotent_and_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        w = _rand(4, 64, 96, seed=3, dtype=dtype)
        once = fake_quant_fp4(w)
        assert once.dtype == dtype and once.shape == w.shape
        assert torch.equal(fake_quant_fp4(once), once)


def test_fake_quant_fp4_zero_and_tiny_blocks():
    w = torch.zeros(2, 64)
    w[1, 32:] = 1e-30
    fq = fake_quant_fp4(w)
    assert torch.equal(fq[0], torch.zeros(64))
    assert torch.equal(fq[1, :32], torch.zeros(32))
    assert torch.allclose(fq[1, 32:], w[1, 32:], rtol=0.25)
    _, scale = mxfp4_quant(w)
    assert scale.float()[0, 0] == 2.0**-126


def test_straight_through_gradients():
    w = _rand(4, 64, seed=4).requires_grad_(True)
    g = torch.randn(4, 64)
    fake_quant_fp4(w).backward(g)
    assert torch.equal(w.grad, g)

    x = _rand(3, 5, 448, seed=5).requires_grad_(True)
    gx = torch.randn(3, 5, 448)
    fake_quant_fp8(x, block=64).backward(gx)
    assert torch.equal(x.grad, gx)


def test_mxfp4_dequant_matches_fake_quant_exactly():
    w = _rand(32, 192, seed=6)
    packed, scale = mxfp4_quant(w)
    assert torch.equal(mxfp4_dequant(packed, scale), fake_quant_fp4(w))
    # float32 scales are accepted too
    assert torch.equal(mxfp4_dequant(packed, scale.float()), fake_quant_fp4(w))
    # 3-D (stacked experts) works the same way
    w3 = _rand(2, 8, 64, seed=7)
    p3, s3 = mxfp4_quant(w3)
    assert p3.shape == (2, 8, 32) and s3.shape == (2, 8, 2)
    assert torch.equal(mxfp4_dequant(p3, s3), fake_quant_fp4(w3))


# ----------------------------------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (1, 129), (128, 128)])
def test_fp8_block_roundtrip_and_error_bound(shape):
    w = _rand(*shape, seed=8)
    q, scale = fp8_block_quant(w)
    nb = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert scale.dtype == SCALE_DTYPE and scale.shape == nb
    assert _is_pow2(scale)
    dq = fp8_block_dequant(q, scale)
    assert dq.dtype == torch.float32 and dq.shape == shape
    # E4M3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing 2^-9 -> abs error <= 2^-10 * scale
    s = quant._expand_block_scale(scale.float(), *shape, 128)
    bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10)
    assert bool(((dq - w).abs() <= bound).all())
    # no clipping: every block's max maps inside +-448
    assert bool((q.float().abs() <= 448).all())
    # dequantized values are a fixed point of quant -> dequant
    q2, scale2 = fp8_block_quant(dq)
    assert torch.equal(fp8_block_dequant(q2, scale2), dq)


def test_fp8_quant_of_dequant_is_exact_on_codes():
    # Canonical FP8 data: each block's max |code| in (224, 448] (what fp8_block_quant produces unless rounding lands
    # exactly on 224). Re-quantizing its dequantization must give back the same codes and scales bit for bit.
    g = torch.Generator().manual_seed(9)
    codes = (torch.rand(300, 260, generator=g) * 2 - 1) * 448
    codes[::128, ::128] = 448.0  # the first element of each block is the max
    q = codes.to(torch.float8_e4m3fn)
    exps = torch.randint(-20, 20, (3, 3), generator=g).float()
    scale = torch.exp2(exps).to(SCALE_DTYPE)
    w = fp8_block_dequant(q, scale)
    q2, scale2 = fp8_block_quant(w)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(scale2.float(), scale.float())


def test_fp8_all_zero_block():
    w = torch.zeros(130, 10)
    w[129, 0] = 3.0
    q, scale = fp8_block_quant(w)
    assert scale.shape == (2, 1)
    assert scale.float()[0, 0] == 2.0**-126
    assert torch.equal(fp8_block_dequant(q, scale), w)


def test_fp8_block_dequant_crops_scale():
    q = torch.ones(130, 260).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    dq = fp8_block_dequant(q, scale)
    assert dq[0, 0] == 1 and dq[127, 255] == 2 and dq[0, 256] == 4
    assert dq[128, 0] == 8 and dq[129, 200] == 16 and dq[129, 259] == 32


def test_fake_quant_fp8_tiles():
    x = _rand(2, 3, 448, seed=10, dtype=torch.bfloat16)
    fq = fake_quant_fp8(x, block=64)
    assert fq.dtype == torch.bfloat16 and fq.shape == x.shape
    assert torch.equal(fake_quant_fp8(fq, block=64), fq)  # idempotent
    q, scale = fp8_tile_quant(x, block=64)
    assert scale.shape == (2, 3, 7) and _is_pow2(scale)
    assert torch.equal(fp8_tile_dequant(q, scale, block=64).to(torch.bfloat16), fq)
    xf = x.float()
    s = scale.float().repeat_interleave(64, -1)
    bound = torch.maximum(xf.abs() * 2.0**-4, s * 2.0**-10)
    assert bool(((fq.float() - xf).abs() <= bound).all())


# ----------------------------------------------------------------------------------------------------------------------
# safetensors with E8M0 scales
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="this torch has no float8_e8m0fnu")
def test_e8m0_scales_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    w8 = _rand(200, 300, seed=11)
    q8, s8 = fp8_block_quant(w8)
    w4 = _rand(16, 64, seed=12)
    p4, s4 = mxfp4_quant(w4)
    assert s8.dtype == torch.float8_e8m0fnu and s4.dtype == torch.float8_e8m0fnu
    path = tmp_path / "q.safetensors"
    save_file({"a.weight": q8, "a.scale": s8, "e.weight": p4, "e.scale": s4}, str(path))
    t = load_file(str(path))
    assert t["a.scale"].dtype == torch.float8_e8m0fnu and t["e.scale"].dtype == torch.float8_e8m0fnu
    assert t["a.weight"].dtype == torch.float8_e4m3fn and t["e.weight"].dtype == torch.int8
    assert torch.equal(t["a.scale"].view(torch.uint8), s8.view(torch.uint8))
    assert torch.equal(fp8_block_dequant(t["a.weight"], t["a.scale"]), fp8_block_dequant(q8, s8))
    assert torch.equal(mxfp4_dequant(t["e.weight"], t["e.scale"]), mxfp4_dequant(p4, s4))


# ----------------------------------------------------------------------------------------------------------------------
# Hadamard
# ----------------------------------------------------------------------------------------------------------------------


def _sylvester(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_hadamard_matches_sylvester_n8():
    x = torch.randn(5, 8, dtype=torch.float64)
    want = x @ _sylvester(8).double() / math.sqrt(8)
    assert torch.allclose(hadamard(x), want, atol=1e-12)
    assert torch.allclose(hadamard(x.float()), want.float(), atol=1e-6)
    assert hadamard(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # basis vectors give the rows of H / sqrt(8)
    assert torch.allclose(hadamard(torch.eye(8)), _sylvester(8) / math.sqrt(8), atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 64, 128])
def test_hadamard_orthogonal(n):
    x = torch.randn(3, 4, n)
    y = hadamard(x)
    assert torch.allclose(hadamard(y), x, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(hadamard(torch.eye(n)) @ hadamard(torch.eye(n)).T, torch.eye(n), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="even"):
        fp4_pack(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="E2M1 grid"):
        fp4_pack(torch.tensor([0.3, 1.0]))
    with pytest.raises(ValueError, match="0..15"):
        fp4_pack(torch.tensor([16, 0]))
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        mxfp4_quant(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        fake_quant_fp4(torch.zeros(4, 40))
    with pytest.raises(ValueError, match="multiple of the block size 64"):
        fake_quant_fp8(torch.zeros(4, 100), block=64)
    packed, scale = mxfp4_quant(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"expected \(4, 2\), got \(4, 1\)"):
        mxfp4_dequant(packed, scale[:, :1])
    q, s = fp8_block_quant(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"expected \(2, 3\), got \(2, 2\)"):
        fp8_block_dequant(q, s[:, :2])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_block_dequant(q.float(), s)
    with pytest.raises(ValueError, match="power of two, got size 12"):
        hadamard(torch.zeros(2, 12))


def test_non_finite_weights_are_not_rounded_into_fp4():
    """A diverged weight must not disappear into FP4: export refuses NaN / inf with the count, and the QAT fake
    quantizer returns NaN for the blocks that hold them (rounding would make inf a 6) and the usual values elsewhere."""
    w = torch.randn(2, 64)
    for bad in (float("inf"), float("-inf"), float("nan")):
        v = w.clone()
        v[1, 40] = bad
        with pytest.raises(ValueError, match="1 non-finite value"):
            mxfp4_quant(v)
        fq = fake_quant_fp4(v)
        assert torch.isnan(fq[1, 32:]).all()
        assert torch.equal(fq[0], fake_quant_fp4(w)[0]) and torch.equal(fq[1, :32], fake_quant_fp4(w)[1, :32])
