"""Worker for tests/test_gpu_sanitizer.py, run under ``compute-sanitizer --tool <memcheck|racecheck|...>``:
every mma.sync W4A16 variant once (ragged N, odd M, 1 warp and several), K split over clusters
(sm_90+), the capped 4-warp kernels through ``linear`` where the plan takes them, the warpgroup
kernel's split-K (two splits a cluster, or more through the workspace) and stream-K paths at
several token-column counts (sm_90a), the tiled kernel (w4a16_tiled.cu) with K split and not, the
grouped MoE kernels (each pass width, several passes, rows of no expert, both grids; on sm_90a
the warpgroup kernel and its tiles too) with their route and combine kernels, and
quantize / dequantize / prepare / the FP4 x FP4 gemm on
ragged shapes in each format.
The sanitizer's exit code says whether any access was out of bounds, raced or read uninitialized memory."""
import torch

import fp4cupy
from fp4cupy import cuda_grouped, cuda_linear, cuda_tiled, mma_plan
from fp4cupy.nn import NVFP4Linear


def weight(n: int, k: int):
    return fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda")))


def main() -> None:
    torch.manual_seed(0)
    stream = torch.cuda.current_stream().cuda_stream
    for variant in mma_plan.VARIANTS:
        rt, nt, u, max_warps = variant
        n, k = 16 * 4 * rt + 8, 64 * 13
        pw = weight(n, k)
        for dtype in (torch.float16, torch.bfloat16):
            for m, warps in ((8 * nt - 1, 1), (8 * nt + 5, min(8, max_warps))):
                x = torch.randn(m, k, device="cuda").to(dtype)
                y = torch.empty(m, n, device="cuda", dtype=dtype)
                p = mma_plan.make_plan(n, m, variant, warps, dtype == torch.bfloat16, 0)
                p.launch(p.grid, p.threads, p.shared, stream, *cuda_linear.kernel_args(pw, x, y), m, n, k)
    if torch.cuda.get_device_capability() >= (9, 0):  # K split over clusters: distributed shared memory
        n, k = 1000, 64 * 37
        pw = weight(n, k)
        for nt, variant in mma_plan.SPLIT_VARIANTS.items():
            for splits in mma_plan.SPLITS:
                m = 8 * nt - 1
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                y = torch.empty(m, n, device="cuda", dtype=torch.float16)
                p = mma_plan.make_plan(n, m, variant, 4, False, 0, splits)
                p.launch(p.grid, p.threads, p.shared, stream, *cuda_linear.kernel_args(pw, x, y), m, n, k)
    sms = cuda_linear._sm_count(0)
    for m, dtype, rows_a_block in ((1, torch.float16, 32), (11, torch.bfloat16, 32), (13, torch.float16, 16)):
        pw = weight((7 * sms - 1) * rows_a_block - 8, 256)  # the capped kernels fill ~99% of a wave
        fp4cupy.linear(torch.randn(m, 256, device="cuda").to(dtype), pw)
    for fmt, group in (("nvfp4", 8), ("nvfp4", 16), ("nvfp4", 64), ("mxfp4", 32)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(37, 3 * 64, device="cuda").to(dtype)
            x[1, 5] = float("nan")
            t = fp4cupy.quantize(x, fmt, group, nonfinite="mark")
            fp4cupy.dequantize(t, dtype=dtype)
            fp4cupy.quantize(x[2:], fmt, group, global_scale=0.01 if fmt == "nvfp4" else None, nonfinite="mark")
    a, b = fp4cupy.quantize(torch.randn(70, 192, device="cuda")), fp4cupy.quantize(torch.randn(192, 96, device="cuda"))
    fp4cupy.gemm(a, b)
    fp4cupy.gemm(a, fp4cupy.quantize(torch.randn(90, 192, device="cuda")), trans_b=True)
    if cuda_linear._wg_ok(0):
        cuda_linear.WG_MIN_WEIGHTS = 0  # small weights through the warpgroup kernel too
        for n, k, m in ((1000, 512, 33), (4096, 1024, 128), (28672, 256, 64), (1000, 640, 20), (28672, 256, 90),
                        (1000, 64 * 13, 40)):
            # two splits over a cluster at NT 48 and 24; split K through the workspace at NT 128 and 48;
            # stream-K at 64 and 96
            fp4cupy.linear(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), weight(n, k))
    for n, k, m in ((200, 64 * 37, 61), (1000, 64 * 9, 69)):  # the tiled kernel: ragged N and M, K split and not
        pw = weight(n, k)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = torch.empty(m, n, device="cuda", dtype=torch.float16)
        p = cuda_tiled.tiled_plan(n, k, m, False, 0)
        cuda_tiled.launch_tiled(p, m, n, k, stream, cuda_linear.kernel_args(pw, x, y), cuda_linear._torch_scratch(x))
    for dtype in (torch.float16, torch.bfloat16):
        layers = [NVFP4Linear.from_fp4(fp4cupy.quantize(torch.randn(200, 64 * 5, device="cuda")),
                                       torch.randn(200, device="cuda", dtype=dtype) if e else None) for e in range(3)]
        table, *_held = cuda_grouped.expert_table(layers, dtype)
        # passes of 8, 16, 32 and 64 tokens (the tiled kernel); expert 3 is another rank's; 2 rows for 3
        # experts: over rows. On sm_90a the last three take the warpgroup kernel (tiles of 32, 64 and 96
        # rows, expert 0's 150 in two) unless it is turned off (the second round).
        default = cuda_grouped.WG_MIN_PASS
        for wg_min_pass in (default, 10**9):
            cuda_grouped.WG_MIN_PASS = wg_min_pass
            for experts_of_rows, tokens in (([0] * 9 + [2] * 2 + [3], 1), ([1, 3], 2), ([0] * 20 + [1] * 30, 9),
                                            ([0] + [2] * 70, 17), ([1] * 65 + [3] * 3, 40),
                                            ([0] * 150 + [2] * 80, 150)):  # 3 blocks share an expert's rows
                expert_of_row = torch.tensor(experts_of_rows, device="cuda")
                offsets = torch.searchsorted(expert_of_row, torch.arange(4, device="cuda"), out_int32=True)
                x = torch.randn(len(experts_of_rows), 64 * 5, device="cuda").to(dtype)
                cuda_grouped.grouped_linear(x, table, expert_of_row, offsets, 200, tokens)
        cuda_grouped.WG_MIN_PASS = default
    index = torch.randint(0, 40, (300, 8), device="cuda")
    index[::7, 3] = 40  # another rank's
    _, _, _, row_of_slot = cuda_grouped.route(index, 40)
    h = torch.randn(300 * 8, 96, device="cuda", dtype=torch.bfloat16)
    cuda_grouped.combine(h, row_of_slot, index, torch.rand(300, 8, device="cuda"), 40)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
