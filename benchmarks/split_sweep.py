"""Every launch of the one-tile w4a16 kernel (K split over clusters or not) and of the two-tile one
for M's token tiles, against the plan's pick and cuBLAS fp16 F.linear, as CUDA-graph replays timed
in turns in this run. The evidence behind ``mma_plan._one_wave_launch`` (below 64 rows a SM, the
default rows) and ``mma_plan._one_tile_rounds`` (above, ``--unsplit``).

    PYTHONPATH=$PWD python3 benchmarks/split_sweep.py [--quick] [--jsonl FILE] [--rows 4608,6144] [--ks 4096]
        [--ms 1,16] [--dtypes f16,bf16] [--unsplit]

Default rows: 512-4096 (the few-row weights); the rule's other half ran as
``--rows 4224,4608,5120,6144,7168,8192``.

Per (dtype, M, N, K): S in (1, 2, 4, 8) blocks a cluster x 4 or 8 warps a block (each warp at
least one chunk of 64), the two-tile kernel the plan takes for M as 4, 8 and 16 warps
("rt2 8w"), the kernels capped at 4 warps for M's token tiles ("w4 rt1", and "w4 rt2" at M <= 8:
72 registers, seven blocks a SM), the plan's kernel, cuBLAS. ``--unsplit`` leaves out S > 1 (above 2 x SMs
two-tile blocks every split lost by 15% or more). Enough weight copies rotate that they span
more than twice the L2 (small weights included), so no call finds its weight in L2. Prints a
table (times in us, the plan's loss against the best) and a summary line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from fp4cupy import cuda_linear, mma_plan  # noqa: E402
from timing import capture, card, time_ms  # noqa: E402
from w4a16_variants import plan_fn  # noqa: E402

ROWS = (512, 1024, 1280, 1536, 2048, 2560, 3072, 4096)
KS = (4096, 8192, 14336, 28672)
MS = (1, 16, 32)
SPAN = 2 * 50 * 2**20  # bytes of weights the rotation spans: twice an H100/H200 L2
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def csv_ints(v: str) -> tuple:
    return tuple(int(a) for a in v.split(","))


def csv_dtypes(v: str) -> tuple:
    unknown = [d for d in v.split(",") if d not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: give some of {', '.join(DTYPES)}")
    return tuple(DTYPES[d] for d in v.split(","))


def configs(k: int, nt: int, splits=(1, *mma_plan.SPLITS)):
    """(splits, warps) of the one-tile kernel for nt token tiles, each warp one chunk or more."""
    return [(s, w) for s in splits for w in (4, 8) if (k // 64) // s >= w
            and (s == 1 or mma_plan.SPLIT_VARIANTS.get(nt))]


def sweep_one(n: int, k: int, m: int, dtype, rounds: int = 7, splits=(1, *mma_plan.SPLITS)) -> dict:
    bf16 = dtype == torch.bfloat16
    nt = mma_plan.token_tiles(m)
    two, one = mma_plan.TWO_AND_ONE[nt]
    copies = max(3, math.ceil(SPAN / (n * k * 9 // 16)))
    calls = max(30, copies)
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
    pws = [fp4cupy.prepare(fp4cupy.quantize(w)) for w in dense]
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y = torch.empty(m, n, device="cuda", dtype=dtype)
    ref = F.linear(x.double(), fp4cupy.dequantize(pws[0].weight, dtype=torch.float32).double())
    plans = {"plan": mma_plan.plan(n, k, m, bf16, 0)}
    for s, w in configs(k, nt, splits):
        plans[f"s{s} {w}w"] = mma_plan.make_plan(n, m, one, w, bf16, 0, s)
    for w in (4, 8, 16):
        if (k // 64) // 2 >= w and w * 2 * nt * 512 <= mma_plan.SHARED_LIMIT:
            plans[f"rt2 {w}w"] = mma_plan.make_plan(n, m, two, w, bf16, 0)
    for v in mma_plan.VARIANTS:
        if v[1] == nt and v[3] == 4 and (k // 64) // 2 >= 4:
            plans[f"w4 rt{v[0]}"] = mma_plan.make_plan(n, m, v, 4, bf16, 0)
    graphs = {"cuBLAS": capture(lambda i: F.linear(x, dense[i % copies]), calls)}
    for name, p in plans.items():
        fn = plan_fn(pws, x, y, p)
        y.fill_(float("nan"))
        fn(0)
        torch.cuda.synchronize()
        err = float((y.double() - ref).norm() / ref.norm())
        if not err < 8e-3:
            raise AssertionError(f"{p.name} at {n}x{k} M={m}: relative error {err}")
        graphs[name] = capture(fn, calls)
    samples = {name: [] for name in graphs}
    for _ in range(rounds):  # in turns, so every candidate sees the same clocks
        for name, g in graphs.items():
            samples[name].append(statistics.median(time_ms(g.replay, 3)) / calls * 1e3)
    us = {name: statistics.median(v) for name, v in samples.items()}
    p = plans["plan"]
    return dict(dtype="bf16" if bf16 else "f16", n=n, k=k, m=m, us=us, plan=p.name, plan_warps=p.threads // 32,
                plan_splits=p.grid[0] // -(-m // (8 * nt)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fp16, 1024-3072 rows")
    ap.add_argument("--jsonl", help="append each row's times to this file")
    ap.add_argument("--rows", type=csv_ints)
    ap.add_argument("--ks", type=csv_ints, default=KS)
    ap.add_argument("--ms", type=csv_ints, default=MS)
    ap.add_argument("--dtypes", type=csv_dtypes)
    ap.add_argument("--unsplit", action="store_true", help="no K split over clusters")
    args = ap.parse_args()
    dtypes = args.dtypes or ((torch.float16,) if args.quick else tuple(DTYPES.values()))
    rows_ = args.rows or ((1024, 2048, 3072) if args.quick else ROWS)
    ks, ms, out = args.ks, args.ms, args.jsonl
    splits = (1,) if args.unsplit else (1, *mma_plan.SPLITS)
    print(f"## benchmarks/split_sweep.py on {card()}: us a call (CUDA-graph replays)\n")
    print("| dtype | N x K | M | cuBLAS | plan's pick | best launch | loss | all |")
    print("|---|---|---|---|---|---|---|---|")
    losses = []
    for dtype in dtypes:
        for m in ms:
            for n in rows_:
                for k in ks:
                    if cuda_linear.uses_warpgroup_kernel(m, n, k, 0):
                        continue
                    r = sweep_one(n, k, m, dtype, splits=splits)
                    us = r["us"]
                    best = min((v, name) for name, v in us.items() if name not in ("cuBLAS", "plan"))
                    loss = us["plan"] / best[0]
                    losses.append(loss)
                    rest = ", ".join(f"{name} {v:.1f}" for name, v in us.items() if name not in ("cuBLAS", "plan"))
                    print(f"| {r['dtype']} | {n}x{k} | {m} | {us['cuBLAS']:.1f} | {r['plan'][6:]} {r['plan_warps']}w "
                          f"{us['plan']:.1f} ({us['cuBLAS'] / us['plan']:.2f}x) | {best[1]} {best[0]:.1f} | "
                          f"{loss:.2f} | {rest} |", flush=True)
                    if out:
                        with open(out, "a") as f:
                            f.write(json.dumps(r) + "\n")
                    torch.cuda.empty_cache()
    gm = math.exp(statistics.fmean(math.log(v) for v in losses))
    print(f"\nplan's time over the best launch's: geomean {gm:.3f}, worst {max(losses):.2f} ({len(losses)} rows)")


if __name__ == "__main__":
    main()
