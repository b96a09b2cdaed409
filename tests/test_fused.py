"""The fused dequantize-and-multiply kernel (dsv4.model.fused) against dequantize-then-matmul in float64, for every
stored format, row counts across its 8-row passes, edge shapes (partial FP8 blocks, lengths not a multiple of the
vector width), both scale encodings; and the packed modules' choice between the two paths."""

import pytest
import torch

from dsv4 import quant
from dsv4.model import fused, packed
from dsv4.model.indexer import _rows_kernel as indexer_rows_kernel, chunk_scores

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused kernel could not be built here")


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Within float32 rounding of each dot product: 1e-5 of the sum of |x||w| (on any CPU: a bound, not a
    computation order)."""
    ref = x.double() @ w.double().t()
    bound = x.double().abs() @ w.double().abs().t()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert ((got.double() - ref).abs() <= 1e-5 * bound + 1e-30).all(), float(((got.double() - ref).abs()
                                                                                / (bound + 1e-30)).max())


@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (130, 1000)])
def test_fp8_matches_dequantized(rows, shape):
    torch.manual_seed(rows)
    w = torch.randn(*shape) * torch.rand(shape[0], 1) * 3
    q, s = quant.fp8_block_quant(w, 128)
    x = torch.randn(rows, shape[1])
    dense = quant.fp8_block_dequant(q, s, 128)
    _check(fused.packed_matmul(x, q, s, "fp8"), x, dense)
    _check(fused.packed_matmul(x, q, s.float(), "fp8"), x, dense)  # float32 scales read the same


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_fp4_matches_dequantized(rows):
    torch.manual_seed(rows)
    w = torch.randn(96, 320)
    q, s = quant.mxfp4_quant(w, 32)
    x = torch.randn(rows, 320)
    _check(fused.packed_matmul(x, q, s, "fp4"), x, quant.mxfp4_dequant(q, s, 32))


def test_bf16_matches_and_keeps_leading_dims():
    torch.manual_seed(0)
    w = torch.randn(70, 203).bfloat16()
    x = torch.randn(2, 3, 203)
    got = fused.packed_matmul(x, w, None, "bf16")
    assert got.shape == (2, 3, 70)
    _check(got.reshape(6, 70), x.reshape(6, 203), w.float())


def test_every_code_decodes_exactly():
    """All 256 E4M3 bytes (NaN aside) and all 16 E2M1 codes: a one-hot input row reads each weight back exactly."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].reshape(-1, 2)[:, 0].contiguous()  # 127 non-NaN codes, one row each
    n = codes.numel()
    w8 = codes.view(torch.float8_e4m3fn).reshape(n, 1).expand(n, 128).contiguous()
    one = torch.ones(-(-n // 128), 1, dtype=torch.float32)
    got = fused.packed_matmul(torch.eye(128)[:1], w8, one, "fp8")[0]
    assert torch.equal(got, codes.view(torch.float8_e4m3fn).float())
    nib = torch.arange(16, dtype=torch.uint8)
    w4 = (nib | (nib << 4)).view(torch.int8).reshape(16, 1).expand(16, 16).contiguous()  # both nibbles the code
    got4 = fused.packed_matmul(torch.eye(32)[:2], w4, torch.ones(16, 1), "fp4")
    want = quant.fp4_decode(nib)
    assert torch.equal(got4[0], want) and torch.equal(got4[1], want)


def test_bad_input_is_named():
    q, s = quant.fp8_block_quant(torch.randn(128, 128), 128)
    with pytest.raises(RuntimeError, match="scale of shape"):
        fused.packed_matmul(torch.randn(1, 128), q, s[:, :0], "fp8")
    with pytest.raises(TypeError, match="float32"):
        fused.packed_matmul(torch.randn(1, 128).double(), q, s, "fp8")
    with pytest.raises(RuntimeError, match="does not hold"):
        fused.packed_matmul(torch.randn(1, 64), q, s, "fp8")


def test_packed_linear_takes_the_kernel_for_few_rows_only(monkeypatch):
    """A PackedLinear's product is the kernel's for up to FUSED_MAX_ROWS rows and the tiles' above, and the two
    agree; with autograd on it never fuses."""
    torch.manual_seed(1)
    q, s = quant.fp8_block_quant(torch.randn(256, 256), 128)
    lin = packed.PackedLinear(q, s)
    calls = []
    real = fused.packed_matmul
    monkeypatch.setattr(fused, "packed_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    dense = quant.fp8_block_dequant(q, s, 128)
    with torch.no_grad():
        for rows in (1, packed.FUSED_MAX_ROWS, packed.FUSED_MAX_ROWS + 1):
            x = torch.randn(rows, 256)
            _check(lin(x), x, dense)
        xg = torch.randn(1, 2, 256)
        got = lin.grouped(xg)[0]  # [2 groups, 128]
        _check(got[:1], xg[0, :1], dense[:128])
        _check(got[1:], xg[0, 1:], dense[128:])
    assert calls[:2] == [(1, 256), (packed.FUSED_MAX_ROWS, 256)] and len(calls) == 4  # + the two groups
    calls.clear()
    lin(torch.randn(1, 256))  # grad mode: the reference path
    assert calls == []


def test_scratch_buffers_serve_inference_mode_and_no_grad():
    """A scratch buffer first made under ``torch.inference_mode`` (the serving engine) is still written in place by
    a later product under ``no_grad`` (an inference tensor would refuse it)."""
    torch.manual_seed(2)
    q, s = quant.fp8_block_quant(torch.randn(256, 256), 128)
    lin = packed.PackedLinear(q, s, compute_dtype=torch.float64)
    x = torch.randn(packed.FUSED_MAX_ROWS + 1, 256, dtype=torch.float64)
    packed._SCRATCH.pool = {}
    with torch.inference_mode():
        a = lin(x)
    with torch.no_grad():
        b = lin(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape,block", [((3, 4096), 128), ((5, 300), 128), ((7, 448), 64), ((2, 1, 2048), 128)])
def test_act_round_equals_the_operators_bit_for_bit(shape, block):
    """The official numerics' activation rounding in one pass equals quant's operator form exactly: magnitudes
    from float32 subnormals to 1e3 (tiles under the amax floor, zero tiles, ties), a shorter last tile."""
    g = torch.Generator().manual_seed(block)
    x = torch.randn(*shape, generator=g) * torch.logspace(-45, 3, shape[-1])
    x.view(-1, shape[-1])[0, :block] = 0
    x.view(-1, shape[-1])[-1, :block] = torch.arange(block) * 2.0 ** -7  # exact ties of the E4M3 grid
    got, want = fused.act_round(x, block, 1e-4), quant._fp8_act_round_ops(x, block, 1e-4)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_act_round_non_finite_tiles_and_dispatch(monkeypatch):
    """A tile holding NaN or inf keeps the scale 1 (inf clamps to 448, NaN stays), as the operator form does; and
    fp8_act_round takes the kernel in eager CPU calls."""
    x = torch.tensor([[1.0, float("inf"), -3.0, 0.1, 1.0, float("nan"), 2.0, 3.0, -0.0, 1e-40, 5e3, 1e38]])
    got, want = fused.act_round(x, 4, 1e-4), quant._fp8_act_round_ops(x, 4, 1e-4)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    calls = []
    monkeypatch.setattr(fused, "act_round", lambda *a: calls.append(a) or quant._fp8_act_round_ops(*a))
    quant.fp8_act_round(torch.randn(2, 256), 128)
    assert len(calls) == 1


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build killed midway leaves PyTorch's lock file, on which every later build would wait forever: one older
    than STALE_LOCK_SECONDS is removed; a younger one (a build under way) is left alone."""
    import os
    import time

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "ext").mkdir()
    lock = tmp_path / "ext" / "lock"
    lock.touch()
    fused._remove_stale_lock(cpp_extension, "ext")
    assert lock.exists()
    old = time.time() - fused.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    fused._remove_stale_lock(cpp_extension, "ext")
    assert not lock.exists()


@pytest.mark.parametrize("m, n, k", [(1, 256, 512), (4, 130, 100), (3, 5, 7)])
def test_expert_matvec_equals_the_gathered_product(m, n, k):
    # row counts off the 4-row passes and the 64-row tasks, K off the vector width; within float32 rounding of
    # each dot product
    g = torch.Generator().manual_seed(m * n)
    x, w = torch.randn(m, k, generator=g), torch.randn(6, n, k, generator=g)
    idx = torch.randint(0, 6, (m,), generator=g)
    got = fused.expert_matvec(x, w, idx)
    ref = torch.einsum("mk,mnk->mn", x.double(), w.double()[idx])
    bound = torch.einsum("mk,mnk->mn", x.double().abs(), w.double().abs()[idx])
    assert got.shape == (m, n) and ((got.double() - ref).abs() <= 1e-5 * bound + 1e-30).all()
    with pytest.raises(RuntimeError, match="expert 6 is not one of the 6"):
        fused.expert_matvec(x, w, torch.full((m,), 6))


def test_expert_matvec_is_an_operator_a_compiled_graph_calls():
    g = torch.Generator().manual_seed(1)
    x, w, idx = torch.randn(2, 64, generator=g), torch.randn(4, 32, 64, generator=g), torch.tensor([3, 0])
    f = torch.compile(lambda x, idx: torch.nn.functional.silu(fused.expert_matvec(x, w, idx)), fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(x, idx), torch.nn.functional.silu(fused.expert_matvec(x, w, idx)))


def test_the_compiled_steps_routed_experts_through_the_kernel_equal_the_gathered_matrices():
    # Experts._gathered (a compiled decoding step's routed experts) in float32 through expert_matvec against the
    # same in float64 through indexing and bmm (its reference path), act rounding off and on
    from dsv4.config import ModelConfig
    from dsv4.model import moe
    from numerics import assert_close_scaled

    config = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    experts = moe.Experts(config)
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.05)
    n, k, e = 3, config.num_experts_per_tok, config.n_routed_experts
    x = torch.randn(n, config.hidden_size)
    indices = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    with torch.no_grad():
        for block in (0, 16):
            experts.act_quant_block = block
            got = experts._gathered(x, weights, indices)
            want = experts.double()._gathered(x.double(), weights.double(), indices)
            experts.float()
            assert got.dtype == torch.float32
            assert_close_scaled(got.double(), want, 1e-5 if not block else 0.1)


@pytest.mark.parametrize("n, d", [(4, 512), (3, 13)])
def test_mhc_mixing_and_sinkhorn_in_one_pass_equal_the_operators(n, d):
    # fused.hc_expand / hc_sinkhorn (what hyper.py runs without autograd on the CPU in float32) against the same
    # functions' operators in float64 (the fused path serves float32 only)
    from dsv4.model.hyper import HyperConnection, sinkhorn
    from numerics import assert_close_scaled

    g = torch.Generator().manual_seed(n * d)
    streams, out = torch.randn(2, 5, n, d, generator=g), torch.randn(2, 5, d, generator=g)
    post, logits = torch.rand(2, 5, n, generator=g) * 2, torch.randn(2, 5, n, n, generator=g) * 3
    with torch.no_grad():
        comb = fused.hc_sinkhorn(logits, 20, 1e-6)
        assert_close_scaled(comb.double(), sinkhorn(logits.double(), 20, 1e-6), 1e-5)
        assert torch.equal(sinkhorn(logits, 20, 1e-6), comb)  # hyper.sinkhorn takes the kernel here
        mixed = HyperConnection.expand(streams, out, post, comb)
        torch.testing.assert_close(mixed, fused.hc_expand(streams, out, post, comb), rtol=0, atol=0)
        want = HyperConnection.expand(streams.double(), out.double(), post.double(), comb.double())
        assert_close_scaled(mixed.double(), want, 1e-5)
    # with autograd, the operators (the training path)
    assert not fused.serves(streams.requires_grad_())


@pytest.mark.parametrize("m, t, k", [(7, 300, 40), (3, 2000, 512), (2, 10, 10), (4, 50, 1)])
def test_topk_lower_picks_the_k_largest_ties_toward_the_lower_index(m, t, k):
    # integer scores tie often, some rows all -inf past a few: the same picks as the exact reference, as sets
    from dsv4.model import indexer

    g = torch.Generator().manual_seed(t + k)
    scores = torch.randint(-5, 6, (m, t), generator=g).float()
    scores[0, 3:] = float("-inf")
    got = fused.topk_lower(scores, k)
    want = indexer._topk_exact(scores, k)
    assert got.shape == (m, k) and torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert bool((got.diff(dim=-1) > 0).all())  # index order
    with pytest.raises(RuntimeError, match="k must be in"):
        fused.topk_lower(scores, t + 1)


def test_topk_lower_index_takes_the_selection_without_autograd(monkeypatch):
    from dsv4.model import indexer

    monkeypatch.setattr(indexer, "FUSED_TOPK_MIN", 1)
    scores = torch.randint(-3, 4, (2, 5, 600), generator=torch.Generator().manual_seed(0)).float()
    calls = []
    original = fused.topk_lower
    monkeypatch.setattr(fused, "topk_lower", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        got = indexer.topk_lower_index(scores, 64)
    assert calls and torch.equal(got.sort(-1).values, indexer._topk_exact(scores, 64).sort(-1).values)


def test_a_compiled_graph_takes_the_top_k_operator():
    from dsv4.model import indexer

    scores = torch.randint(-4, 5, (3, 700), generator=torch.Generator().manual_seed(2)).float()
    f = torch.compile(lambda s: indexer.topk_lower_index(s, 64), fullgraph=True, backend="eager")
    with torch.no_grad():
        got = f(scores)
    assert bool((got.diff(dim=-1) > 0).all())  # the operator's index order, not _topk_exact's
    assert torch.equal(got.sort(-1).values, indexer._topk_exact(scores, 64).sort(-1).values)


def _index_reference(q, w, keys_t):
    """The indexer's scores in float64: sum_h w_h relu(q_h . k) ([B, Q, H, c], [B, Q, H], [B, c, T] -> [B, Q, T])."""
    return (w.double().unsqueeze(-1) * (q.double() @ keys_t.double().unsqueeze(1)).relu()).sum(2)


@pytest.mark.parametrize("nq, h, c, t", [(3, 8, 64, 100), (64, 8, 64, 1000), (5, 3, 16, 37), (7, 5, 32, 8),
                                         (1, 2, 16, 4097), (2, 1, 8, 25), (4, 4, 8, 24), (2, 6, 8, 1)])
def test_index_scores_equal_the_operators(nq, h, c, t):
    # every head group (4 at a time, then 1-3), entry counts on and off the 16-entry panels and 96-entry blocks (the
    # last panel padded, its padding's scores dropped); the keys a prefix of a longer cache (strided), the scores
    # written into a wider buffer's view
    g = torch.Generator().manual_seed(nq * 1000 + t)
    q, w = torch.randn(1, nq, h, c, generator=g), torch.randn(1, nq, h, generator=g)
    keys_t = torch.randn(1, c, t + 9, generator=g)[..., :t]
    want = _index_reference(q, w, keys_t)
    buf = torch.full((1, nq, t + 5), 7.0)
    got = fused.index_scores(q, w, keys_t, out=buf[..., :t])
    assert got.dtype == torch.float32 and got.shape == (1, nq, t)
    # float32 rounding of c-term dots and h-term sums: a bound of the magnitudes' sums, on any CPU
    bound = (w.double().abs().unsqueeze(-1) * (q.double().abs() @ keys_t.double().abs().unsqueeze(1))).sum(2)
    assert ((buf[..., :t].double() - want).abs() <= 1e-5 * bound + 1e-30).all()
    assert (buf[..., t:] == 7.0).all()  # nothing written past the entries
    assert torch.equal(fused.index_scores(q, w, keys_t), got)  # a fresh buffer: the same values


def test_index_scores_batches_zeros_nan_and_bad_input():
    g = torch.Generator().manual_seed(3)
    q, w, keys_t = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 4, 5, generator=g), \
        torch.randn(2, 8, 50, generator=g)
    got = fused.index_scores(q, w, keys_t)
    assert torch.allclose(got.double(), _index_reference(q, w, keys_t), atol=1e-4)
    # negative weights on dots that are all <= 0: scores +0.0, never -0.0 (the tie rule compares bits)
    zero = fused.index_scores(-q.abs(), -w.abs(), keys_t.abs())
    assert (zero == 0).all() and not zero.signbit().any()
    # a NaN key poisons its entry's scores, as relu passes NaN on
    keys_t[0, 3, 10] = float("nan")
    nan = fused.index_scores(q, w.abs() + 1, keys_t)
    assert nan[0, :, 10].isnan().all() and not nan[0, :, 11].isnan().any() and not nan[1].isnan().any()
    with pytest.raises(ValueError, match="do not match"):
        fused.index_scores(q, w[..., :4], keys_t)
    with pytest.raises(RuntimeError, match="contiguous along the entries"):
        fused.index_scores(q, w, keys_t.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(RuntimeError, match="float32"):
        fused.index_scores(q.double(), w, keys_t)


def _graph_targets(fn, *args, grad: bool = False) -> tuple[torch.Tensor, list[str]]:
    """fn(*args) compiled (fullgraph, run by the eager backend; autograd on or off) and the targets of its traced
    graph's calls."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target).removesuffix(".default") for node in gm.graph.nodes
                       if node.op == "call_function")
        return gm.forward

    with torch.set_grad_enabled(grad):
        return torch.compile(fn, fullgraph=True, backend=backend)(*args), targets


@pytest.mark.parametrize("b, nq, h, c, t", [(1, 1, 8, 64, 1030), (3, 2, 3, 128, 77), (2, 1, 5, 24, 9),
                                            (1, 1, 64, 128, 40), (2, 3, 1, 64, 3)])
def test_index_scores_rows_read_the_cache_layout_in_place(b, nq, h, c, t):
    # the four-entry AVX2 path (c 64 or 128: heads two at a time, then an odd one), the portable one (c = 24; a
    # row's entries not c apart; entry counts not a multiple of 4), batches and several queries a row
    g = torch.Generator().manual_seed(b * 100 + t)
    q, w = torch.randn(b, nq, h, c, generator=g), torch.rand(b, nq, h, generator=g) * 2 - 0.5
    for keys in (torch.randn(b, t + 7, c, generator=g)[:, :t], torch.randn(b, t, c + 8, generator=g)[..., :c]):
        keys_t = keys.transpose(1, 2)
        want = _index_reference(q, w, keys_t)
        got = fused.index_scores_rows(q, w, keys)
        assert got.dtype == torch.float32 and got.shape == (b, nq, t)
        bound = (w.double().abs().unsqueeze(-1) * (q.double().abs() @ keys_t.double().abs().unsqueeze(1))).sum(2)
        assert ((got.double() - want).abs() <= 1e-5 * bound + 1e-30).all()
        with torch.no_grad():  # chunk_scores takes it for a decoding step's few queries
            assert torch.equal(chunk_scores(q, w, keys_t), got)


def test_index_scores_rows_zeros_nan_bad_input_and_the_compiled_operator():
    g = torch.Generator().manual_seed(5)
    q, w, keys = torch.randn(2, 1, 4, 64, generator=g), torch.rand(2, 1, 4, generator=g), \
        torch.randn(2, 30, 64, generator=g)
    zero = fused.index_scores_rows(-q.abs(), w, keys.abs())  # every dot <= 0: +0.0, never -0.0
    assert (zero == 0).all() and not zero.signbit().any()
    keys[1, 6, 10] = float("nan")
    nan = fused.index_scores_rows(q, w + 1, keys)
    assert nan[1, 0, 6].isnan() and not nan[1, 0, 7].isnan() and not nan[0].isnan().any()
    with pytest.raises(RuntimeError, match="contiguous along c"):
        fused.index_scores_rows(q, w, keys.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(RuntimeError, match=r"w must be \[B, Q, H\]"):
        fused.index_scores_rows(q, w[..., :3], keys)
    keys = keys.nan_to_num()
    got, targets = _graph_targets(lambda q, w, k: chunk_scores(q, w, k.transpose(1, 2)) * 2, q, w, keys)
    assert "dsv4.index_scores_rows" in targets
    assert torch.equal(got, fused.index_scores_rows(q, w, keys) * 2)
    with torch.enable_grad():  # with autograd, the operators (the training path)
        assert not indexer_rows_kernel(q.requires_grad_(), w, keys.transpose(1, 2))


def test_topk_lower_orders_by_bits_as_the_exact_reference():
    # -0.0 below +0.0, NaNs by their bits (positive above +inf, negative below -inf), long rows of random scores
    row = torch.tensor([[0.0, -0.0, 1.0, float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, 0.0]])
    from dsv4.model import indexer

    for k in range(1, row.shape[1] + 1):
        assert torch.equal(fused.topk_lower(row, k), indexer._topk_exact(row, k).sort(-1).values), k
    g = torch.Generator().manual_seed(9)
    for scores in (torch.randn(2, 40000, generator=g), torch.rand(1, 33000, generator=g).relu() * 1e-3,
                   torch.randn(1, 5000, generator=g).round()):
        got = fused.topk_lower(scores, 512)
        assert torch.equal(got, indexer._topk_exact(scores, 512).sort(-1).values)


def test_a_compiled_graph_takes_the_sinkhorn_operator():
    from dsv4.model.hyper import sinkhorn

    logits = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(4)) * 3
    got, targets = _graph_targets(lambda x: sinkhorn(x, 20, 1e-6) + 1, logits)
    assert "dsv4.hc_sinkhorn" in targets
    assert torch.equal(got, fused.hc_sinkhorn(logits, 20, 1e-6) + 1)
    # training: the operators, whose backward the graph keeps
    _, targets = _graph_targets(lambda x: sinkhorn(x, 20, 1e-6), logits.requires_grad_(), grad=True)
    assert "dsv4.hc_sinkhorn" not in targets
