"""A few w4a16 launches to profile with Nsight Compute:

    ncu --clock-control none -k regex:w4a16 -c 2 --section SpeedOfLight --section WarpStateStats \\
        --section Occupancy --section MemoryWorkloadAnalysis python3 benchmarks/profile_w4a16.py N K M
"""
import sys

import torch

import fp4cupy

n, k, m = (int(a) for a in (sys.argv[1:4] if len(sys.argv) > 3 else (8192, 28672, 1)))
pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", dtype=torch.float16)))
x = torch.randn(m, k, device="cuda", dtype=torch.float16)
for _ in range(3):
    fp4cupy.linear(x, pw)
torch.cuda.synchronize()
