"""SM clock, power and throttle reasons (nvidia-smi every 50 ms) while one call's CUDA graph
replays for a few seconds, fp4cupy's W4A16 linear and cuBLAS F.linear in turn: whether a shape
runs at the card's power cap (NOTES.md, session 14).

    PYTHONPATH=$PWD python3 benchmarks/clock_power.py [--shapes 28672x8192:128,4096x4096:128,28672x8192:1] [--seconds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from timing import capture, card  # noqa: E402

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"


def summarize(lines: list[str]) -> tuple[float, float, float, list[str]]:
    """(median SM MHz, lowest, median W, throttle reason masks) of nvidia-smi's QUERY lines, over
    their last two thirds (the clock settles as the load starts)."""
    rows = [line.split(", ") for line in lines if line.strip()]
    rows = rows[len(rows) // 3:]
    if not rows:
        raise RuntimeError("nvidia-smi printed no samples")
    clocks, watts = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    return statistics.median(clocks), min(clocks), statistics.median(watts), sorted({r[2].strip() for r in rows})


def sample(replay, seconds: float) -> tuple[float, float, float, list[str]]:
    """``summarize`` of nvidia-smi's samples while ``replay()`` runs, 20 at a time, for ``seconds``."""
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            replay()
        torch.cuda.synchronize()
    smi.terminate()
    return summarize(smi.communicate()[0].splitlines())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="28672x8192:128,4096x4096:128,28672x8192:1", help="NxK:M,...")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"{card()}: " + subprocess.run(["nvidia-smi", "--query-gpu=power.limit,clocks.max.sm", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.strip())
    print("\n| N x K, M | kernel | SM clock median (min) | power median | throttle reasons |\n|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        nk, m = spec.split(":")
        n, k = (int(v) for v in nk.split("x"))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(3)]
        prepared = [fp4cupy.prepare(fp4cupy.quantize(w)) for w in dense]
        x = torch.randn(int(m), k, device="cuda", dtype=torch.float16)
        for name, fn in (("fp4cupy", lambda i: fp4cupy.linear(x, prepared[i % 3])),
                         ("cuBLAS", lambda i: F.linear(x, dense[i % 3]))):
            graph = capture(fn, 20)
            med, low, watts, reasons = sample(graph.replay, args.seconds)
            print(f"| {n}x{k}, {m} | {name} | {med:.0f} ({low:.0f}) MHz | {watts:.0f} W | {' '.join(reasons)} |", flush=True)


if __name__ == "__main__":
    main()
