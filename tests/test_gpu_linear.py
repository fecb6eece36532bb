"""GPU linear (W4A16 kernel) and FP4 x FP4 gemm against float64 references (run on a GPU: pytest -m gpu).

Every check draws fresh inputs and every output buffer starts poisoned (conftest.poison).
"""
import numpy as np
import pytest

import fp4cupy
from fp4cupy import cuda_linear, cuda_wgmma, mma_plan, prepared, runtime

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
from gpu_reference import TOL, gen, reference, rel  # noqa: E402
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]


@pytest.fixture(autouse=True)
def _poisoned_outputs(poison):
    """linear's output starts as 0xAB bytes."""


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_linear_on_the_benchmark_shapes(n, k, dtype):
    g = gen(n + k)
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)))
    assert pw.path == "mma"
    for m in (1, 16, 128, 2048):
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        y = fp4cupy.linear(x, pw)
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel(y, reference(x, pw.weight)) <= TOL[dtype], m


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17, 33, 129])
def test_odd_m_ragged_n_batch_dims_and_bias(m, dtype):
    g = gen(m)
    w = fp4cupy.quantize(torch.randn(200, 512, device="cuda", generator=g))  # N=200: not a tile multiple
    x = torch.randn(2, m, 512, device="cuda", generator=g).to(dtype)
    bias = torch.randn(200, device="cuda", generator=g).to(dtype)
    y = fp4cupy.linear(x, fp4cupy.prepare(w), bias)
    assert y.dtype == dtype and y.shape == (2, m, 200)
    assert rel(y, reference(x, w, bias)) <= TOL[dtype]
    assert rel(fp4cupy.linear(x, w, bias), reference(x, w, bias)) <= TOL[dtype]  # unprepared: repacked per call


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_129_to_256_tokens_in_slices_on_large_weights(dtype):
    """Past 128 tokens on sm_90a a weight of more than 32 Mi values runs in slices of at most 128
    tokens through the warpgroup kernel (elsewhere dequantize + cuBLAS): each slice of y matches,
    through torch (the host-lean path, batch dims, a bias) and CuPy."""
    n, k = 8192, 4160  # 34 Mi values
    g = gen(n + k)
    w = fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g))
    pw = fp4cupy.prepare(w)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    for m, lead in ((129, (129,)), (200, (2, 100)), (256, (256,))):
        assert cuda_linear.kernels_take(m, n, k, 0) == cuda_linear._wg_ok(0)
        x = torch.randn(*lead, k, device="cuda", generator=g).to(dtype)
        y, want = fp4cupy.linear(x, pw, bias).reshape(m, n), reference(x, w, bias).reshape(m, n)
        half = -(-m // 2)  # two slices: [0, half), [half, m)
        assert rel(y[:half], want[:half]) <= TOL[dtype] and rel(y[half:], want[half:]) <= TOL[dtype], m
    assert not cuda_linear.kernels_take(0, n, k, 0)
    for x in (torch.empty(2, 0, k, device="cuda", dtype=dtype), torch.empty(0, k, device="cuda", dtype=dtype)):
        for weight in (pw, w):  # no tokens: an empty y on the host-lean path and the dequantizing one
            y = fp4cupy.linear(x, weight, bias)
            assert y.shape == x.shape[:-1] + (n,) and y.dtype == dtype and y.is_cuda
    if dtype is torch.float16:  # CuPy arrays: fp4cupy.linear's own path
        cupy = pytest.importorskip("cupy")
        rs = cupy.random.RandomState(3)
        wc = fp4cupy.quantize(rs.standard_normal((n, k), dtype=cupy.float32))
        xc = rs.standard_normal((200, k), dtype=cupy.float32).astype(cupy.float16)
        yc = fp4cupy.linear(xc, fp4cupy.prepare(wc))
        want = xc.astype(cupy.float64) @ fp4cupy.dequantize(wc).astype(cupy.float64).T
        assert isinstance(yc, cupy.ndarray) and float(cupy.linalg.norm(yc - want) / cupy.linalg.norm(want)) <= TOL[dtype]
        empty = fp4cupy.linear(xc[:0], fp4cupy.prepare(wc))
        assert isinstance(empty, cupy.ndarray) and empty.shape == (0, n) and empty.dtype == cupy.float16


def test_poison_reaches_the_host_lean_output():
    y = cuda_linear._new_output(torch.empty(3, 64, device="cuda", dtype=torch.float16), (3,), 5)
    assert y.shape == (3, 5) and bool((y.view(torch.uint8) == 0xAB).all())


@pytest.mark.parametrize("m,dtype,rows_a_block,want", [
    (1, torch.float16, 32, "w4a16_rt2_nt1_u1_w4_f16"), (7, torch.float16, 32, "w4a16_rt2_nt1_u1_w4_f16"),
    (16, torch.float16, 16, "w4a16_rt1_nt2_u1_w4_f16"),
    (13, torch.bfloat16, 16, "w4a16_rt1_nt2_u1_w4_bf16")])
def test_linear_where_the_plan_takes_the_capped_4_warp_kernels(m, dtype, rows_a_block, want):
    """N sized so that the blocks fill ~99% of one wave at seven a SM (the 4-warp kernels under the
    72-register cap), with a ragged last tile; through fp4cupy.linear, against float64."""
    sms = cuda_linear._sm_count(0)
    n, k = (7 * sms - 1) * rows_a_block - 8, 256
    assert mma_plan.plan(n, k, m, dtype == torch.bfloat16, 0).name == want
    g = gen(n + m)
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g)))
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    assert rel(fp4cupy.linear(x, pw), reference(x, pw.weight)) <= TOL[dtype]


@pytest.mark.parametrize("m,dtype,tiles_a_sm", [(1, torch.bfloat16, 9), (5, torch.float16, 11), (3, torch.bfloat16, 11)])
def test_linear_where_one_tile_blocks_leave_the_busiest_sm_less_work(m, dtype, tiles_a_sm):
    """N of an odd number of row tiles a SM, less 8 rows (ragged): one-tile blocks leave the busiest
    SM a tile less than two-tile ones, so the plan takes a one-tile kernel as 4 warps (the driver's
    occupancy picks uncapped or capped); through fp4cupy.linear, against float64."""
    sms, bf16 = cuda_linear._sm_count(0), dtype == torch.bfloat16
    n, k = tiles_a_sm * sms * 16 - 8, 1024
    one = mma_plan._one_tile_rounds(-(-n // 16), mma_plan.TWO_AND_ONE[1][1], bf16, 0)
    p = mma_plan.plan(n, k, m, bf16, 0)
    assert one is not None and p.name == mma_plan.kernel_name(*one, bf16) and p.threads == 128
    g = gen(n + m)
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g)))
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    assert rel(fp4cupy.linear(x, pw), reference(x, pw.weight)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nt", sorted(mma_plan.SPLIT_VARIANTS))
def test_k_split_over_a_cluster(nt, dtype):
    """The one-tile kernels with K split over clusters of 2, 4 and 8 blocks (sm_90+): ragged N, odd M,
    a chunk count no split size divides (37: the last of 8 splits gets 2 chunks), bias; the cluster
    adds its blocks' sums in split order, so two calls agree bit for bit."""
    if runtime.compute_capability(0) < (9, 0):
        pytest.skip("thread block clusters need sm_90")
    variant = mma_plan.SPLIT_VARIANTS[nt]
    g = gen(nt)
    n, k = 1000, 64 * 37
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g) * 3))
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    stream = torch.cuda.current_stream().cuda_stream
    for splits in mma_plan.SPLITS:
        for m, warps in ((8 * nt - 1, 4), (8 * nt, 8), (3, 1)):
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            p = mma_plan.make_plan(n, m, variant, warps, dtype == torch.bfloat16, 0, splits)
            outs = []
            for _ in range(2):
                y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                p.launch(p.grid, p.threads, p.shared, stream, *cuda_linear.kernel_args(pw, x, y, bias), m, n, k)
                outs.append(y)
            torch.cuda.synchronize()
            assert rel(outs[0], reference(x, pw.weight, bias)) <= TOL[dtype], (splits, m, warps)
            assert torch.equal(outs[0], outs[1]), (splits, m, warps)


@pytest.mark.parametrize("m,n,k,want,warps", [
    (1, 1024, 8192, "w4a16_rt1_nt1_u2_s4_f16", 8), (1, 512, 28672, "w4a16_rt1_nt1_u2_s8_f16", 4),
    (16, 2048, 8192, "w4a16_rt1_nt2_u2_s2_f16", 8), (16, 2560, 8192, "w4a16_rt1_nt2_u2_s2_f16", 4),
    (1, 4096, 8192, "w4a16_rt1_nt1_u2_f16", 8), (1, 6144, 4096, "w4a16_rt1_nt1_u2_f16", 8),
    (16, 4608, 14336, "w4a16_rt1_nt2_u2_f16", 4), (1, 8192, 8192, "w4a16_rt2_nt1_u2_f16", 8),
    (1, 4608, 3584, "w4a16_rt1_nt1_u2_f16", 8), (16, 2560, 5120, "w4a16_rt1_nt2_u2_f16", 8)])  # short K: no split
def test_linear_splits_k_over_clusters_for_few_rows(m, n, k, want, warps):
    """Through fp4cupy.linear where the one-wave plan picks the launch, K split over clusters or
    not (on an H100 or H200: 132 SMs, whose driver occupancy the plan reads), against float64."""
    if runtime.compute_capability(0) < (9, 0) or cuda_linear._sm_count(0) != 132:
        pytest.skip("the plan's split counts here are those of a 132-SM sm_90 GPU")
    p = mma_plan.plan(n, k, m, False, 0)
    assert (p.name, p.threads // 32) == (want, warps)
    g = gen(n + m)
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g)))
    x = torch.randn(m, k, device="cuda", generator=g).half()
    assert rel(fp4cupy.linear(x, pw), reference(x, pw.weight)) <= TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_mxfp4_weights_take_the_kernel(m, dtype):
    """An MXFP4 weight whose block exponents span ~14 binades, prepared as the NVFP4 tensor of the same values."""
    g = gen(100 + m)
    rows = torch.exp2(torch.linspace(-6, 6, 1000, device="cuda"))[:, None]
    w = torch.randn(1000, 512, device="cuda", generator=g) * rows
    w[3, 64:96] = 0  # a zero block (scale byte 0): looked at on the GPU, still exact
    t = fp4cupy.quantize(w, "mxfp4")
    assert int(t.scales[3, 2]) == 0
    pw = fp4cupy.prepare(t)
    assert pw.path == "mma" and pw.weight.fmt == "mxfp4"
    x = torch.randn(m, 512, device="cuda", generator=g).to(dtype)
    assert rel(fp4cupy.linear(x, pw), reference(x, pw.weight)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", mma_plan.VARIANTS)
def test_every_kernel_variant(variant, dtype):
    rt, nt, u, max_warps = variant
    g = gen(rt * 100 + nt * 10 + u + max_warps)
    n, k = 16 * 4 * rt + 8, 64 * 13
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g) * 3))
    for m, warps in ((8 * nt - 1, 1), (8 * nt, 3), (8 * nt + 5, min(8, max_warps))):
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        p = mma_plan.make_plan(n, m, variant, warps, dtype == torch.bfloat16, 0)
        p.launch(p.grid, p.threads, p.shared, torch.cuda.current_stream().cuda_stream,
                 *cuda_linear.kernel_args(pw, x, y), m, n, k)
        torch.cuda.synchronize()
        assert rel(y, reference(x, pw.weight)) <= TOL[dtype], (m, warps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,splits", [(1000, 64 * 13, 3), (1000, 192, 1), (300, 64 * 40, 10), (1000, 64 * 9, 2)])
def test_warpgroup_kernel_with_and_without_split_k(monkeypatch, n, k, splits, dtype):
    """w4a16_wgmma.cu (sm_90a): every token-column count NT (17-32 tokens through it here on small
    weights too), ragged N, K split over 3 or 10 blocks (through the workspace), 2 (a cluster,
    through shared memory; the odd ninth chunk's pair zero-padded) or not; split K adds its
    partial sums in split order, so two calls agree bit for bit."""
    if not cuda_linear._wg_ok(0):
        pytest.skip("the warpgroup-MMA kernel needs sm_90a")
    monkeypatch.setattr(cuda_linear, "WG_MIN_WEIGHTS", 0)
    g = gen(n + k)
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g) * 3))
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    ms = (17, 25, 33, 64, 65, 90, 97, 128)
    assert sorted({cuda_wgmma.wg_token_tile(m) for m in ms}) == list(cuda_wgmma.WG_TOKEN_TILES)
    for m in ms:
        p = cuda_wgmma.wg_plan(n, k, m, dtype == torch.bfloat16, 0)
        loop = "k2" if splits == 2 else ""
        assert p.name.startswith(f"w4a16_wg{loop}_nt{cuda_wgmma.wg_token_tile(m)}_") and p.grid[1] == splits, p
        assert cuda_linear.uses_warpgroup_kernel(m, n, k, 0)
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        assert rel(fp4cupy.linear(x, pw), reference(x, pw.weight)) <= TOL[dtype], (m, p)
        y = fp4cupy.linear(x, pw, bias)
        assert rel(y, reference(x, pw.weight, bias)) <= TOL[dtype], (m, p)
        assert torch.equal(fp4cupy.linear(x, pw, bias), y), (m, p)
    assert cuda_wgmma.wg_plan(n, k, 128, False, 0).split == (k > 192)
    check_graph_replays(x, pw, bias, g)


def check_graph_replays(x, pw, bias, g):
    """``linear`` captured in a CUDA graph and replayed on fresh x: xprep zeroes the flags or
    counters of stream-K and split K again on every replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fp4cupy.linear(x, pw, bias)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp4cupy.linear(x, pw, bias)
    for _ in range(2):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g).to(x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert rel(y, reference(x, pw.weight, bias)) <= TOL[x.dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clusters", [1, 2, 3, 5, 14])
def test_warpgroup_kernel_stream_k(monkeypatch, clusters, dtype):
    """w4a16_wgmma.cu's stream-K split of 2 tiles x 7 pairs over 1..14 clusters: whole tiles, tiles
    cut in 2-7 runs (owners adding up to 6 partial sums), a cluster over both tiles; no atomics,
    so two calls agree bit for bit."""
    if not cuda_linear._wg_ok(0):
        pytest.skip("the warpgroup-MMA kernel needs sm_90a")
    n, k = 1000, 64 * 13
    g = gen(clusters)
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g) * 3))
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    real = cuda_wgmma.wg_plan

    def forced(n, k, m, bf16, device):
        launch = cuda_wgmma.wg_kernel(cuda_wgmma.wg_token_tile(m), bf16, "sk", device)
        return cuda_wgmma.WgPlan(**{**{f: getattr(real(n, k, m, bf16, device), f) for f in cuda_wgmma.WgPlan.__slots__},
                                     "grid": (cuda_wgmma.WG_CLUSTER * clusters, 1), "cps": 0, "launch": launch,
                                     "name": launch.name})
    monkeypatch.setattr(cuda_wgmma, "wg_plan", forced)
    monkeypatch.setattr(cuda_linear, "WG_MIN_WEIGHTS", 0)
    for m in (20, 33, 72, 128):
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        y = fp4cupy.linear(x, pw, bias)
        assert rel(y, reference(x, pw.weight, bias)) <= TOL[dtype], (m, clusters)
        assert torch.equal(fp4cupy.linear(x, pw, bias), y)
    check_graph_replays(x, pw, bias, g)


def test_warpgroup_plan_fills_the_gpu_with_stream_k():
    if not cuda_linear._wg_ok(0):
        pytest.skip("the warpgroup-MMA kernel needs sm_90a")
    p = cuda_wgmma.wg_plan(28672, 8192, 128, False, 0)
    resident = p.launch.max_active_clusters(cuda_wgmma.WG_CLUSTER, p.threads, p.shared)
    assert resident > 0 and p.grid == (cuda_wgmma.WG_CLUSTER * resident, 1), (resident, p)
    assert p.name == "w4a16_wgsk_nt128_f16" and cuda_wgmma.wg_plan(4096, 4096, 128, False, 0).name == "w4a16_wg_nt128_f16"
    assert cuda_wgmma.wg_plan(14336, 4096, 128, False, 0).name == "w4a16_wgk2_nt128_f16"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_hot_rows_read_back_the_weight_exactly(dtype):
    """x = rows of the identity: y = deq(W) columns, each one product and one rounding — any decode,
    scale or layout slip (e.g. a flushed +-0.5 subnormal) shows as an exact mismatch."""
    g = gen(7)
    w = fp4cupy.quantize(torch.randn(96, 256, device="cuda", generator=g)
                         * torch.exp(2 * torch.randn(96, 1, device="cuda", generator=g)))
    eye = torch.eye(256, device="cuda", dtype=dtype)
    pw = fp4cupy.prepare(w)
    for rows in (slice(0, 1), slice(0, 16), slice(100, 164), slice(3, 131)):  # 64, 128 rows: wgmma on sm_90a
        y = fp4cupy.linear(eye[rows], pw)
        want = fp4cupy.dequantize(w).T[rows].to(dtype)
        torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_gpu_repack_equals_numpy_twin():
    g = gen(3)
    for n, k, gs in ((40, 192, 16), (33, 256, 32), (100, 128, 64)):
        x = torch.randn(n, k, device="cuda", generator=g) * torch.exp(2 * torch.randn(n, 1, device="cuda", generator=g))
        x[5] = 0
        w = fp4cupy.quantize(x, group_size=gs)
        pw = fp4cupy.prepare(w)
        data, scales = w.data.cpu().numpy(), w.scales.cpu().numpy()
        np.testing.assert_array_equal(pw.codes.cpu().numpy().view(np.uint32).reshape(-1),
                                      prepared.repack_codes(data, scales, n, k, gs).reshape(-1))
        np.testing.assert_array_equal(pw.scale_codes.cpu().numpy(), prepared.repack_scales(scales, n, k, gs))


def test_linear_host_plan_and_fallbacks():
    g = gen(5)
    w = fp4cupy.quantize(torch.randn(64, 128, device="cuda", generator=g), group_size=8)
    x = torch.randn(4, 128, device="cuda", generator=g, dtype=torch.float16)
    assert fp4cupy.prepare(w).path == "dequantize"
    assert rel(fp4cupy.linear(x, w), reference(x, w)) <= 1e-3
    xf, wq = x.float(), fp4cupy.quantize(torch.randn(64, 128, device="cuda", generator=g))
    assert rel(fp4cupy.linear(xf, wq), reference(xf, wq)) <= 1e-5  # float32 x: the dequantize path
    p = mma_plan.plan(28672, 8192, 1, False, 0)
    assert p.name.endswith("_f16") and p.grid[0] == 1 and p.shared == p.threads // 32 * 512 * int(p.name[8])


@pytest.mark.parametrize("bf16", [False, True])
def test_blocks_per_sm_follows_the_kernels_registers(bf16):
    """The driver's occupancy that plan() reads: the one-tile (4 warps) and two-tile (8 warps)
    M <= 8 kernels are limited by registers (allocated 8 a thread at a time), not shared memory."""
    from cupy.cuda import driver

    for variant, warps in (((1, 1, 2, 16), 4), ((2, 1, 2, 16), 8)):
        fn = mma_plan.make_plan(16, 1, variant, warps, bf16, 0).launch.fn
        used = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_NUM_REGS, fn.ptr)
        want = min(64 // warps, 32, 65536 // (32 * warps * (-(-used // 8) * 8)))
        assert mma_plan._blocks_per_sm(variant, warps, bf16, 0) == want, (variant, used)


@pytest.mark.parametrize("bf16", [False, True])
def test_resident_clusters_hold_no_more_blocks_than_the_sms(bf16):
    """The driver's resident clusters that the few-row plan reads (cuOccupancyMaxActiveClusters):
    some on sm_90+, whole clusters, never more blocks than blocks a SM x SMs."""
    if runtime.compute_capability(0) < (9, 0):
        pytest.skip("thread block clusters need sm_90")
    for variant in mma_plan.SPLIT_VARIANTS.values():
        for warps in (4, 8):
            whole = mma_plan._resident_blocks(variant, warps, 1, bf16, 0)
            for s in mma_plan.SPLITS:
                held = mma_plan._resident_blocks(variant, warps, s, bf16, 0)
                assert 0 < held <= whole and held % s == 0, (variant, warps, s, held, whole)


def test_linear_inside_cuda_graph():
    g = gen(11)
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(256, 512, device="cuda", generator=g)))
    x = torch.randn(1, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fp4cupy.linear(x, pw)  # warm up off the default stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp4cupy.linear(x, pw)
    x.copy_(torch.randn(1, 512, device="cuda", generator=g, dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert rel(y, reference(x, pw.weight)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_fp32_matches_float64(trans_b):
    g = gen(13)
    a = fp4cupy.quantize(torch.randn(256, 512, device="cuda", generator=g))
    b = fp4cupy.quantize(torch.randn(384, 512, device="cuda", generator=g) if trans_b
                         else torch.randn(512, 384, device="cuda", generator=g))
    c = fp4cupy.gemm(a, b, trans_b=trans_b)
    bd = fp4cupy.dequantize(b).double()
    want = fp4cupy.dequantize(a).double() @ (bd.T if trans_b else bd)
    assert c.dtype == torch.float32 and c.shape == (256, 384) and rel(c, want) <= 1e-5
    assert fp4cupy.gemm(a, b, trans_b=trans_b, out_dtype="bfloat16").dtype == torch.bfloat16


def test_gemm_with_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    rs = cupy.random.RandomState(1)
    a = fp4cupy.quantize(rs.standard_normal((64, 128), dtype=cupy.float32))
    b = fp4cupy.quantize(rs.standard_normal((128, 96), dtype=cupy.float32))
    c = fp4cupy.gemm(a, b)
    want = fp4cupy.dequantize(a).astype(cupy.float64) @ fp4cupy.dequantize(b).astype(cupy.float64)
    assert isinstance(c, cupy.ndarray) and float(cupy.linalg.norm(c - want) / cupy.linalg.norm(want)) <= 1e-5


def test_seed_gpu_script_flow():
    import fp4cupy as cuda_fp4_ext

    major, minor = cuda_fp4_ext.get_compute_capability()
    x = torch.randn(64, 64, device="cuda")
    data, scales, global_scale = cuda_fp4_ext.quantize(x, group_size=16)
    back = cuda_fp4_ext.dequantize(data, scales, global_scale, 64, 64, group_size=16)
    assert back.is_cuda and torch.abs(x - back).max() < 1.0 and f"{global_scale:.6f}"
    M, N, K = 128, 128, 64
    A, B = torch.randn(M, K, device="cuda"), torch.randn(K, N, device="cuda")
    Ad, As, Ag = cuda_fp4_ext.quantize(A, group_size=16)
    Bd, Bs, Bg = cuda_fp4_ext.quantize(B, group_size=16)
    C = cuda_fp4_ext.gemm(Ad, As, Ag, Bd, Bs, Bg, M, N, K, group_size=16)
    assert C.shape == (M, N) and rel(C, (A @ B).double()) < 0.2
