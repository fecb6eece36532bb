"""GPU kernels bit-exact with the numpy reference (run on a GPU: pytest -m gpu)."""
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import fp4cupy
from fp4cupy import reference as ref, runtime

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}
CASES = [("nvfp4", 8, None), ("nvfp4", 16, None), ("nvfp4", 32, None), ("nvfp4", 64, None),
         ("mxfp4", 32, "floor"), ("mxfp4", 32, "rceil"), ("mxfp4", 32, "round")]


@pytest.fixture(autouse=True)
def _poisoned_outputs(poison):
    """Every output starts as 0xAB bytes (conftest.poison)."""


def inputs(rng, kind, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "heavy":
        x *= np.exp(2 * rng.standard_normal(shape[:-1] + (1,))).astype(np.float32)
    elif kind == "zero":
        x[:] = 0
    elif kind == "subnormal_scale":
        x[1::2] *= np.float32(1e-9)  # these rows' block scales underflow E4M3
        x[0, 0] = 1e3
    elif kind == "edge":
        vals = np.float32([0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, 7, -0.3, 448, 2688, 1e-40, -1e-30])
        x = np.resize(vals, shape) * rng.choice([1, 2, 0.5, 3], shape[:-1] + (1,)).astype(np.float32)
    return x


def to_torch(x, dtype):
    return torch.from_numpy(np.ascontiguousarray(x)).to("cuda").to(dtype)


@pytest.mark.parametrize("kind", ["gauss", "heavy", "zero", "subnormal_scale", "edge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt,gs,mode", CASES)
def test_quantize_dequantize_bit_exact(rng, kind, dtype, fmt, gs, mode):
    x = to_torch(inputs(rng, kind, (64, 256)), dtype)
    t = fp4cupy.quantize(x, fmt, gs, scale_mode=mode)
    xs = x.cpu().float().numpy()  # the values the kernel saw, in float32
    data, scales, g = ref.quantize(xs, fmt, gs, mode)
    np.testing.assert_array_equal(t.scales.cpu().numpy(), scales)
    np.testing.assert_array_equal(t.data.cpu().numpy(), data)
    assert np.float32(t.global_scale) == g
    for out in (torch.float32, torch.float16, torch.bfloat16):
        got = fp4cupy.dequantize(t, dtype=out)
        want = ref.dequantize(data, scales, g, fmt, gs, NP[out])
        assert got.dtype == out
        np.testing.assert_array_equal(got.cpu().view(torch.int16 if out != torch.float32 else torch.int32).numpy(),
                                      want.view(np.int16 if out != torch.float32 else np.int32))


@pytest.mark.parametrize("gs", [8, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_with_global_scale(rng, gs, dtype):
    x = to_torch(inputs(rng, "heavy", (32, 512)), dtype)
    for g in (1e-3, 0.01, 1.0):  # small g: scales saturate at 448 and codes at +-6
        t = fp4cupy.quantize(x, group_size=gs, global_scale=g)
        data, scales, g32 = ref.quantize(x.cpu().float().numpy(), "nvfp4", gs, global_scale=g)
        np.testing.assert_array_equal(t.scales.cpu().numpy(), scales)
        np.testing.assert_array_equal(t.data.cpu().numpy(), data)
        assert t.global_scale == float(g32)


@pytest.mark.parametrize("g", [1.0, 0.7, 3.1e-5, 123.456])
def test_near_ties_of_the_division(rng, g):
    """Elements within a few ulps of threshold * scale, where an inexact x / d would pick the wrong code."""
    s = ref.e4m3_decode(rng.integers(1, 0x7E, 4096).astype(np.uint8))
    t = np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])[rng.integers(0, 8, (4096, 15))]
    base = (t * (s * np.float32(g))[:, None]).astype(np.float32)
    steps = rng.integers(-3, 4, base.shape)
    x = base.copy()
    for k in range(1, 4):
        x = np.where(steps >= k, np.nextafter(x, np.float32(np.inf)), x)
        x = np.where(steps <= -k, np.nextafter(x, np.float32(-np.inf)), x)
    x *= rng.choice(np.float32([1, -1]), x.shape)
    x = np.concatenate([(np.float32(6) * s * np.float32(g))[:, None], x], axis=1).astype(np.float32)
    t_gpu = fp4cupy.quantize(to_torch(x, torch.float32), global_scale=g)
    data, scales, _ = ref.quantize(x, global_scale=g)
    np.testing.assert_array_equal(t_gpu.scales.cpu().numpy(), scales)
    np.testing.assert_array_equal(t_gpu.data.cpu().numpy(), data)


@pytest.mark.parametrize("g", [1.0, 0.7, 3.1e-5, 123.456, 1e-25, 1e20])
def test_near_ties_of_the_block_scale(rng, g):
    """Block maxima within a few ulps of every E4M3 code and every midpoint between neighbouring
    codes (subnormal ones and the saturation at 448 included), times 6 g: an inexact
    blockamax / (6 g) or a wrong E4M3 rounding picks another scale code. g = 1e-25 and 1e20 take
    the IEEE-division path (6 g outside [2^-60, 2^60])."""
    v = ref.e4m3_decode(np.arange(0x7F, dtype=np.uint8)).astype(np.float64)
    points = np.concatenate([v, (v[:-1] + v[1:]) / 2, [464.0, 480.0, 1e4]]).astype(np.float32)
    d6 = np.float32(6) * np.float32(g)
    bam = (points.astype(np.float64) * np.float64(d6)).astype(np.float32)
    rows = []
    for k in range(-3, 4):
        b = bam.copy()
        for _ in range(abs(k)):
            b = np.nextafter(b, np.float32(np.inf if k > 0 else -np.inf))
        rows.append(b)
    bam = np.abs(np.concatenate(rows))
    x = (rng.uniform(-1, 1, (bam.size, 16)) * bam[:, None]).astype(np.float32)
    x[np.arange(bam.size), rng.integers(0, 16, bam.size)] = bam * rng.choice(np.float32([1, -1]), bam.size)
    t = fp4cupy.quantize(to_torch(x, torch.float32), global_scale=g)
    data, scales, _ = ref.quantize(x, global_scale=g)
    np.testing.assert_array_equal(t.scales.cpu().numpy(), scales)
    np.testing.assert_array_equal(t.data.cpu().numpy(), data)


@pytest.mark.parametrize("fmt,gs,mode", [("nvfp4", 16, None), ("mxfp4", 32, "floor")])
@pytest.mark.parametrize("given", [None, 0.05])
def test_nonfinite_mark_matches_reference(rng, fmt, gs, mode, given):
    x = rng.standard_normal((16, 128)).astype(np.float32)
    x[3, 5], x[7, 100], x[7, 101] = np.nan, np.inf, -np.inf
    if fmt == "mxfp4" and given is not None:
        return
    t = fp4cupy.quantize(to_torch(x, torch.float32), fmt, gs, scale_mode=mode, global_scale=given, nonfinite="mark")
    data, scales, g = ref.quantize(x, fmt, gs, mode, given, nonfinite="mark")
    np.testing.assert_array_equal(t.scales.cpu().numpy(), scales)
    np.testing.assert_array_equal(t.data.cpu().numpy(), data)
    assert np.float32(t.global_scale) == g
    back = fp4cupy.dequantize(t).cpu().numpy()
    assert np.isnan(back[3, :gs]).all() and np.isfinite(back[0]).all()


def test_cupy_arrays_in_cupy_out(rng):
    cp = pytest.importorskip("cupy")
    x = rng.standard_normal((16, 128)).astype(np.float32)
    t = fp4cupy.quantize(cp.asarray(x))
    assert isinstance(t.data, cp.ndarray) and t.device == "cuda:0"
    data, scales, g = ref.quantize(x)
    np.testing.assert_array_equal(t.data.get(), data)
    np.testing.assert_array_equal(fp4cupy.dequantize(t).get(), ref.dequantize(data, scales, g))


def test_pad_on_gpu(rng):
    x = rng.standard_normal((5, 40)).astype(np.float32)
    t = fp4cupy.quantize(to_torch(x, torch.float32), pad=True)
    assert t.shape == (5, 40)
    want = ref.dequantize(*ref.quantize(np.pad(x, [(0, 0), (0, 8)])))[:, :40]
    np.testing.assert_array_equal(fp4cupy.dequantize(t).cpu().numpy(), want)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("given", [None, 0.01])
def test_nan_inf_raise_on_gpu(value, given):
    x = torch.ones(4, 64, device="cuda")
    x[2, 37] = value
    x[3, 1] = value
    with pytest.raises(ValueError, match=r"2 NaN/Inf value\(s\), the first at index \(2, 37\)"):
        fp4cupy.quantize(x, global_scale=given)


@pytest.mark.parametrize("library", ["torch", "cupy"])
@pytest.mark.parametrize("given", [None, 0.01])
def test_nan_inf_raise_from_many_blocks(library, given):
    """The count comes from the grid's last block; a clean call after a failed one sees no stale count."""
    import cupy

    x = torch.randn(4096, 1024, device="cuda")  # 4M elements: ~1000 blocks in each pass
    x[4095, 1023] = float("nan")
    x[1000, 5] = float("inf")
    xin = x if library == "torch" else cupy.from_dlpack(x)
    with pytest.raises(ValueError, match=r"2 NaN/Inf value\(s\), the first at index \(1000, 5\)"):
        fp4cupy.quantize(xin, global_scale=given)
    x[4095, 1023] = x[1000, 5] = 0.0
    fp4cupy.quantize(xin, global_scale=given)


def test_more_than_2_31_elements():
    rows, k = 131072 + 64, 16384  # 2^31 + 2^20 elements of bf16 (4.3 GB)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    t = fp4cupy.quantize(x)
    assert t.global_scale == float(np.float32(x.abs().max().float().item()) / np.float32(2688))
    for sl in (slice(0, 8), slice(rows // 2, rows // 2 + 8), slice(rows - 8, rows)):
        data, scales, _ = ref.quantize(x[sl].cpu().float().numpy(), global_scale=t.global_scale)
        np.testing.assert_array_equal(t.scales[sl].cpu().numpy(), scales)
        np.testing.assert_array_equal(t.data[sl].cpu().numpy(), data)
    back = fp4cupy.dequantize(t, dtype=torch.bfloat16)
    want = ref.dequantize(t.data[-8:].cpu().numpy(), t.scales[-8:].cpu().numpy(), t.global_scale, dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(back[-8:].cpu().view(torch.int16).numpy(), want.view(np.int16))


def test_cuda_graph_capture_and_replay(rng):
    static_x = torch.zeros(64, 256, device="cuda", dtype=torch.bfloat16)
    fp4cupy.quantize(static_x + 1, global_scale=0.01)  # compile and warm up outside capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            t = fp4cupy.quantize(static_x, global_scale=0.01)
            out = fp4cupy.dequantize(t, dtype=torch.bfloat16)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        x = to_torch(rng.standard_normal((64, 256)).astype(np.float32), torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        eager = fp4cupy.dequantize(fp4cupy.quantize(x, global_scale=0.01), dtype=torch.bfloat16)
        assert torch.equal(out, eager) and torch.equal(t.data, fp4cupy.quantize(x, global_scale=0.01).data)


def test_runs_on_torch_current_stream(rng):
    x = to_torch(rng.standard_normal((512, 1024)).astype(np.float32), torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x * 3  # queued on the side stream; quantize must see it without a sync
        t = fp4cupy.quantize(y)
        back = fp4cupy.dequantize(t)
    torch.cuda.current_stream().wait_stream(side)
    data, scales, g = ref.quantize(x.cpu().numpy() * 3)
    np.testing.assert_array_equal(t.data.cpu().numpy(), data)
    np.testing.assert_array_equal(back.cpu().numpy(), ref.dequantize(data, scales, g))


def test_device_queries():
    cc, real, emulated = fp4cupy.get_compute_capability(), torch.cuda.get_device_capability(), runtime.emulated_cc()
    assert cc == (emulated if emulated is not None and emulated < real else real)  # FP4CUPY_EMULATE_CC
    assert fp4cupy.has_hardware_acceleration() == (runtime.target_for(cc) in runtime.FP4_HARDWARE_TARGETS)


# ----------------------------------------------------------------------------- fp4.cuh
API = str(Path(__file__).parent / "kernels" / "fp4_api_check.cu")


def test_fp4_cuh_against_reference(rng):
    import cupy as cp

    mod = runtime.load(API, 0)
    sweep = np.concatenate([np.linspace(-8, 8, 40001, dtype=np.float32), ref.e2m1_decode(np.arange(16)),
                            (rng.standard_normal(20000) * 10.0 ** rng.uniform(-45, 38, 20000)).astype(np.float32),
                            np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 448, 464, 1e-40, 2**-10, 2**-9])])
    sweep = sweep[: sweep.size // 2 * 2]
    n = sweep.size
    x = cp.asarray(sweep)
    code, e4 = cp.zeros(n, cp.uint8), cp.zeros(n, cp.uint8)
    back, e4b = cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
    ef, er, eo = cp.zeros(n, cp.int32), cp.zeros(n, cp.int32), cp.zeros(n, cp.int32)
    mod.get_function("fp4_api_scalar")(((n + 255) // 256,), (256,), (x, code, back, e4, e4b, ef, er, eo, np.int64(n)))
    want_code = ref.e2m1_encode(sweep)
    np.testing.assert_array_equal(code.get(), want_code)
    np.testing.assert_array_equal(back.get(), ref.e2m1_decode(want_code))
    a = np.abs(sweep)
    np.testing.assert_array_equal(e4.get(), ref.e4m3_encode(a))
    np.testing.assert_array_equal(e4b.get(), ref.e4m3_decode(ref.e4m3_encode(a)))
    np.testing.assert_array_equal(ef.get(), ref._mxfp4_floor(a, 1)[1])
    np.testing.assert_array_equal(er.get(), ref._mxfp4_rceil(a, 1)[1])
    np.testing.assert_array_equal(eo.get(), ref._mxfp4_round(a, 1)[1])

    npairs = n // 2
    packed = cp.zeros(npairs, cp.uint8)
    f, h, b = (cp.zeros(n, cp.float32) for _ in range(3))
    mod.get_function("fp4_api_pairs")(((npairs + 255) // 256,), (256,), (x, packed, f, h, b, np.int64(npairs)))
    np.testing.assert_array_equal(packed.get(), ref.pack_nibbles(want_code))
    for got in (f, h, b):
        np.testing.assert_array_equal(got.get(), ref.e2m1_decode(want_code))

    add, mul, fma = cp.zeros(256, cp.uint8), cp.zeros(256, cp.uint8), cp.zeros(256, cp.float32)
    mod.get_function("fp4_api_arith")((1,), (256,), (add, mul, fma))
    lo = ref.e2m1_decode(np.arange(256) & 15)
    hi = ref.e2m1_decode(np.arange(256) >> 4)
    np.testing.assert_array_equal(add.get(), ref.e2m1_encode(lo + hi))
    np.testing.assert_array_equal(mul.get(), ref.e2m1_encode(lo * hi))
    np.testing.assert_array_equal(fma.get(), (lo * hi + np.float32(0.25)).astype(np.float32))

    c1, b1 = cp.zeros(1, cp.uint8), cp.zeros(1, cp.float32)
    mod.get_function("fp4_api_nan")((1,), (1,), (c1, b1))
    assert int(c1.get()[0]) == 0xFF and np.isnan(b1.get()[0])


def test_fp4_cuh_pair_conversion_of_nan_traps():
    code = (
        "import cupy as cp, numpy as np\nfrom fp4cupy import runtime\n"
        f"m = runtime.load({API!r}, 0)\nout = cp.zeros(1, cp.uint8)\n"
        "m.get_function('fp4_api_pack_nan')((1,), (1,), (out,))\nprint(out.get())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "Error" in r.stderr


def test_user_rawkernel_includes_fp4_cuh():
    import cupy as cp

    k = cp.RawKernel(r'''
    #include <fp4.cuh>
    extern "C" __global__ void enc(const float* x, unsigned char* y) { y[threadIdx.x] = __float2fp4(x[threadIdx.x]).__x; }
    ''', "enc", options=("-I" + fp4cupy.include_dir(), "-I" + runtime.cuda_include_dir()))
    x = cp.asarray(np.float32([0.25, 0.75, 5.0, -0.3]))
    y = cp.zeros(4, cp.uint8)
    k((1,), (4,), (x, y))
    assert y.get().tolist() == [0, 2, 6, 9]
