"""The W4A16 weight layout and decode, checked on the CPU through their numpy twins
(fp4cupy/prepared.py replays kernels_cu/prepare.cu and w4a16.cu bit for bit)."""
import numpy as np
import pytest

import fp4cupy
from fp4cupy import prepared, reference


def _exact_weight(t):
    """deq(W) in float64 without the float32 rounding of (e2m1 * s) * g."""
    e = reference.e2m1_decode(reference.unpack_nibbles(t.data)).astype(np.float64)
    s = np.repeat(reference.e4m3_decode(t.scales).astype(np.float64), t.group_size, axis=1)
    return e * s * np.float64(t.global_scale)


def _weight(rng, n, k, gs=16, heavy=False, zero_rows=()):
    w = rng.standard_normal((n, k)).astype(np.float32)
    if heavy:
        w *= np.exp(2 * rng.standard_normal((n, 1))).astype(np.float32)
    for r in zero_rows:
        w[r] = 0
    return fp4cupy.quantize(w, group_size=gs)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("n,k,gs", [(16, 64, 16), (40, 128, 16), (33, 192, 32), (64, 256, 64)])
def test_emulated_kernel_equals_dequantized_linear(rng, n, k, gs, bf16):
    w = _weight(rng, n, k, gs, heavy=True, zero_rows=(1,))
    pw = fp4cupy.prepare(w)
    assert pw.path == "mma"
    x = rng.standard_normal((5, k))
    want = x @ _exact_weight(w).T
    got = prepared.emulate_linear(x, pw.codes, pw.scale_codes, w.global_scale, n, bf16)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("bf16", [False, True])
def test_decode_of_every_code_pair(bf16):
    """All 256 (lo, hi) code pairs in every register slot decode to the E2M1 value * 2^-14 (fp16) or 2^-126."""
    codes = np.arange(16, dtype=np.uint32)
    lo, hi = np.meshgrid(codes, codes, indexing="ij")
    lo, hi = lo.ravel(), hi.ravel()
    want = reference.e2m1_decode(np.stack([lo, hi], -1).astype(np.uint8)).astype(np.float64)
    # H0 at bits 0-3 / 16-19, H1 at 8-11 / 24-27, H2 at 4-7 / 20-23, H3 at 12-15 / 28-31
    for reg, shift in enumerate((0, 8, 4, 12)):
        u = (lo << shift) | (hi << (16 + shift))
        regs = (prepared.decode_bf16_words if bf16 else prepared.decode_f16_words)(u)
        got = prepared._halves(regs[:, reg], fp4cupy.arrays.NUMPY_DTYPES["bfloat16" if bf16 else "float16"])
        factor = 2.0 ** (126 if bf16 else 14)
        np.testing.assert_array_equal(got.astype(np.float64) * factor, want)
        assert (np.signbit(got) == np.signbit(want)).all()


def test_scale_codes_decode_exactly_in_fp16_and_bf16():
    bits = np.arange(0x7F, dtype=np.uint8)  # every non-NaN E4M3 scale
    code = prepared.f16_code(bits).astype(np.uint32)
    s = reference.e4m3_decode(bits).astype(np.float64)
    f16 = prepared._halves(code * 0x00800080, np.float16)
    bf = prepared._halves(code * 0x00100010 + 0x70007000, fp4cupy.arrays.NUMPY_DTYPES["bfloat16"])
    np.testing.assert_array_equal(f16[:, 0], s)
    np.testing.assert_array_equal(f16[:, 1], s)
    # bf16: scale 0 decodes to 2^97, harmless because prepare zeroes the codes of zero-scale blocks
    np.testing.assert_array_equal(bf[1:, 0].astype(np.float64), s[1:] * 2.0 ** 112)
    assert np.isnan(prepared._halves(np.uint32(0xFF) * np.uint32(0x00800080), np.float16)).all()


def test_zero_scale_blocks_get_zero_codes(rng):
    w = _weight(rng, 16, 64)
    data, scales = w.data.copy(), w.scales.copy()
    scales[3, 1] = 0  # a block with nonzero codes but a zero scale decodes to 0
    t = fp4cupy.FP4Tensor(data, scales, w.global_scale, (16, 64))
    pw = fp4cupy.prepare(t)
    x = rng.standard_normal((2, 64))
    got = prepared.emulate_linear(x, pw.codes, pw.scale_codes, t.global_scale, 16, False)
    np.testing.assert_allclose(got, x @ _exact_weight(t).T, rtol=1e-12)


def test_prepare_falls_back_and_says_why(rng):
    x = rng.standard_normal((3, 96)).astype(np.float32)
    wide = np.pad(x, ((0, 0), (0, 32)))
    wide[0, :32] *= 2.0 ** -20  # MXFP4 block exponents 21 binades apart
    for t, why in ((fp4cupy.quantize(x, "mxfp4"), "K=96"), (fp4cupy.quantize(x, group_size=8), "group_size=8"),
                   (fp4cupy.quantize(x), "K=96"), (fp4cupy.quantize(wide, "mxfp4"), "span 21 binades")):
        pw = fp4cupy.prepare(t)
        assert pw.path == "dequantize" and why in repr(pw)
        y = fp4cupy.linear(np.ones((2, t.shape[1]), np.float32), pw)
        want = np.ones((2, t.shape[1])) @ t.dequantize().T.astype(np.float64)
        # float32 sums of 96 terms: the error scales with the terms, not with a cancelled result
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(t.dequantize()).sum(axis=1).max())
    with pytest.raises(TypeError, match="2-D FP4Tensor"):
        fp4cupy.prepare(x)


def test_linear_takes_prepared_weights_on_cpu(rng):
    w = _weight(rng, 24, 128)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    pw = fp4cupy.prepare(w)
    np.testing.assert_array_equal(fp4cupy.linear(x, pw), fp4cupy.linear(x, w))
    assert pw.weight is w and fp4cupy.prepare(pw) is pw


@pytest.mark.parametrize("n,k,gs", [(16, 64, 16), (40, 128, 16), (33, 192, 32), (70, 256, 64)])
def test_unpack_inverts_the_repack(rng, n, k, gs):
    w = _weight(rng, n, k, gs, heavy=True, zero_rows=(2,))
    pw = fp4cupy.prepare(w)
    np.testing.assert_array_equal(prepared.unpack_codes(pw.codes, n, k), w.data)
    np.testing.assert_array_equal(prepared.unpack_scales(pw.scale_codes, n, k, gs), w.scales)


def test_the_repack_keeps_a_pair_of_row_tiles_side_by_side_a_chunk(rng):
    """Chunk c of row tiles 2p and 2p + 1 are neighbours (kernels_cu/w4a16_decode.cuh, w4_slot): the
    codes of slot [p, c, j] all come from rows 16 (2p + j) .. + 15, and so do its scale codes."""
    n, k, tiles = 100, 192, 8  # 7 row tiles (the last ragged), allocated as 8
    w = _weight(rng, n, k)
    codes = prepared.repack_codes(w.data, w.scales, n, k, 16)  # u32 [tiles/2, K/64, 2, 32, 4]
    scale_codes = prepared.repack_scales(w.scales, n, k, 16)  # u8 [tiles/2, K/64, 2, 4, 8, 2]
    assert codes.shape == (tiles // 2, k // 64, 2, 32, 4) and scale_codes.shape == (tiles // 2, k // 64, 2, 4, 8, 2)
    for tile in range(tiles):
        rows = np.zeros_like(w.data)
        rows[16 * tile:16 * tile + 16] = w.data[16 * tile:16 * tile + 16]
        only = prepared.repack_codes(rows, w.scales, n, k, 16)
        np.testing.assert_array_equal(only[tile // 2, :, tile % 2], codes[tile // 2, :, tile % 2])
        assert not only[:, :, 1 - tile % 2].any() and not np.delete(only, tile // 2, axis=0).any()
    per16 = np.zeros((tiles * 16, k // 16), np.uint8)
    per16[:n] = prepared.f16_code(w.scales)
    for tile in range(tiles):  # [chunk, q, g, (r, r + 8)] of one tile
        want = per16[16 * tile:16 * tile + 16].reshape(2, 8, k // 64, 4).transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(scale_codes[tile // 2, :, tile % 2], want)


def test_prepare_rejects_negative_scales_and_non_weights(rng):
    w = _weight(rng, 16, 64)
    scales = w.scales.copy()
    scales[0, 0] |= 0x80
    with pytest.raises(ValueError, match="negative E4M3 block scales"):
        fp4cupy.prepare(fp4cupy.FP4Tensor(w.data, scales, w.global_scale, (16, 64)))
    with pytest.raises(TypeError, match="2-D FP4Tensor"):
        fp4cupy.prepare(fp4cupy.quantize(rng.standard_normal((2, 4, 64)).astype(np.float32)))


def _mx_weight(rng, n, k, binades):
    """An MXFP4 weight whose rows' magnitudes spread over about ``binades``, with a zero block and a NaN one."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    w *= np.exp2(np.linspace(0, binades - 3, n, dtype=np.float32))[:, None]
    w[1, 32:64] = 0
    w[2, 5] = np.nan
    return fp4cupy.quantize(w, "mxfp4", nonfinite="mark")


def test_mxfp4_runs_as_the_nvfp4_tensor_of_the_same_values(rng):
    t = _mx_weight(rng, 40, 256, 17)
    kw = prepared.mxfp4_as_nvfp4(t)
    assert (kw.fmt, kw.group_size) == ("nvfp4", 32) and kw.data is t.data
    np.testing.assert_array_equal(kw.dequantize(), t.dequantize())  # bit for bit, NaN block included
    np.testing.assert_array_equal(prepared.mxfp4_scales_from_nvfp4(kw.scales, kw.global_scale_array), t.scales)
    e = t.scales[(t.scales != 0) & (t.scales != 0xFF)].astype(int) - 127
    assert kw.global_scale == 2.0 ** (e.max() - 8) and e.max() - e.min() + 1 <= prepared.MX_BINADES


@pytest.mark.parametrize("bf16", [False, True])
def test_emulated_kernel_on_an_mxfp4_weight(rng, bf16):
    t = _mx_weight(rng, 40, 256, 18)
    t = fp4cupy.FP4Tensor(t.data, np.where(t.scales == 0xFF, np.uint8(0x80), t.scales), shape=t.shape, fmt="mxfp4")
    pw = fp4cupy.prepare(t)  # (the NaN block's scale replaced by 2^1: NaN would poison the whole product)
    assert pw.path == "mma"
    x = rng.standard_normal((5, 256))
    want = x @ t.dequantize().astype(np.float64).T
    got = prepared.emulate_linear(x, pw.codes, pw.scale_codes, float(pw.global_scale), 40, bf16)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_mxfp4_zero_scale_block_with_codes_counts_for_the_span(rng):
    t = _mx_weight(rng, 16, 64, 4)
    scales = t.scales.copy()
    scales[0, 0] = 0  # 2^-127 over nonzero codes: values of ~1e-38, 120+ binades below the rest
    pw = fp4cupy.prepare(fp4cupy.FP4Tensor(t.data, scales, shape=t.shape, fmt="mxfp4"))
    assert pw.path == "dequantize" and "binades" in pw.reason


def test_mxfp4_zero_scale_blocks_are_read_where_the_codes_live(rng):
    torch = pytest.importorskip("torch")
    t = _mx_weight(rng, 16, 64, 4)
    data, scales = torch.from_numpy(t.data.copy()), torch.from_numpy(t.scales.copy())
    zero_block = int(np.flatnonzero(~(t.data.reshape(16, 2, 16) & 0x77).any(axis=-1).ravel())[0])
    scales.view(-1)[zero_block] = 0  # a zero block: still exact
    kw = prepared.mxfp4_as_nvfp4(fp4cupy.FP4Tensor(data, scales, shape=t.shape, fmt="mxfp4"))
    assert not isinstance(kw, str) and kw.scales.view(-1)[zero_block] == 0
    scales.view(-1)[0] = 0  # over nonzero codes: ~1e-38, out of the span
    assert "binades" in prepared.mxfp4_as_nvfp4(fp4cupy.FP4Tensor(data, scales, shape=t.shape, fmt="mxfp4"))
