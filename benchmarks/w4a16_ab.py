"""A/B of edited copies of kernels_cu/w4a16.cu (or w4a16_wgmma.cu) against the package's kernels, in one run.

    PYTHONPATH=$PWD python3 benchmarks/w4a16_ab.py /abs/path/variant.cu [more.cu] \\
        [--shapes 28672x8192,8192x28672] [--m 1,16] [--bf16] [--kernel rt,nt,u[,max warps]:warps] [--chain]

Each copy (any .cu that defines the same extern "C" kernels; it may #include the package's headers)
runs the kernel ``plan`` picks for each (shape, M), or the one ``--kernel`` names, on the same grid,
block and shared memory as the package's. Where the call takes the warpgroup kernel (sm_90a; see
``cuda_linear.uses_warpgroup_kernel``), the copies are of w4a16_wgmma.cu and run ``wg_plan``'s
launches (xprep, then the main kernel); its kernels' body is in w4a16_wgmma.cuh, so a copy that
edits the body pastes the header's text in place of its #include. Every candidate and cuBLAS fp16
F.linear are captured in CUDA graphs of 20 calls over three rotating weights and replayed
interleaved, 7 rounds; the table gives the median us a call and the ratio against cuBLAS. A
candidate whose output misses the float64 reference by more than 2e-3 (relative Frobenius) is
flagged: an ablation may do that on purpose.
--chain puts a torch copy of x before every call, cuBLAS's included, as a norm comes before a
projection in a model (the graphs then time the pair).
Check the variant's registers first (benchmarks/sass_counts.py): at M=16 the kernel sits at exactly
64, and a variant above that runs three blocks a SM instead of four (NOTES.md, session 8).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from fp4cupy import cuda_linear, cuda_wgmma, mma_plan, runtime  # noqa: E402
from timing import capture, card, time_ms  # noqa: E402
from w4a16_variants import plan_fn  # noqa: E402

CALLS, ROUNDS = 20, 7


def kernel_plan(source: str | None, n: int, k: int, m: int, bf16: bool, kernel: str | None) -> mma_plan.Plan:
    """The package's plan for (n, k, m), or ``kernel`` ("rt,nt,u[,max warps]:warps"), launched from ``source``."""
    if kernel:
        variant, warps = kernel.split(":")
        v = tuple(int(a) for a in variant.split(","))
        p = mma_plan.make_plan(n, m, v + (16,) * (4 - len(v)), int(warps), bf16, 0)
    else:
        p = mma_plan.plan(n, k, m, bf16, 0)
    launch = p.launch if source is None else runtime.launcher(source, p.name, 0, mma_plan._SIGNATURE)
    return mma_plan.Plan(launch, p.grid, p.threads, p.shared, p.name)


def wg_fn(source: str | None, prepared, x, y):
    """(call of ``i``, plan): the package's ``wg_plan`` for the shape and M, its kernels launched from
    ``source`` (a copy of w4a16_wgmma.cu) when given; its scratch allocated once, as graphs replay it."""
    (n, k), m, bf16 = prepared[0].shape, x.shape[0], x.dtype == torch.bfloat16
    p = cuda_wgmma.wg_plan(n, k, m, bf16, 0)
    if source is not None:
        def load(launcher, signature):
            return runtime.launcher(source, launcher.name, 0, signature)
        p = cuda_wgmma.WgPlan(xprep=load(p.xprep, cuda_wgmma._XPREP_SIGNATURE),
                               launch=load(p.launch, cuda_wgmma._WG_SIGNATURE).allow_shared(p.shared),
                               grid=p.grid, threads=p.threads, shared=p.shared, cps=p.cps, nt=p.nt, name=p.name)
    held = []  # (buffer, pointer) in the order launch_wg asks for them

    def fn(i):
        pw = prepared[i % 3]
        args = cuda_linear.kernel_args(pw, x, y)
        reuse = iter(list(held))

        def scratch(nbytes):
            got = next(reuse, None)
            if got is None:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
                got = buf, buf.data_ptr()
                held.append(got)
            return got
        cuda_wgmma.launch_wg(p, m, n, k, torch.cuda.current_stream().cuda_stream, args, scratch)
    return fn, p


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="edited copies of w4a16.cu, or of w4a16_wgmma.cu where it runs")
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336,28672x8192,8192x28672")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--kernel", help="rt,nt,u[,max warps]:warps instead of plan's choice")
    ap.add_argument("--chain", action="store_true", help="a torch copy of x before every call")
    args = ap.parse_args()
    if args.kernel and not re.fullmatch(r"\d+,\d+,\d+(,\d+)?:\d+", args.kernel):
        ap.error(f"--kernel {args.kernel!r}: give rt,nt,u[,max warps]:warps, e.g. 1,1,2,4:4 (see mma_plan.VARIANTS)")
    dtype = torch.bfloat16 if args.bf16 else torch.float16
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    sources = [os.path.abspath(s) for s in args.sources]
    labels = ["package"] + [os.path.basename(s) for s in sources]
    print(f"{card()}: us a call (CUDA graphs of {CALLS}, {ROUNDS} interleaved rounds), x {dtype}; ratio against cuBLAS"
          + ("; a copy of x before every call" if args.chain else ""))
    print("\n| N x K | M | kernel | cuBLAS | " + " | ".join(labels) + " |")
    print("|---|---|---|---|" + "---|" * len(labels))
    for n, k in shapes:
        dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(3)]
        prepared = [fp4cupy.prepare(fp4cupy.quantize(w)) for w in dense]
        for m in (int(v) for v in args.m.split(",")):
            x0 = torch.randn(m, k, device="cuda", dtype=dtype)
            x, y = x0.clone(), torch.empty(m, n, device="cuda", dtype=dtype)
            ref = F.linear(x.double(), fp4cupy.dequantize(prepared[0].weight, dtype=torch.float32).double())

            def chained(fn):
                return (lambda i: (x.copy_(x0), fn(i))) if args.chain else fn
            graphs, notes, keep = [capture(chained(lambda i: F.linear(x, dense[i % 3])), CALLS)], [""], []
            wg = cuda_linear.uses_warpgroup_kernel(m, n, k, 0)
            for source in [None] + sources:
                if wg:
                    call, p = wg_fn(source, prepared, x, y)
                    call = chained(call)
                else:
                    p = kernel_plan(source, n, k, m, args.bf16, args.kernel)
                    call = chained(plan_fn(prepared, x, y, p))
                y.fill_(float("nan"))
                call(0)
                torch.cuda.synchronize()
                err = float((y.double() - ref).norm() / ref.norm())
                notes.append("" if err <= 2e-3 else f", error {err:.1e}")
                keep.append(call)  # the graphs replay the closures' buffers
                graphs.append(capture(call, CALLS))
            times = [[] for _ in graphs]
            for _ in range(ROUNDS):
                for t, g in zip(times, graphs):
                    t.append(statistics.median(time_ms(g.replay, 3)) / CALLS * 1e3)
            peer = statistics.median(times[0])
            cells = [f"{statistics.median(t):.1f} ({peer / statistics.median(t):.2f}x{note})"
                     for t, note in zip(times[1:], notes[1:])]
            print(f"| {n}x{k} | {m} | {p.name} {p.threads // 32} warps | {peer:.1f} | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
