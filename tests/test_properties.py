"""Hypothesis property tests of the reference: round-trip bounds and shape handling (2,000 examples each)."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fp4cupy
from fp4cupy import reference as ref

SETTINGS = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
finite = st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_infinity=False, width=32)


@SETTINGS
@given(st.sampled_from([8, 16, 32, 64]), st.integers(1, 3), st.integers(1, 3), st.data())
def test_nvfp4_round_trip_bound(gs, rows, nblocks, data):
    x = data.draw(hnp.arrays(np.float32, (rows, nblocks * gs), elements=finite))
    d, s, g = ref.quantize(x, "nvfp4", gs)
    back = ref.dequantize(d, s, g, "nvfp4", gs)
    assert np.isfinite(back).all()
    div = np.repeat(ref.e4m3_decode(s) * g, gs, axis=-1).astype(np.float64)
    err = np.abs(back.astype(np.float64) - x)
    # within one step of the divisor, or (saturated at 6, e.g. when a subnormal E4M3 scale rounded
    # down) |x| - 6 * divisor; an underflowed block is 0
    ax = np.abs(x.astype(np.float64))
    bound = np.where(ax > 6 * div, ax - 6 * div + 6 * div * 1e-7, div * 1.0000001)
    assert ((err <= bound + 1e-45) | (back == 0)).all()
    assert (np.abs(back) <= np.abs(x).max() * 1.07 + 1e-38).all()  # E4M3 rounds the scale by <= 1/16
    assert (np.sign(back) * np.sign(x) >= 0).all()


@SETTINGS
@given(st.sampled_from(["floor", "rceil", "round"]), st.integers(1, 3), st.data())
def test_mxfp4_round_trip_bound(mode, rows, data):
    x = data.draw(hnp.arrays(np.float32, (rows, 64), elements=finite))
    d, s, _ = ref.quantize(x, "mxfp4", scale_mode=mode)
    back = ref.dequantize(d, s, 1.0, "mxfp4")
    scale = np.repeat(ref.e8m0_decode(s), 32, axis=-1).astype(np.float64)
    err = np.abs(back.astype(np.float64) - x)
    # half the largest gap (1 between 4 and 6), plus saturation: floor allows |x|/scale < 8, round < 7
    bound = scale * {"floor": 2.0, "rceil": 1.0, "round": 1.0}[mode]
    assert (err <= bound * 1.0000001 + 1e-45).all()


@SETTINGS
@given(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5), st.sampled_from([8, 16, 32]), st.booleans())
def test_shapes_and_padding(shape, gs, pad):
    k = shape[-1] * (gs if not pad else 3)
    shape = shape[:-1] + (k,)
    x = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
    if k % gs and not pad:
        return
    t = fp4cupy.quantize(x, group_size=gs, pad=pad)
    kp = -(-k // gs) * gs
    assert t.shape == shape and t.data.shape == shape[:-1] + (kp // 2,) and t.scales.shape == shape[:-1] + (kp // gs,)
    assert fp4cupy.dequantize(t).shape == shape


def test_saturation_under_a_subnormal_scale():
    """Found by the property above: a block whose E4M3 scale is subnormal and rounds down saturates
    at 6 * scale * g (the recipe), one step plus a little away from x."""
    x = np.zeros((1, 128), np.float32)
    x[0, 0], x[0, 64] = 3.1032718e24, 6.1012797e29
    d, s, g = ref.quantize(x, "nvfp4", 64)
    assert s[0, 0] == 1  # the smallest subnormal E4M3 scale, 2^-9
    back = ref.dequantize(d, s, g, "nvfp4", 64)
    assert back[0, 0] == np.float32(np.float32(6 * 2.0**-9) * g)
