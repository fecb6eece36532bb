"""The numpy reference against DESIGN.md section 1 (restated independently in recipe.py)."""
import ml_dtypes
import numpy as np
import pytest

import fp4cupy
from fp4cupy import reference as ref

import recipe

TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
        (7.0, 6.0), (-0.3, -0.5), (0.2500001, 0.5), (1e30, 6.0), (-1e30, -6.0)]


@pytest.mark.parametrize("value,expected", TIES)
def test_e2m1_tie_table(value, expected):
    code = ref.e2m1_encode(np.array([value], np.float32))
    assert ref.e2m1_decode(code)[0] == np.float32(expected)


def test_e2m1_matches_grid_search_on_a_sweep(rng):
    r = np.concatenate([np.linspace(-7, 7, 20001, dtype=np.float32), rng.standard_normal(5000).astype(np.float32) * 3,
                        np.float32([0.0, -0.0, 0.25, -0.25, 5.0, -5.0, np.nextafter(0.25, 1, dtype=np.float32)])])
    got = ref.e2m1_encode(r)
    want = np.array([recipe.e2m1_code(float(v)) for v in r], np.uint8)
    np.testing.assert_array_equal(got, want)


def test_e2m1_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        ref.e2m1_encode(np.array([np.nan], np.float32))


def test_nibble_order():
    # element 2i in the low nibble, 2i+1 in the high nibble
    codes = np.array([[1, 2, 0xF, 0x8]], np.uint8)
    packed = ref.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    np.testing.assert_array_equal(ref.unpack_nibbles(packed), codes)
    t = fp4cupy.quantize(np.array([[3.0, 6.0] + [0.0] * 14], np.float32))  # d = 1: codes 5 (3.0), 7 (6.0)
    assert t.data[0, 0] == 0x75


def test_e4m3_rounding_and_saturation(rng):
    v = np.concatenate([np.float32([0, 2**-10, 2**-9, 1.5 * 2**-9, 2.5 * 2**-9, 2**-6, 447, 448, 460, 464, 500, 1e30]),
                        np.abs(rng.standard_normal(3000).astype(np.float32)) * 10.0 ** rng.uniform(-4, 3, 3000).astype(np.float32)])
    got = ref.e4m3_encode(v)
    want = np.array([recipe.e4m3_code(float(x)) for x in v], np.uint8)
    np.testing.assert_array_equal(got, want)
    assert ref.e4m3_encode(np.float32([1e30]))[0] == 0x7E  # 448, never NaN


def test_all_zero_blocks_and_tensor():
    x = np.zeros((4, 64), np.float32)
    data, scales, g = ref.quantize(x)
    assert g == 1.0 and not data.any() and not scales.any()
    x[1, 16:32] = 1.0
    data, scales, g = ref.quantize(x)
    assert scales[0].tolist() == [0, 0, 0, 0] and data[0].sum() == 0 and data[1, :8].sum() == 0


def test_tiny_blocks_underflow_to_zero_codes():
    x = np.full((1, 32), 1e-12, np.float32)
    x[0, 16] = 1e3  # second block sets amax; first block's scale underflows
    t = fp4cupy.quantize(x)
    assert t.scales[0, 0] == 0 and not t.data[0, :8].any()
    back = fp4cupy.dequantize(t)
    assert np.isfinite(back).all() and (back[0, :16] == 0).all()


def test_subnormal_amax_gives_finite_zero_result():
    x = np.full((1, 16), 1e-44, np.float32)  # amax/2688 underflows: g falls back to 1
    data, scales, g = ref.quantize(x)
    assert g == 1.0 and not scales.any() and not data.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("gs", [8, 16, 32, 64])
def test_reference_equals_recipe_on_gaussian(rng, dtype, gs):
    x = rng.standard_normal((6, 128)).astype(dtype)
    data, scales, g = ref.quantize(x, "nvfp4", gs)
    codes, want_scales, want_g = recipe.nvfp4(x.astype(np.float32), gs)
    assert g == want_g
    np.testing.assert_array_equal(scales, want_scales)
    np.testing.assert_array_equal(ref.unpack_nibbles(data), codes)


def test_reference_equals_recipe_on_heavy_tailed_rows(rng):
    x = (rng.standard_normal((16, 64)) * np.exp(2 * rng.standard_normal((16, 1)))).astype(np.float32)
    data, scales, g = ref.quantize(x)
    codes, want_scales, want_g = recipe.nvfp4(x, 16)
    assert g == want_g
    np.testing.assert_array_equal(scales, want_scales)
    np.testing.assert_array_equal(ref.unpack_nibbles(data), codes)


@pytest.mark.parametrize("mode", ["floor", "rceil", "round"])
def test_mxfp4_against_ocp_rule(rng, mode):
    x = (rng.standard_normal((8, 128)) * np.exp(3 * rng.standard_normal((8, 1)))).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = 1e-40  # subnormal block
    data, scales, g = ref.quantize(x, "mxfp4", scale_mode=mode)
    codes, want_scales = recipe.mxfp4(x, mode)
    assert g == 1.0
    np.testing.assert_array_equal(scales, want_scales)
    np.testing.assert_array_equal(ref.unpack_nibbles(data), codes)


def test_mxfp4_dequantize_is_exact_power_of_two_scaling(rng):
    x = rng.standard_normal((2, 64)).astype(np.float32)
    t = fp4cupy.quantize(x, "mxfp4")
    back = fp4cupy.dequantize(t)
    vals = ref.e2m1_decode(ref.unpack_nibbles(t.data)).reshape(2, 2, 32)
    want = (vals * 2.0 ** (t.scales.astype(np.int32) - 127)[..., None]).reshape(2, 64)
    np.testing.assert_array_equal(back, want.astype(np.float32))


@pytest.mark.parametrize("gs", [8, 16, 32, 64])
def test_round_trip_error_bound(rng, gs):
    x = (rng.standard_normal((32, 256)) * np.exp(rng.standard_normal((32, 1)))).astype(np.float32)
    data, scales, g = ref.quantize(x, "nvfp4", gs)
    back = ref.dequantize(data, scales, g, "nvfp4", gs)
    d = np.repeat(ref.e4m3_decode(scales) * g, gs, axis=-1)
    # the largest E2M1 gap is 2 (between 4 and 6), and saturation after scale rounding costs < d
    assert (np.abs(back - x) <= d * 1.0000001).all()
    assert np.linalg.norm(back - x) / np.linalg.norm(x) < 0.12


def test_dequantize_order_of_operations():
    data, scales, g = ref.quantize(np.linspace(-3, 3, 32, dtype=np.float32).reshape(2, 16))
    vals = ref.e2m1_decode(ref.unpack_nibbles(data)).reshape(2, 1, 16)
    want = ((vals * ref.e4m3_decode(scales)[..., None]) * g).reshape(2, 16)
    np.testing.assert_array_equal(ref.dequantize(data, scales, g), want)


def test_swizzle_offset_formula_and_round_trip(rng):
    rows, cols = 300, 10  # not multiples of 128 / 4: padding on both axes
    s = rng.integers(0, 255, (rows, cols), dtype=np.uint8)
    buf = ref.swizzle_scales(s)
    assert buf.size == 384 * 12
    ktiles = -(-cols // 4)
    for m, k in [(0, 0), (1, 0), (0, 1), (31, 3), (32, 0), (127, 5), (128, 0), (299, 9)]:
        off = (m // 128 * ktiles + k // 4) * 512 + (m % 32) * 16 + (m % 128) // 32 * 4 + k % 4
        assert buf[off] == s[m, k]
    np.testing.assert_array_equal(ref.unswizzle_scales(buf, rows, cols), s)
    assert np.count_nonzero(buf) <= rows * cols
    with pytest.raises(ValueError, match="must hold"):
        ref.unswizzle_scales(buf[:-1], rows, cols)


def test_global_scale_given_saturates():
    x = np.float32([[1000.0] + [1.0] * 15])
    data, scales, g = ref.quantize(x, global_scale=0.01)  # 1000 / (6 * 0.01) > 448
    assert g == np.float32(0.01) and scales[0, 0] == 0x7E
    back = ref.dequantize(data, scales, g)
    assert back[0, 0] == np.float32(6 * 448 * np.float32(0.01))


def test_nonfinite_mark_gives_nan_scales_never_finite_codes():
    x = np.ones((2, 32), np.float32)
    x[0, 3] = np.nan
    x[1, 20] = np.inf
    x[1, 0] = 100.0
    data, scales, g = ref.quantize(x, nonfinite="mark")
    assert scales[0, 0] == 0x7F and scales[1, 1] == 0x7F and not data[0, :8].any()
    assert g == np.float32(100.0) / np.float32(2688)  # amax over the finite values
    back = ref.dequantize(data, scales, g)
    assert np.isnan(back[0, :16]).all() and np.isnan(back[1, 16:]).all() and np.isfinite(back[0, 16:]).all()
    d2, s2, _ = ref.quantize(x, "mxfp4", nonfinite="mark")
    assert s2[0, 0] == 0xFF and s2[1, 0] == 0xFF
    with pytest.raises(ValueError, match="'raise' or 'mark'"):
        ref.quantize(x, nonfinite="ignore")
