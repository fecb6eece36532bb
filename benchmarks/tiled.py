"""The tiled mma.sync W4A16 kernel (w4a16_tiled.cu, 33-128 tokens on Turing (fp16), Ampere, Ada and
Blackwell) against cuBLAS fp16/bf16 and the kernels it stands beside, in one run on this card.

    PYTHONPATH=$PWD python3 benchmarks/tiled.py [--bf16] [--ms 33,64,96,128] [--shapes 4096x4096,...]

Each candidate is a CUDA graph of 30 calls over three rotating weights, replayed alternately with
cuBLAS F.linear (timing.graph_compare); the table gives cuBLAS's time and each candidate's speed-up
over it (median of the pairs):
- package: what fp4cupy.linear runs on this card (on sm_90a the warpgroup kernel from 33 tokens
  but on small weights);
- tiled: w4a16_tiled.cu with the K splits of ``cuda_tiled.tiled_plan``;
- mma.sync: ``mma_plan.plan``'s kernel (w4a16.cu), what sm_80-89 ran before the tiled kernel;
- deq+cuBLAS: the weight dequantized to x's dtype, then F.linear, what sm_75 ran before.
On a GPU without the warpgroup kernel "package" is the tiled or the mma.sync kernel
(``cuda_linear.uses_tiled_kernel``). Under ``FP4CUPY_EMULATE_CC`` the kernels are the emulated
target's build (the header names it), JIT-compiled for this card.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from fp4cupy import cuda_linear, cuda_tiled, mma_plan, runtime  # noqa: E402
from timing import card, graph_compare  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672))
MS = (33, 64, 96, 128)


def candidates(x, prep, n, k):
    """name -> call i, for the kernels this script compares."""
    m, bf16 = x.shape[0], x.dtype == torch.bfloat16
    y = torch.empty(m, n, device="cuda", dtype=x.dtype)
    scratch = cuda_linear._torch_scratch(x)
    p = cuda_tiled.tiled_plan(n, k, m, bf16, 0)

    def tiled(i):
        args = cuda_linear.kernel_args(prep[i % 3], x, y)
        cuda_tiled.launch_tiled(p, m, n, k, torch.cuda.current_stream().cuda_stream, args, scratch)

    def mma_sync(i):
        q = mma_plan.plan(n, k, m, bf16, 0)
        args = cuda_linear.kernel_args(prep[i % 3], x, y)
        q.launch(q.grid, q.threads, q.shared, torch.cuda.current_stream().cuda_stream, *args, m, n, k)

    def dequantized(i):
        return F.linear(x, fp4cupy.dequantize(prep[i % 3].weight, dtype=x.dtype))

    return {"package": lambda i: fp4cupy.linear(x, prep[i % 3]), "tiled": tiled, "mma.sync": mma_sync,
            "deq+cuBLAS": dequantized}


def rows(dtype, shapes, ms):
    for n, k in shapes:
        dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(3)]
        prep = [fp4cupy.prepare(fp4cupy.quantize(w)) for w in dense]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ fp4cupy.dequantize(prep[0].weight).double().T
            row = dict(n=n, k=k, m=m, kernel=package_kernel(n, k, m, dtype == torch.bfloat16),
                       plan=cuda_tiled.tiled_plan(n, k, m, dtype == torch.bfloat16, 0))
            for name, fn in candidates(x, prep, n, k).items():
                r = graph_compare(lambda i: F.linear(x, dense[i % 3]), fn)
                row["cublas"], row[name] = r["peer_ms"], r["ratio"]
            row["err"] = tiled_error(x, prep[0], n, k, ref)
            yield row
        del dense, prep
        torch.cuda.empty_cache()


def tiled_error(x, pw, n, k, ref):
    """Relative Frobenius error of the tiled kernel's y against float64 (a sanity check of the run)."""
    m = x.shape[0]
    y = torch.empty(m, n, device="cuda", dtype=x.dtype)
    p = cuda_tiled.tiled_plan(n, k, m, x.dtype == torch.bfloat16, 0)
    cuda_tiled.launch_tiled(p, m, n, k, torch.cuda.current_stream().cuda_stream, cuda_linear.kernel_args(pw, x, y),
                            cuda_linear._torch_scratch(x))
    return float(torch.linalg.norm(y.double() - ref) / torch.linalg.norm(ref))


def package_kernel(n, k, m, bf16):
    if cuda_linear.uses_warpgroup_kernel(m, n, k, 0):
        return "warpgroup"
    return "tiled" if cuda_linear.uses_tiled_kernel(m, n, k) else "mma.sync"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.bf16 else torch.float16
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ms = [int(v) for v in a.ms.split(",")]
    torch.manual_seed(0)
    name = "bf16" if a.bf16 else "fp16"
    print(f"\n## benchmarks/tiled.py on {card()} (torch {torch.__version__}), kernels built for "
          f"{runtime.module_target(0)}, x {name}, speed-up over cuBLAS {name}\n")
    print("| N x K | M | cuBLAS ms | package | tiled | mma.sync | deq+cuBLAS | tiled / mma.sync | tiled launch | "
          "tiled error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gains = []
    for r in rows(dtype, shapes, ms):
        gains.append(r["tiled"] / r["mma.sync"])
        p = r["plan"]
        print(f"| {r['n']}x{r['k']} | {r['m']} | {r['cublas']:.4f} | {r['package']:.2f}x ({r['kernel']}) | "
              f"{r['tiled']:.2f}x | {r['mma.sync']:.2f}x | {r['deq+cuBLAS']:.2f}x | {gains[-1]:.2f} | "
              f"grid {p.grid[1]}x{p.grid[0]} S={p.splits} | {r['err']:.1e} |", flush=True)
    print(f"\ngeomean tiled / mma.sync: {math.exp(sum(map(math.log, gains)) / len(gains)):.2f}x over {len(gains)} rows")


if __name__ == "__main__":
    main()
