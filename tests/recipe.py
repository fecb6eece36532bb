"""An independent, scalar re-statement of DESIGN.md section 1 used to check the vectorised reference.

It shares no code with fp4cupy: E2M1 and E4M3 rounding are done by searching the value grids
(nearest, ties to the even code), exactly as the recipe words them.
"""
import math

import numpy as np

F32 = np.float32
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e4m3_grid():
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals.append((v, e << 3 | m))
    return vals


E4M3 = e4m3_grid()


def nearest_even(v, grid):
    """grid: list of (value, code); nearest value, ties to the even code; saturate at the top."""
    if v >= grid[-1][0]:
        return grid[-1][1]
    best = min(grid, key=lambda p: (abs(p[0] - v), p[1] & 1))
    return best[1]


def e2m1_code(r: float) -> int:
    sign = 8 if math.copysign(1.0, r) < 0 else 0
    return sign | nearest_even(abs(r), [(v, i) for i, v in enumerate(E2M1)])


def e4m3_code(v: float) -> int:
    return nearest_even(min(v, 448.0), E4M3)


def e4m3_value(code: int) -> float:
    return dict((c, v) for v, c in E4M3)[code]


def nvfp4(x: np.ndarray, gs: int):
    """codes [..., K], scales [..., K/gs], g for a float32 array x."""
    x = x.astype(F32)
    amax = F32(np.max(np.abs(x)))
    g = amax / F32(2688.0)
    g = F32(1.0) if g == 0 else F32(g)
    flat = x.reshape(-1, gs)
    codes = np.zeros(flat.shape, np.uint8)
    scales = np.zeros(flat.shape[0], np.uint8)
    for b, blk in enumerate(flat):
        bam = F32(np.max(np.abs(blk)))
        s = e4m3_code(float(bam / (F32(6.0) * g)))
        scales[b] = s
        d = F32(e4m3_value(s)) * g
        if d == 0:
            continue
        for i, v in enumerate(blk):
            codes[b, i] = e2m1_code(float(F32(v) / d))
    return codes.reshape(x.shape), scales.reshape(x.shape[:-1] + (x.shape[-1] // gs,)), g


def mxfp4(x: np.ndarray, mode: str = "floor"):
    """codes, E8M0 scale bytes for float32 x (block 32): the OCP rule, torchao's rceil, or
    compressed-tensors' round (blockamax rounded to one mantissa bit, half up, before the floor)."""
    x = x.astype(F32)
    flat = x.reshape(-1, 32)
    codes = np.zeros(flat.shape, np.uint8)
    scales = np.zeros(flat.shape[0], np.uint8)
    for b, blk in enumerate(flat):
        bam = float(np.max(np.abs(blk)))
        if bam == 0:
            e = -127
        elif mode == "floor":
            e = math.floor(math.log2(bam)) - 2
        elif mode == "round":
            m, ex = math.frexp(bam)  # bam = m * 2**ex, 0.5 <= m < 1: significand 2m
            e = ex - 1 + (2 * m >= 1.75) - 2
        else:
            e = math.ceil(math.log2(float(F32(bam) / F32(6.0))))
        e = max(-127, min(127, e))
        scales[b] = e + 127
        for i, v in enumerate(blk):
            codes[b, i] = e2m1_code(float(v) / 2.0**e)
    return codes.reshape(x.shape), scales.reshape(x.shape[:-1] + (x.shape[-1] // 32,))
