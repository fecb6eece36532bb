"""Every w4a16 kernel variant (row tiles per block, warps per block) on the decode shapes, timed as
CUDA-graph replays (no host time) against cuBLAS fp16 F.linear captured the same way. The
evidence behind ``mma_plan.plan``.

    PYTHONPATH=$PWD python3 benchmarks/w4a16_variants.py [--bf16] [--shapes 6144x4096,12288x4096]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from fp4cupy import cuda_linear, mma_plan  # noqa: E402
from timing import capture, card, time_ms  # noqa: E402

SHAPES = ((28672, 8192), (8192, 28672), (14336, 4096), (4096, 14336), (4096, 4096))
CALLS = 30  # launches per graph, rotating over 3 weights


def graph_ms(fn, reps=7) -> float:
    """Median time of one call, from replays of a graph of CALLS calls."""
    graph = capture(fn, CALLS)
    return statistics.median(time_ms(graph.replay, reps)) / CALLS


def plan_fn(pws, x, y, p):
    n, k = pws[0].shape
    m = x.shape[0]

    def fn(i):
        pw = pws[i % len(pws)]
        p.launch(p.grid, p.threads, p.shared, torch.cuda.current_stream().cuda_stream,
                 *cuda_linear.kernel_args(pw, x, y), m, n, k)
    return fn


def main(dtype=torch.float16, shapes=SHAPES):
    print(f"\n## benchmarks/w4a16_variants.py on {card()}: kernel only (CUDA-graph replays), x {str(dtype)[6:]}\n")
    print("| N x K | M | cuBLAS us | best variant | us | speed-up | weight TB/s | plan() picks | its speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in shapes:
        dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(3)]
        pws = [fp4cupy.prepare(fp4cupy.quantize(w)) for w in dense]
        wbytes = n * k * 9 / 16
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            y = torch.empty(m, n, device="cuda", dtype=dtype)
            peer = graph_ms(lambda i: F.linear(x, dense[i % 3]))
            nt = mma_plan.token_tiles(m)
            results = {}
            bf16 = dtype == torch.bfloat16
            for v in (v for v in mma_plan.VARIANTS if v[1] == nt):
                for warps in (4, 8, 16):
                    if warps <= v[3] and warps * v[0] * nt * 512 <= mma_plan.SHARED_LIMIT:
                        p = mma_plan.make_plan(n, m, v, warps, bf16, 0)
                        results[(p.name[6:-4].rstrip("_"), warps)] = graph_ms(plan_fn(pws, x, y, p))
            (best_name, warps), best = min(results.items(), key=lambda kv: kv[1])
            p = mma_plan.plan(n, k, m, bf16, 0)
            picked = graph_ms(plan_fn(pws, x, y, p))
            print(f"| {n}x{k} | {m} | {peer * 1e3:.1f} | {best_name} {warps} warps | {best * 1e3:.1f} | "
                  f"{peer / best:.2f}x | {wbytes / best / 1e9:.2f} | {p.name[6:]} {p.threads // 32} warps | {peer / picked:.2f}x |")
            others = ", ".join(f"{name}/{w}w {t * 1e3:.1f}" for (name, w), t in sorted(results.items()))
            print(f"|  |  |  | all (us): {others} |  |  |  |  |  |")
        del dense, pws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    given = sys.argv[sys.argv.index("--shapes") + 1] if "--shapes" in sys.argv else None
    shapes = tuple(tuple(map(int, s.split("x"))) for s in given.split(",")) if given else SHAPES
    main(torch.float16, shapes)
    if "--bf16" in sys.argv:
        main(torch.bfloat16, shapes)
