"""The tiled mma.sync W4A16 kernel (w4a16_tiled.cu: Turing, Ampere, Ada and Blackwell from 33
tokens) against float64, on whatever GPU runs the tests: on sm_90a the warpgroup kernel is switched
off (``no_warpgroup``) so that linear takes the path those GPUs take. Outputs start poisoned.
test_gpu_turing.py runs this file as sm_75 too (fp16 only: no bf16 MMA there)."""
import pytest

import fp4cupy
from fp4cupy import cuda_linear, cuda_tiled, runtime

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
from gpu_reference import TOL, gen, reference, rel  # noqa: E402
DTYPES = [torch.float16] + ([torch.bfloat16] if (runtime.compute_capability(0) or (8, 0)) >= (8, 0) else [])


@pytest.fixture(autouse=True)
def no_warpgroup(poison, monkeypatch):
    """linear's output starts as 0xAB bytes, no call takes w4a16_wgmma.cu, and small weights take
    the tiled kernel from 33 tokens too."""
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: False)
    monkeypatch.setattr(cuda_linear, "TILED_SMALL_WEIGHTS", 0)


def weight(n, k, seed, fmt="nvfp4"):
    g = gen(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * torch.exp(torch.randn(n, 1, device="cuda", generator=g))
    return fp4cupy.prepare(fp4cupy.quantize(w, fmt)), g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)])
def test_benchmark_shapes(n, k, dtype):
    pw, g = weight(n, k, n + k)
    for m in (33, 64, 65, 128):
        assert not cuda_linear.uses_warpgroup_kernel(m, n, k, 0)
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        assert rel(fp4cupy.linear(x, pw), reference(x, pw.weight)) <= TOL[dtype], m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [33, 47, 100, 128])
def test_ragged_n_batch_dims_and_bias(m, dtype):
    """N = 200 (a partial row tile, a partial block of 256 rows), two leading dims, a bias."""
    pw, g = weight(200, 640, m)
    x = torch.randn(2, m // 2, 640, device="cuda", generator=g).to(dtype)
    bias = torch.randn(200, device="cuda", generator=g).to(dtype)
    y = fp4cupy.linear(x, pw, bias)
    assert y.shape == (2, m // 2, 200) and y.dtype == dtype
    assert rel(y, reference(x, pw.weight, bias)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,m", [(1000, 64 * 37, 50), (4096, 2048, 128), (300, 64 * 9, 17), (520, 64 * 20, 70)])
def test_split_or_not(n, k, m, dtype):
    """The plan's K splits and none: both match float64, the split launches bit for bit from run to
    run (their sums are added in split order)."""
    pw, g = weight(n, k, n + m)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    want = reference(x, pw.weight)
    p = cuda_tiled.tiled_plan(n, k, m, dtype == torch.bfloat16, 0)
    assert p.splits > 1, p  # 2-8 blocks of 256 rows x 64 tokens leave most SMs idle
    one = cuda_tiled.TiledPlan(launch=p.launch, finish=p.finish, grid=(p.grid[0] // p.splits, p.grid[1]), splits=1,
                               cps=k // 64, name=p.name)
    outs = []
    for q in (p, p, one):
        y = torch.empty(m, n, device="cuda", dtype=dtype).fill_(float("nan"))
        cuda_tiled.launch_tiled(q, m, n, k, torch.cuda.current_stream().cuda_stream, cuda_linear.kernel_args(pw, x, y),
                                cuda_linear._torch_scratch(x))
        assert rel(y, want) <= TOL[dtype], q
        outs.append(y)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_rows_read_back_the_weight_exactly(dtype):
    """x = rows of the identity: y = deq(W) columns exactly (one product, one rounding), with one
    and two token tiles of 64 and K split (96 rows leave the grid mostly idle)."""
    pw, _ = weight(96, 1024, 7)
    eye = torch.eye(1024, device="cuda", dtype=dtype)
    for rows in (slice(0, 33), slice(100, 164), slice(3, 131)):
        y = fp4cupy.linear(eye[rows], pw)
        torch.testing.assert_close(y, fp4cupy.dequantize(pw.weight).T[rows].to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_weight(dtype):
    pw, g = weight(640, 2048, 11, "mxfp4")
    assert pw.path == "mma"
    x = torch.randn(80, 2048, device="cuda", generator=g).to(dtype)
    assert rel(fp4cupy.linear(x, pw), reference(x, pw.weight)) <= TOL[dtype]


def test_plan_splits_k_only_where_the_grid_leaves_sms_idle():
    sms = cuda_linear._sm_count(0)
    big = cuda_tiled.tiled_plan(28672, 8192, 128, False, 0)
    assert big.splits == 1 and big.grid == (2, 112) and big.name == "w4a16_tiled_f16"  # 224 blocks: two a SM
    small = cuda_tiled.tiled_plan(4096, 4096, 128, True, 0)
    assert small.splits > 1 and small.grid[0] * small.grid[1] <= 2 * sms and small.name == "w4a16_tiled_bf16"
