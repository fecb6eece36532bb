"""W4A16 linear against cuBLAS fp16 at the batch sizes between decode and prefill, in this run on this card.

    PYTHONPATH=$PWD python3 benchmarks/batch_sweep.py [--bf16] [--m 2,4,8,17,24,32,48,64,96,128]
        [--shapes 1024x8192,2048x16384]

The rows of gemm.py (CUDA-graph replays of 30 calls, three rotating weights, alternating pairs) at
more token counts and shapes: a table of speed-ups (shape x M), the kernel each call ran, a geomean
a M, and at M=1 the share of the byte limit (gemm.py's plain read of the prepared weight).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from gemm import SHAPES, linear_rows  # noqa: E402
from timing import card  # noqa: E402

MODEL_SHAPES = ((6144, 4096), (8192, 8192), (10240, 8192), (5120, 13824))  # Llama-3-8B qkv, 70B o / qkv, 13B down


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--m", default="2,4,8,17,24,32,48,64,96,128")
    ap.add_argument("--shapes", help="NxK,... instead of gemm.py's five and four model shapes")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float16
    ms = tuple(int(v) for v in args.m.split(","))
    shapes = (tuple(tuple(int(v) for v in a.split("x")) for a in args.shapes.split(",")) if args.shapes
              else SHAPES + MODEL_SHAPES)
    rows = linear_rows(dtype, shapes, ms)
    print(f"\n## benchmarks/batch_sweep.py on {card()} (torch {torch.__version__}, fp4cupy {fp4cupy.version()})\n")
    print(f"W4A16 linear, x {str(dtype)[6:]}, W NVFP4 (group 16): speed-up against cuBLAS F.linear (median of "
          "alternating pairs of CUDA-graph replays).\n")
    print("| N x K | " + " | ".join(f"M={m}" for m in ms) + " |")
    print("|---|" + "---|" * len(ms))
    cell = {(r["n"], r["k"], r["m"]): r for r in rows}
    for n, k in shapes:
        print(f"| {n}x{k} | " + " | ".join(f"{cell[n, k, m]['ratio']:.2f}x" for m in ms) + " |")
    geo = [math.exp(sum(math.log(cell[n, k, m]["ratio"]) for n, k in shapes) / len(shapes)) for m in ms]
    print("| geomean | " + " | ".join(f"{g:.2f}x" for g in geo) + " |")
    if 1 in ms:
        print("\n| N x K | M=1 byte limit (cuBLAS / plain read) | share of it |\n|---|---|---|")
        for n, k in shapes:
            r = cell[n, k, 1]
            print(f"| {n}x{k} | {r['read']['ratio']:.2f}x | {r['ratio'] / r['read']['ratio']:.0%} |")
    print("\n| M | kernels (by shape, in the order above) |\n|---|---|")
    for m in ms:
        print(f"| {m} | " + "; ".join(cell[n, k, m]["path"] for n, k in shapes) + " |")
    alts = [m for m in ms if any(cell[n, k, m]["alt"] != "-" for n, k in shapes)]
    if alts:
        print("\n| M | the other paths (by shape, in the order above) |\n|---|---|")
        for m in alts:
            print(f"| {m} | " + "; ".join(cell[n, k, m]["alt"] for n, k in shapes) + " |")


if __name__ == "__main__":
    main()
