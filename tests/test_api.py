"""Public API on the CPU: input handling, FP4Tensor, gemm / linear, the seed's forms and snippets."""
import ml_dtypes
import numpy as np
import pytest

import fp4cupy
from fp4cupy import FP4Tensor
from fp4cupy import reference as ref

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_float_dtypes_accepted(rng, dtype):
    x = rng.standard_normal((4, 32)).astype(dtype)
    t = fp4cupy.quantize(x)
    data, scales, g = ref.quantize(x.astype(np.float32))
    np.testing.assert_array_equal(t.data, data)
    np.testing.assert_array_equal(t.scales, scales)


@pytest.mark.parametrize("bad", [np.arange(32), np.ones(32, np.complex64), np.ones(32, bool), np.ones(32, np.uint8)])
def test_non_float_dtypes_raise_type_error(bad):
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64; got dtype"):
        fp4cupy.quantize(bad)


def test_zero_dim_and_empty_raise():
    with pytest.raises(ValueError, match="0-d"):
        fp4cupy.quantize(np.float32(1.0))
    with pytest.raises(ValueError, match="empty"):
        fp4cupy.quantize(np.zeros((0, 16), np.float32))
    with pytest.raises(ValueError, match="0-d"):
        fp4cupy.linear(np.float16(1.0), fp4cupy.quantize(np.ones((8, 16), np.float32)))


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_linear_of_no_tokens_is_empty_like_f_linear(library):
    """An MoE expert that no token chose gets x [0, K]: y [0, N] in x's dtype, as torch's F.linear."""
    x, w = np.zeros((2, 0, 16), np.float16), np.ones((8, 16), np.float32)
    if library == "torch":
        torch = pytest.importorskip("torch")
        x, w = torch.from_numpy(x), torch.from_numpy(w)
    y = fp4cupy.linear(x, fp4cupy.quantize(w), np.ones(8, np.float16) if library == "numpy" else None)
    assert y.shape == (2, 0, 8) and fp4cupy.arrays.dtype_name(y) == "float16"
    assert fp4cupy.arrays.library_of(y) == library


def test_last_dim_not_multiple_names_the_multiple():
    with pytest.raises(ValueError, match="multiple of group_size=16.*pad=True"):
        fp4cupy.quantize(np.ones((2, 20), np.float32))


def test_pad_remembers_true_shape(rng):
    x = rng.standard_normal((3, 20)).astype(np.float32)
    t = fp4cupy.quantize(x, pad=True)
    assert t.shape == (3, 20) and t.padded_shape == (3, 32) and t.data.shape == (3, 16)
    back = fp4cupy.dequantize(t)
    full = ref.dequantize(*ref.quantize(np.pad(x, [(0, 0), (0, 12)])))
    np.testing.assert_array_equal(back, full[:, :20])


@pytest.mark.parametrize("where", [(0, 5), (2, 31)])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_inf_raise_with_count_and_first_index(where, value):
    x = np.ones((3, 32), np.float32)
    x[where] = value
    x[2, 31] = value
    n = 1 if where == (2, 31) else 2
    with pytest.raises(ValueError, match=rf"{n} NaN/Inf value\(s\), the first at index \({where[0]}, {where[1]}\)"):
        fp4cupy.quantize(x)


def test_float64_overflowing_float32_is_rejected():
    with pytest.raises(ValueError, match="beyond the float32 range"):
        fp4cupy.quantize(np.full(16, 1e300))


def test_bad_format_group_and_mode():
    x = np.ones((1, 32), np.float32)
    with pytest.raises(ValueError, match="known formats: nvfp4, mxfp4"):
        fp4cupy.quantize(x, "int4")
    with pytest.raises(ValueError, match="allowed: 8, 16, 32, 64"):
        fp4cupy.quantize(x, group_size=12)
    with pytest.raises(ValueError, match="allowed: 32"):
        fp4cupy.quantize(x, "mxfp4", group_size=16)
    with pytest.raises(ValueError, match="allowed: floor, rceil, round"):
        fp4cupy.quantize(x, "mxfp4", scale_mode="up")
    with pytest.raises(ValueError, match="positive finite"):
        fp4cupy.quantize(x, global_scale=-1.0)
    with pytest.raises(ValueError, match="no global scale"):
        fp4cupy.quantize(x, "mxfp4", global_scale=1.0)


def test_leading_dims(rng):
    x = rng.standard_normal((2, 3, 4, 32)).astype(np.float32)
    t = fp4cupy.quantize(x)
    assert t.shape == x.shape and t.data.shape == (2, 3, 4, 16) and t.scales.shape == (2, 3, 4, 2)
    np.testing.assert_array_equal(fp4cupy.dequantize(t).reshape(-1, 32), fp4cupy.dequantize(fp4cupy.quantize(x.reshape(-1, 32))))


# ----------------------------------------------------------------------------- FP4Tensor
def test_fp4tensor_fields_tuple_and_immutability(rng):
    x = rng.standard_normal((256, 512)).astype(np.float32)
    t = fp4cupy.quantize(x)
    data, scales, g = t
    assert data is t.data and scales is t.scales and isinstance(g, float)
    assert t.nbytes == 256 * 256 + 256 * 32 + 4 and t.device == "cpu" and t.fmt == "nvfp4" and t.group_size == 16
    with pytest.raises(AttributeError, match="immutable"):
        t.data = data
    r = repr(t)
    assert "(256, 512)" in r and "nvfp4" in r and "smaller" in r


def test_fp4tensor_validates_construction():
    d, s = np.zeros((4, 8), np.uint8), np.zeros((4, 1), np.uint8)
    FP4Tensor(d, s, 1.0)
    with pytest.raises(ValueError, match="inconsistent FP4 shapes"):
        FP4Tensor(d, np.zeros((4, 2), np.uint8), 1.0)
    with pytest.raises(TypeError, match="must be uint8"):
        FP4Tensor(d.astype(np.int8), s, 1.0)
    with pytest.raises(TypeError, match="numpy, CuPy or torch"):
        FP4Tensor([[0] * 8] * 4, s, 1.0)
    with pytest.raises(ValueError, match="positive finite"):
        FP4Tensor(d, s, float("nan"))
    with pytest.raises(ValueError, match="does not fit"):
        FP4Tensor(d, s, 1.0, shape=(4, 40))


def test_dlpack_exports_packed_data_zero_copy(rng):
    t = fp4cupy.quantize(rng.standard_normal((8, 64)).astype(np.float32))
    v = torch.from_dlpack(t)
    assert v.dtype == torch.uint8 and v.data_ptr() == t.data.ctypes.data
    assert np.from_dlpack(t).ctypes.data == t.data.ctypes.data


def test_swizzled_scales_and_to_cpu(rng):
    t = fp4cupy.quantize(rng.standard_normal((130, 64)).astype(np.float32))
    np.testing.assert_array_equal(ref.unswizzle_scales(t.swizzled_scales(), 130, 4), t.scales)
    assert t.to("cpu") is t
    with pytest.raises(ValueError, match="device must be"):
        t.to("tpu")


# ----------------------------------------------------------------------------- torch in, torch out
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_cpu_in_torch_out(rng, dtype):
    x = torch.from_numpy(rng.standard_normal((4, 64)).astype(np.float32)).to(dtype)
    t = fp4cupy.quantize(x)
    assert isinstance(t.data, torch.Tensor) and t.data.dtype == torch.uint8
    want = ref.quantize(x.float().numpy())
    assert np.array_equal(t.data.numpy(), want[0]) and np.array_equal(t.scales.numpy(), want[1])
    out = fp4cupy.dequantize(t, dtype=dtype)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_array_equal(out.float().numpy(), ref.dequantize(*want).astype(np.float32).astype(
        {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}[dtype]).astype(np.float32))


def test_torch_cpu_input_is_read_zero_copy():
    from fp4cupy import arrays

    x = torch.randn(4, 32)
    assert arrays.to_numpy(x).ctypes.data == x.data_ptr()
    xb = x.bfloat16()
    assert arrays.to_numpy(xb).ctypes.data == xb.data_ptr()


def test_dequantize_dtypes_and_errors(rng):
    t = fp4cupy.quantize(rng.standard_normal((2, 32)).astype(np.float32))
    assert fp4cupy.dequantize(t).dtype == np.float32
    assert fp4cupy.dequantize(t, dtype=np.float16).dtype == np.float16
    assert fp4cupy.dequantize(t, dtype="bfloat16").dtype == ml_dtypes.bfloat16
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        fp4cupy.dequantize(t, dtype=np.int32)
    with pytest.raises(TypeError, match="FP4Tensor, or"):
        fp4cupy.dequantize(t.data)


# ----------------------------------------------------------------------------- gemm / linear
def _f64(t):
    return np.asarray(fp4cupy.dequantize(t), np.float64)


def test_gemm_both_layouts_and_seed_form(rng):
    a = fp4cupy.quantize(rng.standard_normal((32, 64)).astype(np.float32))
    b_kn = fp4cupy.quantize(rng.standard_normal((64, 48)).astype(np.float32))
    b_nk = fp4cupy.quantize(rng.standard_normal((48, 64)).astype(np.float32))
    c = fp4cupy.gemm(a, b_kn)
    want = _f64(a) @ _f64(b_kn)
    assert c.shape == (32, 48) and c.dtype == np.float32
    assert np.linalg.norm(c - want) / np.linalg.norm(want) < 1e-6
    c2 = fp4cupy.gemm(a, b_nk, trans_b=True)
    want2 = _f64(a) @ _f64(b_nk).T
    assert np.linalg.norm(c2 - want2) / np.linalg.norm(want2) < 1e-6
    c3 = fp4cupy.gemm(a.data, a.scales, a.global_scale, b_kn.data, b_kn.scales, b_kn.global_scale, 32, 48, 64, group_size=16)
    np.testing.assert_array_equal(c3, c)
    with pytest.raises(ValueError, match="inner dimensions"):
        fp4cupy.gemm(a, b_nk)
    with pytest.raises(TypeError, match="9 arguments"):
        fp4cupy.gemm(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_dequantized_weight(rng, dtype):
    w = fp4cupy.quantize(rng.standard_normal((24, 64)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((2, 5, 64)).astype(np.float32)).to(dtype)
    bias = torch.from_numpy(rng.standard_normal(24).astype(np.float32))
    y = fp4cupy.linear(x, w, bias)
    want = x.double().numpy() @ _f64(w).T + bias.double().numpy()
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert np.linalg.norm(y.double().numpy() - want) / np.linalg.norm(want) < tol
    with pytest.raises(ValueError, match="K=32"):
        fp4cupy.linear(x[..., :32], w)


def test_device_queries_without_gpu():
    assert fp4cupy.has_hardware_acceleration() is False
    assert fp4cupy.get_compute_capability() is None
    assert fp4cupy.version() == fp4cupy.__version__


# ----------------------------------------------------------------------------- the seed's snippets
def test_seed_quick_start_and_api_on_cpu():
    import fp4cupy as cuda_fp4_ext

    fp32_tensor = torch.randn(128, 128)
    fp4_data, scales, global_scale = cuda_fp4_ext.quantize(fp32_tensor)
    recovered = cuda_fp4_ext.dequantize(fp4_data, scales, global_scale, 128, 128)
    assert recovered.shape == (128, 128) and recovered.dtype == torch.float32
    assert (torch.abs(fp32_tensor - recovered).max() < 1.0).item()

    M, N, K = 128, 128, 64
    A_fp32, B_fp32 = torch.randn(M, K), torch.randn(K, N)
    A_data, A_scales, A_global = cuda_fp4_ext.quantize(A_fp32, group_size=16)
    B_data, B_scales, B_global = cuda_fp4_ext.quantize(B_fp32, group_size=16)
    C_fp4 = cuda_fp4_ext.gemm(A_data, A_scales, A_global, B_data, B_scales, B_global, M, N, K, group_size=16)
    assert C_fp4.shape == (M, N)
    rel = torch.linalg.norm(C_fp4 - A_fp32 @ B_fp32) / torch.linalg.norm(A_fp32 @ B_fp32)
    assert rel < 0.2
    print(f"   Version: {cuda_fp4_ext.version()}, global {global_scale:.6f}")
    assert cuda_fp4_ext.has_hardware_acceleration() is False


def test_numpy_to_torch_keeps_a_0d_array_0d():
    pytest.importorskip("torch")
    from fp4cupy import arrays

    for a in (np.float32(2.5), np.asarray(2.5, np.float32)):
        t = arrays.numpy_to(np.asarray(a), "torch")
        assert t.shape == () and float(t) == 2.5
    assert arrays.numpy_to(np.ones((2, 3), np.float32), "torch").shape == (2, 3)
