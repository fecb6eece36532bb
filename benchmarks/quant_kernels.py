"""Kernel-only times of the quantize / dequantize kernels (raw back-to-back launches, no Python
dispatch, no NaN read-back), to separate kernel time from host overhead in benchmarks/quant.py.

    PYTHONPATH=$PWD python3 benchmarks/quant_kernels.py
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp4cupy import cuda_ops  # noqa: E402
from timing import card, time_ms  # noqa: E402


def main(n=28672, k=8192, reps=20):
    xs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    data = torch.empty(n, k // 2, device="cuda", dtype=torch.uint8)
    scales = torch.empty(n, k // 16, device="cuda", dtype=torch.uint8)
    out = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    status = torch.zeros(4, device="cuda", dtype=torch.int64)
    g = torch.full((), 0.002, device="cuda")
    ngroups = n * k // 16
    lib = cuda_ops._Lib(xs[0])
    grid_q = cuda_ops.quantize_grid(ngroups)  # the quantize pass is grid-stride
    grid_d = -(-ngroups // cuda_ops.THREADS)  # dequantize: one group a thread
    grid_a = cuda_ops._sm_count(0) * 8
    launch = lambda f, name, grid, args: lib.launch(f, name, grid, args)  # noqa: E731
    it = iter(range(10**9))

    def quant(given):
        x = xs[next(it) % 3]
        if not given:
            launch("quantize.cu", "fp4_amax_bf16", grid_a, (x.data_ptr(), n * k, status.data_ptr(), 0))
        launch("quantize.cu", "nvfp4_quantize_g16_bf16", grid_q,
               (x.data_ptr(), data.data_ptr(), scales.data_ptr(), np.float32(0.002 if given else 0.0),
                status.data_ptr(), g.data_ptr(), ngroups, np.int32(1), 0))

    def amax():
        x = xs[next(it) % 3]
        launch("quantize.cu", "fp4_amax_bf16", grid_a, (x.data_ptr(), n * k, status.data_ptr(), 0))

    def deq():
        launch("dequantize.cu", "nvfp4_dequantize_g16_bf16", grid_d,
               (data.data_ptr(), scales.data_ptr(), g.data_ptr(), out.data_ptr(), ngroups))

    copy = lambda: out.copy_(xs[next(it) % 3])  # noqa: E731
    q_bytes = n * k * 2 + n * k // 2 + n * k // 16
    rows = [("copy bf16 (read+write)", copy, 4 * n * k), ("amax kernel", amax, 2 * n * k),
            ("quantize kernel, given g", lambda: quant(True), q_bytes), ("amax + quantize kernels", lambda: quant(False), q_bytes),
            ("dequantize kernel -> bf16", deq, q_bytes)]
    print(f"\n## benchmarks/quant_kernels.py on {card()}: kernels alone, {n}x{k} bf16, {reps} back-to-back launches\n")
    print("| kernel | ms per call | TB/s |")
    print("|---|---|---|")
    for name, fn, nbytes in rows:
        for _ in range(3):
            fn()
        ms = float(np.median(time_ms(lambda: [fn() for _ in range(reps)], 5))) / reps
        print(f"| {name} | {ms:.3f} | {nbytes / ms / 1e9:.2f} |")


if __name__ == "__main__":
    main()
