"""Where the host time of one public call goes: cProfile over many calls on a tiny tensor.

    PYTHONPATH=$PWD python3 benchmarks/host_profile.py [quantize|quantize_g|dequantize|linear]
"""
from __future__ import annotations

import cProfile
import pstats
import sys

import torch

import fp4cupy


def main(which: str = "quantize", calls: int = 3000):
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    t = fp4cupy.quantize(x)
    fns = {"quantize": lambda: fp4cupy.quantize(x, nonfinite="mark"),
           "quantize_raise": lambda: fp4cupy.quantize(x),
           "quantize_g": lambda: fp4cupy.quantize(x, global_scale=0.01, nonfinite="mark"),
           "dequantize": lambda: fp4cupy.dequantize(t, dtype=torch.bfloat16)}
    if hasattr(fp4cupy, "prepare"):
        w = fp4cupy.prepare(fp4cupy.quantize(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)))
        xs = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
        fns["linear"] = lambda: fp4cupy.linear(xs, w)
    fn = fns[which]
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"== {which}: {calls} calls")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    for w in sys.argv[1:] or ["quantize"]:
        main(w)
