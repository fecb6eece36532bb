"""Which kernels ``cuda_linear.launch_w4a16`` queues, by token count, weight size and GPU, and the
scratch and pointers it hands them (no GPU needed)."""
import pytest
from launch_fakes import Recorder, fake_gpu

from fp4cupy import cuda_linear, cuda_tiled, cuda_wgmma, mma_plan


@pytest.mark.parametrize("m,wg_ok,want", [(1, True, ["mma"]), (17, True, ["mma"]), (32, True, ["mma"]),
                                          (32, False, ["mma"]), (33, False, ["tiled", "finish+after"]),
                                          (128, False, ["tiled", "finish+after"]), (33, True, ["xprep", "wg+after"]),
                                          (65, True, ["xprep", "wg+after"]), (128, True, ["xprep", "wg+after"])])
def test_launch_w4a16_picks_the_kernel_and_sizes_the_scratch(monkeypatch, m, wg_ok, want):
    calls, buffers = [], []
    n, k, sms = 4096, 4096, 132  # split K on an H100 (16 blocks x 8 splits)
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: wg_ok)
    monkeypatch.setattr(cuda_linear, "plan", lambda n, k, m, bf16, device: mma_plan.Plan(
        Recorder("mma", calls), grid=(7, 1), threads=256, shared=1024, name="mma"))
    blocks, splits, cps = cuda_wgmma.wg_grid(n, k, sms)
    nt = cuda_wgmma.wg_token_tile(m)
    monkeypatch.setattr(cuda_wgmma, "wg_plan", lambda n, k, m, bf16, device: cuda_wgmma.WgPlan(
        xprep=Recorder("xprep", calls), launch=Recorder("wg", calls),
        grid=(blocks, splits), threads=512, shared=99, cps=cps, nt=nt, name="wg"))

    monkeypatch.setattr(cuda_tiled, "tiled_plan", lambda n, k, m, bf16, device: cuda_tiled.TiledPlan(
        launch=Recorder("tiled", calls), finish=Recorder("finish", calls), grid=(8 * 4, 32), splits=4, cps=16,
        name="tiled"))

    def scratch(nbytes):
        buffers.append(nbytes)
        return object(), 1000 * len(buffers)

    args = (11, 12, 13, 14, 0, 16)  # codes, scale codes, x, y, no bias, g
    cuda_linear.launch_w4a16(m, n, k, False, 0, 77, args, scratch)
    assert [c[0] for c in calls] == want and all(c[4] == 77 for c in calls)
    if want == ["mma"]:
        assert calls[0][5] == args + (m, n, k) and not buffers
        return
    if want[0] == "tiled":  # the 4 splits' FP32 sums, added up by the finish kernel
        assert buffers == [4 * 4 * m * n] and calls[0][1:4] == ((32, 32), 256, cuda_tiled.TILED_SHARED)
        assert calls[0][5] == (11, 12, 13, 14, 1000, 0, 16, m, n, k, 16)
        assert calls[1][5] == (1000, 14, 0, 16, m, n, 4)
        return
    counters = 16  # a block column each, rounded up to 4
    assert blocks == 16 and splits == 8
    # reordered x with a zero chunk; the counters, then a slot of NT / 2 floats a thread for each block
    assert buffers == [(k + 64) * nt * 2, 4 * (counters + blocks * splits * 512 * nt // 2)]
    assert calls[0][5] == (13, 1000, 2000, counters, m, k, nt)  # xprep zeroes the counters only
    assert calls[0][1] * calls[0][2] >= (k // 64 + 1) * 8 * nt  # a thread a 16-byte unit of reordered x
    assert calls[1][1:4] == ((blocks, splits), 512, 99)
    assert calls[1][5] == (11, 12, 1000, 14, 2000, 0, 16, m, n, k, cps)


def test_warpgroup_kernel_from_17_tokens_on_large_weights_and_from_33_on_all_but_small(monkeypatch):
    uses = cuda_linear.uses_warpgroup_kernel
    fake_gpu(monkeypatch, 132)  # the mma.sync plan takes one-tile blocks at 17-32 tokens below 4224 rows
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: True)
    assert not uses(16, 28672, 8192, 0) and uses(17, 28672, 8192, 0) and uses(32, 4096, 14336, 0)
    assert uses(17, 5120, 4096, 0) and uses(24, 4224, 4096, 0) and uses(17, 3072, 8192, 0)
    assert uses(17, 2048, 16384, 0) and uses(32, 1024, 32768, 0)  # one-tile grids under 1.5 blocks a SM
    assert not uses(17, 8192, 2048, 0) and not uses(17, 4096, 4096, 0)  # 16 Mi values: not above
    assert not uses(32, 4160, 4096, 0) and not uses(24, 4096, 8192, 0) and not uses(17, 4160, 8064, 0)
    assert uses(17, 3168, 8192, 0) == (3168 * 8192 > 2 ** 25) and not uses(17, 3168, 8000, 0)
    assert uses(33, 4096, 4096, 0) and uses(33, 3072, 4096, 0) and uses(128, 2048, 4097, 0)
    assert not uses(33, 2048, 4096, 0) and not uses(128, 1024, 8192, 0) and not uses(64, 64, 64, 0)  # 8 Mi values
    assert [mma_plan.plan(n, 4096, 24, False, 0).name[:9] for n in (4160, 4224)] == ["w4a16_rt1", "w4a16_rt2"]
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: False)  # off sm_90a: never
    assert not any(uses(m, 28672, 8192, 0) for m in (17, 33, 128))
    mma_plan.plan.cache_clear()


@pytest.mark.parametrize("wg_ok", [False, True])
def test_tiled_kernel_from_33_tokens_or_65_on_small_weights(monkeypatch, wg_ok):
    """Where the warpgroup kernel is not taken: mma.sync below 33 tokens, and below 65 on weights of
    at most 4 Mi values; the tiled kernel above."""
    calls = []
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: wg_ok)
    monkeypatch.setattr(cuda_linear, "plan", lambda n, k, m, bf16, device: mma_plan.Plan(
        Recorder("mma", calls), grid=(7, 1), threads=256, shared=1024, name="mma"))
    monkeypatch.setattr(cuda_tiled, "tiled_plan", lambda n, k, m, bf16, device: cuda_tiled.TiledPlan(
        launch=Recorder("tiled", calls), finish=None, grid=(1, 8), splits=1, cps=k // 64, name="tiled"))
    for m, n, k, want in [(32, 1024, 8192, "mma"), (33, 1024, 8192, "tiled"), (33, 1025, 4096, "tiled"),
                          (33, 2048, 2048, "mma"), (64, 1024, 4096, "mma"), (65, 2048, 2048, "tiled"),
                          (128, 64, 64, "tiled")]:
        assert cuda_linear.uses_tiled_kernel(m, n, k) == (want == "tiled"), (m, n, k)
        calls.clear()
        cuda_linear.launch_w4a16(m, n, k, False, 0, 77, (11, 12, 13, 14, 0, 16), lambda nbytes: (None, 0))
        assert [c[0] for c in calls] == [want], (m, n, k)


def test_129_to_256_tokens_in_slices_on_large_weights_on_sm90a(monkeypatch):
    """Past 128 tokens on sm_90a: equal slices of at most 128 tokens (x and y offset by 2 bytes a
    value), each through the warpgroup kernel, on weights of more than 32 Mi values only."""
    calls = []
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: True)
    monkeypatch.setattr(cuda_wgmma, "wg_plan", lambda n, k, m, bf16, device: (m, n, k))
    monkeypatch.setattr(cuda_wgmma, "launch_wg", lambda p, m, n, k, stream, args, scratch: calls.append((p, m, args)))
    monkeypatch.setattr(cuda_linear, "_mma_ok", lambda device, bf16=False: True)
    take = cuda_linear.kernels_take
    assert take(256, 8192, 4097, 0) and take(129, 28672, 8192, 0) and take(128, 64, 64, 0)
    assert not take(257, 28672, 8192, 0) and not take(200, 8192, 4096, 0)  # 32 Mi: not above
    assert not take(0, 64, 64, 0) and not take(0, 28672, 8192, 0)
    n, k = 14336, 4096
    cuda_linear.launch_w4a16(201, n, k, True, 0, 77, (11, 12, 1000, 2000, 0, 16), lambda nbytes: (None, 0))
    assert [(c[0], c[1]) for c in calls] == [((101, n, k), 101), ((100, n, k), 100)]
    assert calls[0][2] == (11, 12, 1000, 2000, 0, 16) and calls[1][2] == (11, 12, 1000 + 2 * 101 * k, 2000 + 2 * 101 * n, 0, 16)
    calls.clear()
    cuda_linear.launch_w4a16(256, n, k, False, 0, 77, (11, 12, 1000, 2000, 0, 16), lambda nbytes: (None, 0))
    assert [c[1] for c in calls] == [128, 128]
    assert cuda_linear.token_slices(129) == [(0, 65), (65, 64)] and cuda_linear.token_slices(384) == [
        (0, 128), (128, 128), (256, 128)]
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: False)  # off sm_90a: dequantize + cuBLAS
    assert not take(129, 28672, 8192, 0) and take(128, 28672, 8192, 0)


@pytest.mark.parametrize("cc", [(7, 5), (8, 0), (8, 9), (9, 0)])
def test_turing_runs_fp16_through_the_kernels_of_sm_80(monkeypatch, cc):
    """sm_75: fp16 x takes the kernels sm_80 takes (plan()'s and the tiled one, each MMA as two
    m16n8k8), up to MMA_MAX_M tokens; bf16 x the other paths; sm_70 none."""
    monkeypatch.setattr(cuda_linear.runtime, "compute_capability", lambda device=None: cc)
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: False)
    cuda_linear._mma_ok.cache_clear()
    try:
        turing = cc < (8, 0)
        assert cuda_linear._mma_ok(0) and cuda_linear._mma_ok(0, True) != turing
        assert cuda_linear.kernels_take(32, 4096, 4096, 0) and cuda_linear.kernels_take(1, 64, 64, 0)
        assert cuda_linear.kernels_take(33, 4096, 4096, 0) and cuda_linear.kernels_take(128, 28672, 8192, 0)
        assert not cuda_linear.kernels_take(129, 28672, 8192, 0)
        monkeypatch.setattr(cuda_linear.runtime, "compute_capability", lambda device=None: (7, 0))
        cuda_linear._mma_ok.cache_clear()
        assert not cuda_linear._mma_ok(0) and not cuda_linear._mma_ok(0, True)
    finally:
        cuda_linear._mma_ok.cache_clear()
