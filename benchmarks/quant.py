"""Quantize / dequantize speed on the GPU: effective bandwidth, % of a copy, and speed-up over
torch.compile of the same recipe written in torch ops, all measured in this run on this card.

    PYTHONPATH=$PWD python3 benchmarks/quant.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from timing import Rotating, card, compare, host_us  # noqa: E402

SHAPES = ((8192, 8192), (28672, 8192))
INNER = 20  # calls per timed sample: the time of a call in a stream of calls, as a model's layers quantize


def torch_reference_quantize(x: torch.Tensor, gs: int = 16):
    """DESIGN.md section 1 in torch ops (the peer for torch.compile)."""
    xf = x.float()
    amax = xf.abs().amax()
    g = amax / 2688.0
    g = torch.where(g == 0, torch.ones_like(g), g)
    blocks = xf.view(*x.shape[:-1], x.shape[-1] // gs, gs)
    bam = blocks.abs().amax(-1)
    s8 = (bam / (6.0 * g)).clamp(max=448.0).to(torch.float8_e4m3fn)
    d = s8.float() * g
    r = blocks / torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)
    a = r.abs()
    idx = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int() + (a > 2.5).int()
           + (a >= 3.5).int() + (a > 5.0).int())
    code = (idx | (torch.signbit(r).int() << 3)) * (d != 0).unsqueeze(-1).int()
    code = code.view(*x.shape[:-1], x.shape[-1]).to(torch.uint8)
    return code[..., 0::2] | (code[..., 1::2] << 4), s8.view(torch.uint8), g


def cold_and_warm_start() -> tuple[float, float]:
    """Seconds to compile + load every kernel with an empty cache, and the first call with a warm cache."""
    code = ("import time, torch, fp4cupy; x = torch.randn(256, 256, device='cuda', dtype=torch.bfloat16); "
            "torch.cuda.synchronize(); t = time.perf_counter(); "
            "q = fp4cupy.quantize(x); fp4cupy.quantize(x, global_scale=0.1); fp4cupy.dequantize(q, dtype=torch.bfloat16); "
            "torch.cuda.synchronize(); print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, FP4CUPY_CACHE_DIR=d)
        cold = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
        warm = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    return cold, warm


def host_overhead_us(calls: int = 2000) -> dict:
    """Host time per public call on a tiny bf16 [16, 256] input (the GPU work is a few µs)."""
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    t = fp4cupy.quantize(x)
    cases = {"quantize, given g, 'mark'": lambda: fp4cupy.quantize(x, global_scale=0.01, nonfinite="mark"),
             "quantize, amax, 'mark'": lambda: fp4cupy.quantize(x, nonfinite="mark"),
             "quantize, amax, raise (waits for the GPU)": lambda: fp4cupy.quantize(x),
             "dequantize -> bf16": lambda: fp4cupy.dequantize(t, dtype=torch.bfloat16)}
    return {name: host_us(fn, calls) for name, fn in cases.items()}


def main():
    torch.manual_seed(0)
    compiled = torch.compile(torch_reference_quantize)
    rows = []
    for n, k in SHAPES:
        xs = Rotating(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dst = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        in_b, data_b, sc_b = n * k * 2, n * k // 2, n * k // 16
        q_bytes = in_b + data_b + sc_b
        copy = compare(lambda: dst.copy_(xs.next()), lambda: dst.copy_(xs.next()), inner=INNER)
        copy_tbs = 2 * in_b / copy["ours_ms"] / 1e9
        g = float(xs.items[0].float().abs().max()) / 2688
        ts = Rotating(fp4cupy.quantize(x) for x in xs.items)
        peer = lambda: compiled(xs.next())  # noqa: E731
        ops = (  # name, ours, peer (None: no peer), bytes moved
            ("quantize: amax + NaN/Inf raise (1 sync)", lambda: fp4cupy.quantize(xs.next()), peer, q_bytes),
            ("quantize: amax, nonfinite='mark'", lambda: fp4cupy.quantize(xs.next(), nonfinite="mark"), peer, q_bytes),
            ("quantize: given g, NaN/Inf raise (1 sync)", lambda: fp4cupy.quantize(xs.next(), global_scale=g), None, q_bytes),
            ("quantize: given g, one pass, 'mark'", lambda: fp4cupy.quantize(xs.next(), global_scale=g, nonfinite="mark"), None, q_bytes),
            ("dequantize -> bf16", lambda: fp4cupy.dequantize(ts.next(), dtype=torch.bfloat16), None, data_b + sc_b + in_b),
        )
        for name, ours, vs_peer, nbytes in ops:
            r = compare(vs_peer or (lambda: dst.copy_(xs.next())), ours, inner=INNER)
            tbs = nbytes / r["ours_ms"] / 1e9
            vs = f"{r['ratio']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f})" if vs_peer else "-"
            rows.append((f"{n}x{k}", name, r["ours_ms"], tbs, 100 * tbs / copy_tbs, vs))
        rows.append((f"{n}x{k}", "copy (bf16, read+write)", copy["ours_ms"], copy_tbs, 100.0, "-"))
        del xs, ts, dst
        torch.cuda.empty_cache()
    cold, warm = cold_and_warm_start()
    host = host_overhead_us()
    print(f"\n## benchmarks/quant.py on {card()} (torch {torch.__version__}, fp4cupy {fp4cupy.version()})\n")
    print("| shape (bf16) | op | ms | TB/s | % of copy | speed-up vs torch.compile (median, min-max) |")
    print("|---|---|---|---|---|---|")
    for s, name, ms, tbs, pct, vs in rows:
        print(f"| {s} | {name} | {ms:.3f} | {tbs:.2f} | {pct:.0f}% | {vs} |")
    print(f"\nEach sample times {INNER} back-to-back calls of one side (peers alike), samples alternate.")
    print(f"TB/s = (input + packed codes + scales) / time. Cold compile + load of all kernels with an empty cache: "
          f"{cold:.2f} s; first call with a warm cache: {warm:.3f} s")
    print("\n| host time per call, bf16 [16, 256] | µs |\n|---|---|")
    for name, us in host.items():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"(benchmark ran {time.time() - t0:.0f} s)")
