"""W4A16 linear and FP4 x FP4 gemm against cuBLAS fp16, measured alternately in this run on this card.

    PYTHONPATH=$PWD python3 benchmarks/gemm.py [--quick]

Rows: y = x @ W^T with x fp16 [M, K] and W NVFP4 [N, K] (prepared once) vs torch F.linear with an
fp16 W, each captured in a CUDA graph of 30 calls (as decoding runs in vLLM) and replayed
alternately, so the times are device time; the host cost of one call is measured separately.
Three weight sets rotate so L2 does not hold the weights between calls. The rows run M by M, the
decode sizes first (see linear_rows). At M=1 a plain read of the prepared weight's bytes
(read_bytes.cu: codes and scale codes, no math) gives the byte limit measured in this run: cuBLAS's
M=1 time over the read's, the speed-up a kernel that only streams its weights would reach.
Alternating, both run at the clock their mix of power allows; on a card whose power cap fp4cupy's
kernels reach alone (H200: the large shapes at M >= 16), clock_power.py times each alone.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from fp4cupy import cuda_linear, cuda_tiled, cuda_wgmma, mma_plan, runtime  # noqa: E402
from timing import Rotating, card, compare, graph_compare, host_us  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672))
MS = (1, 16, 128, 2048)


def linear_rows(dtype=torch.float16, shapes=SHAPES, ms=MS):
    """One row a (shape, M), measured M by M in increasing order: the decode rows run before the
    prefill rows. (Right after the M=2048 rows the SM clock is down to 1.2-1.6 GHz from 1.98 at
    ~670 W on an H200 and takes a while to recover; the memory-bound peer does not notice, the
    issue-bound W4A16 kernel does.) Every shape's weights are made first."""
    weights = {}
    for n, k in shapes:
        dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(3)]
        weights[n, k] = dense, [fp4cupy.prepare(fp4cupy.quantize(w)) for w in dense]
    rows = []
    for m in ms:
        for (n, k), (dense, prep) in weights.items():
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            r = graph_compare(lambda i: F.linear(x, dense[i % 3]), lambda i: fp4cupy.linear(x, prep[i % 3]))
            path = kernel_used(n, k, m, dtype == torch.bfloat16)
            alt = "-"
            if m == 128:  # the other paths, to place the M thresholds
                alt = ", ".join(f"{name} {other_path_ratio(x, dense, prep, **overrides):.2f}x" for name, overrides in
                                OTHER_PATHS)
            elif m > cuda_linear.MMA_MAX_M and cuda_linear.kernels_take(m, n, k, 0):  # slices: against what they replace
                name, overrides = OTHER_PATHS[-1]
                alt = f"{name} {other_path_ratio(x, dense, prep, **overrides):.2f}x"
            wbytes = n * k // 2 + n * k // 16
            rows.append(dict(n=n, k=k, m=m, ours=r["ours_ms"], peer=r["peer_ms"], ratio=r["ratio"], lo=r["lo"],
                             hi=r["hi"], gbs=wbytes / r["ours_ms"] / 1e6, mb=wbytes / 1e6, path=path, alt=alt))
            if m == 1:
                read = read_bytes_fn(prep)
                rows[-1]["read"] = graph_compare(lambda i: F.linear(x, dense[i % 3]), read)
    del weights
    torch.cuda.empty_cache()
    order = {shape: i for i, shape in enumerate(shapes)}
    return sorted(rows, key=lambda r: (order[r["n"], r["k"]], r["m"]))


def read_bytes_fn(prep):
    """Call ``i``: read the codes and scale codes of ``prep[i % 3]`` once (read_bytes.cu)."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "read_bytes.cu")
    launch = runtime.launcher(src, "read_bytes", 0, "PqPqP")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    blocks = 4 * torch.cuda.get_device_properties(0).multi_processor_count

    def fn(i):
        pw = prep[i % 3]
        launch(blocks, 256, 0, torch.cuda.current_stream().cuda_stream, pw.codes.data_ptr(), pw.codes.numel() // 16,
               pw.scale_codes.data_ptr(), pw.scale_codes.numel() // 16, sink.data_ptr())
    return fn


# the paths linear takes without the warpgroup kernel (sm_80-89, sm_100+): the tiled kernel, the
# mma.sync kernels below it, and past MMA_MAX_M tokens dequantize + cuBLAS
OTHER_PATHS = (("tiled", dict(WG_MIN_M=10**9)), ("mma.sync", dict(WG_MIN_M=10**9, TILED_MIN_M=10**9)),
               ("dequantize+cuBLAS", dict(MMA_MAX_M=0, SLICED_MAX_M=0)))


def other_path_ratio(x, dense, prep, **overrides):
    """cuBLAS's time over linear's with ``cuda_linear``'s thresholds set to ``overrides``."""
    saved = {name: getattr(cuda_linear, name) for name in overrides}
    for name, value in overrides.items():
        setattr(cuda_linear, name, value)
    try:
        return graph_compare(lambda i: F.linear(x, dense[i % 3]), lambda i: fp4cupy.linear(x, prep[i % 3]))["ratio"]
    finally:
        for name, value in saved.items():
            setattr(cuda_linear, name, value)


def kernel_used(n, k, m, bf16):
    if not cuda_linear.kernels_take(m, n, k, 0):
        return "dequantize+cuBLAS"
    if m > cuda_linear.MMA_MAX_M:
        slices = cuda_linear.token_slices(m)
        return f"{len(slices)} slices of {kernel_used(n, k, slices[0][1], bf16)}"
    if cuda_linear.uses_warpgroup_kernel(m, n, k, 0):
        p = cuda_wgmma.wg_plan(n, k, m, bf16, 0)
        return f"{p.name} grid {p.grid[0]}x{p.grid[1]}"
    if cuda_linear.uses_tiled_kernel(m, n, k):
        p = cuda_tiled.tiled_plan(n, k, m, bf16, 0)
        return f"{p.name} grid {p.grid[0]}x{p.grid[1]}"
    return mma_plan.plan(n, k, m, bf16, 0).name


def gemm_row(size=8192):
    a16 = Rotating(torch.randn(size, size, device="cuda", dtype=torch.float16) for _ in range(2))
    b16 = Rotating(torch.randn(size, size, device="cuda", dtype=torch.float16) for _ in range(2))
    a4 = Rotating(fp4cupy.quantize(a) for a in a16.items)
    b4 = Rotating(fp4cupy.quantize(b) for b in b16.items)
    return compare(lambda: a16.next() @ b16.next(), lambda: fp4cupy.gemm(a4.next(), b4.next()), pairs=7, inner=3)


def host_overhead_us(calls=3000):
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(256, 256, device="cuda")))
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    w16 = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    layer = fp4cupy.NVFP4Linear.from_float(torch.nn.Linear(256, 256, bias=False, device="cuda"))
    with torch.no_grad():
        layer_us = host_us(lambda: layer(x), calls)
    return {"fp4cupy.linear (prepared W, M=1, 256x256)": host_us(lambda: fp4cupy.linear(x, pw), calls),
            "torch F.linear fp16 (same shape)": host_us(lambda: F.linear(x, w16), calls),
            "NVFP4Linear layer, no grad (same shape)": layer_us,
            "NVFP4Linear layer through the fp4cupy::linear op": host_us(
                lambda: torch.ops.fp4cupy.linear(x, None, None, layer.weight_global_scale, layer.codes,
                                                 layer.scale_codes, None, "nvfp4", 16, 256), calls)}


def main(quick=False):
    torch.manual_seed(0)
    t0 = time.time()
    shapes = SHAPES[3:4] if quick else SHAPES
    rows = linear_rows(shapes=shapes)
    g = gemm_row()
    host = host_overhead_us()
    print(f"\n## benchmarks/gemm.py on {card()} (torch {torch.__version__}, fp4cupy {fp4cupy.version()})\n")
    print("W4A16 linear, x fp16, W NVFP4 (group 16) vs cuBLAS fp16 F.linear, CUDA-graph replays; "
          "speed-up = median of alternating pairs (clock_power.py times each alone at its settled clock).\n")
    print("| N x K | M | fp4cupy ms | cuBLAS ms | speed-up (min-max) | weight GB/s | kernel | other paths at M=128 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']}x{r['k']} | {r['m']} | {r['ours']:.4f} | {r['peer']:.4f} | {r['ratio']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f}) "
              f"| {r['gbs']:.0f} | {r['path']} | {r['alt']} |")
    print("\nM=1 against the byte limit: a plain read of the prepared weight (codes + scale codes, "
          "read_bytes.cu), timed against cuBLAS M=1 like the rows above.\n")
    print("| N x K | weight MB | read ms | read TB/s | byte limit (cuBLAS / read) | fp4cupy M=1 "
          "| share of the limit |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "read" in r:
            rd = r["read"]
            tbs = r["mb"] / rd["ours_ms"] / 1e3
            print(f"| {r['n']}x{r['k']} | {r['mb']:.1f} | {rd['ours_ms']:.4f} | {tbs:.2f} | {rd['ratio']:.2f}x "
                  f"| {r['ratio']:.2f}x | {r['ratio'] / rd['ratio']:.0%} |")
    for ms in ((1,), (16,), (1, 16), (128,), (2048,)):
        sel = [r["ratio"] for r in rows if r["m"] in ms]
        print(f"\ngeomean speed-up, M in {ms}: {math.exp(sum(map(math.log, sel)) / len(sel)):.2f}x over {len(sel)} rows", end="")
    print(f"\n\nFP4 x FP4 gemm 8192^3 (fp16 tensor cores, fp32 out) vs cuBLAS fp16 matmul: "
          f"{g['ours_ms']:.3f} ms vs {g['peer_ms']:.3f} ms, speed-up {g['ratio']:.2f}x ({g['lo']:.2f}-{g['hi']:.2f})")
    print("\n| host time per call | µs |\n|---|---|")
    for name, us in host.items():
        print(f"| {name} | {us:.1f} |")
    print(f"\n(benchmark ran {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
