"""SM clock, power and throttle reasons (nvidia-smi every 50 ms) while one call's CUDA graph
replays for a few seconds, fp4cupy's W4A16 linear and cuBLAS F.linear in turn: whether a shape
runs at the card's power cap (NOTES.md, sessions 14 and 15), and the time and board energy of a
call in that settled state.

gemm.py alternates fp4cupy and cuBLAS every few calls, so both run at the clock their mix allows;
here each runs alone for ``--seconds``, as every layer of a model's decode step would, and a
kernel that draws the card's 700 W runs at a lower clock than it does there.

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
CALLS = 20  # calls a graph


def settled(samples: list):
    """The samples after the first third (the clock settles as the load starts)."""
    return samples[len(samples) // 3:]


def summarize(lines: list[str]) -> tuple[float, float, float, list[str]]:
    """(median SM MHz, lowest, median W, throttle reason masks) of nvidia-smi's QUERY lines, over
    their ``settled`` part."""
    rows = settled([line.split(", ") for line in lines if line.strip()])
    if not rows:
        raise RuntimeError("nvidia-smi printed no samples")
    clocks, watts = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    return statistics.median(clocks), min(clocks), statistics.median(watts), sorted({r[2].strip() for r in rows})


def sample(replay, calls: int, seconds: float) -> tuple[float, float, float, float, list[str]]:
    """(median us a call, then ``summarize``'s four) while ``replay()`` (a graph of ``calls``
    calls) runs 20 at a time for ``seconds``, each 20 timed with CUDA events."""
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    t0, per_call = time.time(), []
    while time.time() - t0 < seconds:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            replay()
        b.record()
        b.synchronize()
        per_call.append(a.elapsed_time(b) * 1e3 / (20 * calls))
    smi.terminate()
    return (statistics.median(settled(per_call)), *summarize(smi.communicate()[0].splitlines()))


def energy_mj(us: float, watts: float) -> float:
    """Board energy of one call, mJ: its settled time at the settled power draw."""
    return us * watts * 1e-3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="28672x8192:128,4096x4096:128,28672x8192:1", help="NxK:M,...")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"{card()}: " + subprocess.run(["nvidia-smi", "--query-gpu=power.limit,clocks.max.sm", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.strip())
    print("\n| N x K, M | kernel | us a call | SM clock median (min) | power median | energy a call | throttle reasons |"
          "\n|---|---|---|---|---|---|---|")
    summary = []
    for spec in args.shapes.split(","):
        nk, m = spec.split(":")
        n, k = (int(v) for v in nk.split("x"))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(3)]
        prepared = [fp4cupy.prepare(fp4cupy.quantize(w)) for w in dense]
        x = torch.randn(int(m), k, device="cuda", dtype=torch.float16)
        got = {}
        for name, fn in (("fp4cupy", lambda i: fp4cupy.linear(x, prepared[i % 3])),
                         ("cuBLAS", lambda i: F.linear(x, dense[i % 3]))):
            graph = capture(fn, CALLS)
            us, med, low, watts, reasons = sample(graph.replay, CALLS, args.seconds)
            got[name] = us, energy_mj(us, watts)
            print(f"| {n}x{k}, {m} | {name} | {us:.1f} | {med:.0f} ({low:.0f}) MHz | {watts:.0f} W | "
                  f"{got[name][1]:.1f} mJ | {' '.join(reasons)} |", flush=True)
        summary.append(f"| {n}x{k}, {m} | {got['cuBLAS'][0] / got['fp4cupy'][0]:.2f}x | "
                       f"{got['cuBLAS'][1] / got['fp4cupy'][1]:.2f}x |")
    print("\nEach alone, settled: cuBLAS over fp4cupy\n\n| N x K, M | time | energy |\n|---|---|---|")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
