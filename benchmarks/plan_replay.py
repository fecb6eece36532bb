"""Score mma_plan's launch picks offline against split_sweep.py tables already measured: each row
of those tables lists every launch's time, so a change to the plan's rules can be judged on the
rows in RESULTS.md, and in the raw rows split_sweep.py --jsonl wrote (benchmarks/sweeps/*.jsonl,
the NVIDIA H200's, session 19 on), before it spends device time. No GPU needed.

    python3 benchmarks/plan_replay.py [FILE ...] [--worst 20]     (default: RESULTS.md and sweeps/*.jsonl)

The GPU is faked as an NVIDIA H200 (132 SMs, sm_90, the driver's occupancy read in sessions 17-18:
``h200_blocks_per_sm``, ``h200_resident``; tests/test_plans.py fakes it the same way). On the 140
rows checked in session 19 the faked plan picked the launch the device's plan did on every row.
A row's score is the time of the launch the plan picks now over the row's best launch; rows whose
pick the table did not time are left out and counted.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fp4cupy import mma_plan  # noqa: E402

SMS = 132
# Blocks a SM of the two-tile kernels and the capped one-tile one, (variant, warps) -> blocks, and
# of the one-tile kernels (mma_plan.SPLIT_VARIANTS), (NT, warps) -> blocks a SM and, for S = 2, 4, 8,
# resident clusters of S blocks (fp16, bf16): the driver's answers on an H200.
_BLOCKS_PER_SM = {((2, 1, 2, 16), 8): 2, ((2, 1, 2, 16), 4): 4, ((2, 2, 1, 16), 8): 4, ((2, 2, 1, 16), 16): 2,
                  ((1, 1, 2, 4), 4): 7}
H200_ONE_TILE = {(1, 4): ((6, 396, 186, 77), (5, 330, 154, 77)), (1, 8): ((3, 198, 92, 30), (2, 132, 62, 30)),
                 (2, 4): ((4, 264, 124, 62),) * 2, (2, 8): ((2, 132, 62, 30),) * 2,
                 (4, 4): ((5, 330, 154, 77),) * 2, (4, 8): ((2, 132, 62, 30),) * 2}


def h200_blocks_per_sm(variant, warps: int, bf16: bool, device: int = 0) -> int:
    """mma_plan._blocks_per_sm on an H200 (0 where not read)."""
    if variant in mma_plan.SPLIT_VARIANTS.values() and (variant[1], warps) in H200_ONE_TILE:
        return H200_ONE_TILE[variant[1], warps][bf16][0]
    return _BLOCKS_PER_SM.get((variant, warps), 0)


def h200_resident(variant, warps: int, splits: int, bf16: bool, device: int = 0) -> int:
    """mma_plan._resident_blocks on an H200: blocks a SM x SMs, or resident clusters x S."""
    if variant[0] == 2:  # the two-tile kernels: 107-108, 64 (capped) and 128 registers at NT = 1, 2, 4
        return SMS * {1: 16, 2: 32, 4: 16}[variant[1]] // warps
    bps, *clusters = H200_ONE_TILE[variant[1], warps][bf16]
    return bps * SMS if splits == 1 else clusters[mma_plan.SPLITS.index(splits)] * splits


@contextlib.contextmanager
def h200():
    """mma_plan as on an H200 while inside; restored (and its plan cache cleared) on exit."""
    fakes = {(mma_plan, "_sm_count"): lambda device: SMS, (mma_plan, "_blocks_per_sm"): h200_blocks_per_sm,
             (mma_plan, "_resident_blocks"): h200_resident,
             (mma_plan.runtime, "compute_capability"): lambda device: (9, 0),
             (mma_plan.runtime, "launcher"): lambda *a: None}
    saved = {key: getattr(*key) for key in fakes}
    for (obj, name), fake in fakes.items():
        setattr(obj, name, fake)
    mma_plan.plan.cache_clear()
    try:
        yield
    finally:
        for (obj, name), value in saved.items():
            setattr(obj, name, value)
        mma_plan.plan.cache_clear()


ROW = re.compile(r"^\| (b?f16) \| (\d+)x(\d+) \| (\d+) \| [\d.]+ \| \S+ \d+w [\d.]+ \(.*?\) \| .+? \| [\d.]+ \| (.+) \|$")


def read_rows(lines) -> list[dict]:
    """split_sweep.py table rows that list every launch: dtype, n, k, m and {launch name: us}."""
    rows = []
    for line in lines:
        hit = ROW.match(line.strip())
        if hit:
            dt, n, k, m, launches = hit.groups()
            times = dict(re.match(r"(.+) ([\d.]+)$", part.strip()).groups() for part in launches.split(", "))
            rows.append(dict(bf16=dt == "bf16", n=int(n), k=int(k), m=int(m), times={a: float(t) for a, t in times.items()}))
    return rows


def read_jsonl(lines) -> list[dict]:
    """The rows of split_sweep.py --jsonl: the same fields, every launch at full precision."""
    rows = []
    for line in lines:
        if line.strip():
            r = json.loads(line)
            times = {a: t for a, t in r["us"].items() if a not in ("cuBLAS", "plan")}
            rows.append(dict(bf16=r["dtype"] == "bf16", n=r["n"], k=r["k"], m=r["m"], times=times))
    return rows


def launch_name(p) -> str:
    """The split_sweep.py name of a Plan's launch: "s2 4w", "rt2 8w", "w4 rt1", ..."""
    if "_w4_" in p.name:
        return "w4 rt2" if p.name.startswith("w4a16_rt2") else "w4 rt1"
    if p.name.startswith("w4a16_rt2"):
        return f"rt2 {p.threads // 32}w"
    split = re.search(r"_s(\d)_", p.name)
    return f"s{split.group(1) if split else 1} {p.threads // 32}w"


def score(rows) -> tuple[list[tuple[dict, str, float]], int]:
    """(row, the plan's launch, its time over the row's best) for each row whose pick was timed,
    and how many were not; mma.sync rows only (M <= 32)."""
    scored, untimed = [], 0
    with h200():
        for r in rows:
            if r["m"] > 32:
                continue
            pick = launch_name(mma_plan.plan(r["n"], r["k"], r["m"], r["bf16"], 0))
            if pick in r["times"]:
                scored.append((r, pick, r["times"][pick] / min(r["times"].values())))
            else:
                untimed += 1
    return scored, untimed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("files", nargs="*",
                    default=[os.path.join(here, "RESULTS.md"), *sorted(glob.glob(os.path.join(here, "sweeps", "*.jsonl")))])
    ap.add_argument("--worst", type=int, default=20, help="list this many rows, the plan's largest losses first")
    args = ap.parse_args(argv)
    rows = []
    for f in args.files:
        with open(f) as h:
            rows += (read_jsonl if f.endswith(".jsonl") else read_rows)(h.read().splitlines())
    scored, untimed = score(rows)
    if not scored:
        print("no split_sweep.py rows with every launch's time found")
        return 1
    geo = math.exp(sum(math.log(s) for _, _, s in scored) / len(scored))
    print(f"the plan's pick over the best launch: geomean {geo:.4f}, worst {max(s for _, _, s in scored):.2f} "
          f"({len(scored)} rows; {untimed} whose pick was not timed)")
    print("| dtype | N x K | M | the plan's pick | its us | best | best us | pick / best |\n|---|---|---|---|---|---|---|---|")
    for r, pick, s in sorted(scored, key=lambda t: -t[2])[:args.worst]:
        best = min(r["times"], key=r["times"].get)
        print(f"| {'bf16' if r['bf16'] else 'f16'} | {r['n']}x{r['k']} | {r['m']} | {pick} | {r['times'][pick]:.1f} | "
              f"{best} | {r['times'][best]:.1f} | {s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
