"""The W4A16 ``linear`` on the GPU (kernels_cu/w4a16.cu, w4a16_wgmma.cu); the FP4 x FP4 ``gemm``
is in cuda_gemm.py.

Up to 16 tokens, one launch of an mma.sync kernel chosen by ``mma_plan.plan()`` from (M bucket,
N, K) and the GPU's occupancy, K split over thread block clusters for few-row weights on sm_90+;
on sm_90a, the warpgroup-MMA kernel (w4a16_wgmma.cu, ``cuda_wgmma``) from 33 tokens on all but
small weights, and from 17 on large ones (``uses_warpgroup_kernel``); elsewhere (Ampere, Ada,
Blackwell, and small weights on sm_90a) the tiled mma.sync kernel (w4a16_tiled.cu, ``cuda_tiled``)
from 33 tokens, 65 on the smallest weights (``uses_tiled_kernel``), up to ``MMA_MAX_M``; on sm_90a
up to ``SLICED_MAX_M`` tokens on large weights, in slices (``kernels_take``). The weight must be
``prepare``d (repacked once, prepare.cu). On sm_75 (Turing: no bf16 MMA, no cp.async) the
mma.sync and tiled kernels take fp16 x as on sm_80, each MMA as two m16n8k8. Past those tokens,
for bf16 x before sm_80, on GPUs older than sm_75, or for weights the kernel does not take, W is
dequantized and cuBLAS multiplies.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import arrays, cuda_tiled, cuda_wgmma, runtime
from .cuda_ops import THREADS, _Lib, _sm_count, _torch_names, _torch_stream_ptr, dequantize
from .mma_plan import TILE_ROWS, plan
from .prepared import PAIR, PreparedWeight
from .tensor import FP4Tensor

MMA_MAX_M = 128           # tokens a launch; larger batches: dequantize + cuBLAS (see benchmarks/RESULTS.md)
MMA_MIN_CC = (7, 5)       # mma.sync m16n8k8: fp16 x through the mma.sync and tiled kernels
FULL_MMA_CC = (8, 0)      # m16n8k16 and bf16 MMAs: bf16 x
TILE_PAD = 4              # row tiles are allocated in multiples of the largest RT


# ----------------------------------------------------------------------------- prepare
def repack(w: FP4Tensor):
    """Device copies of ``w`` in the w4a16 layout: (codes uint8 [T/2, K/64, 2, 32, 16], scale codes
    uint8 [T/2, K/64, 2, 4, 8, 2]) with T = ceil(N/16) row tiles rounded up to a multiple of 4 (zero
    rows), in pairs (kernels_cu/prepare.cu)."""
    lib = _Lib(w.data)
    n, k = w.shape
    tiles = -(-n // (TILE_ROWS * TILE_PAD)) * TILE_PAD
    codes = lib.empty((tiles // PAIR, k // 64, PAIR, 32, 16), "uint8")
    scale_codes = lib.empty((tiles // PAIR, k // 64, PAIR, 4, 8, 2), "uint8")
    total = tiles * (k // 64) * 32
    lib.launch("prepare.cu", "w4_repack_codes", -(-total // THREADS),
               (lib.ptr(w.data), lib.ptr(w.scales), lib.ptr(codes), np.int32(n), np.int32(k),
                np.int32(w.group_size), total))
    total = tiles * (k // 16) * 16
    lib.launch("prepare.cu", "w4_repack_scales", -(-total // THREADS),
               (lib.ptr(w.scales), lib.ptr(scale_codes), np.int32(n), np.int32(k), np.int32(w.group_size), total))
    return codes, scale_codes


def unrepack(codes, scale_codes, n: int, k: int, gs: int):
    """The canonical (data uint8 [N, K/2], scales uint8 [N, K/gs]) of a repacked weight, on its device."""
    lib = _Lib(codes)
    data = lib.empty((n, k // 2), "uint8")
    scales = lib.empty((n, k // gs), "uint8")
    total = codes.shape[0] * codes.shape[2] * (k // 64) * 32  # uint4 of the pairs' tiles
    lib.launch("prepare.cu", "w4_unrepack_codes", -(-total // THREADS),
               (lib.ptr(codes), lib.ptr(data), np.int32(n), np.int32(k), total))
    total = n * (k // gs)
    lib.launch("prepare.cu", "w4_unrepack_scales", -(-total // THREADS),
               (lib.ptr(scale_codes), lib.ptr(scales), np.int32(n), np.int32(k), np.int32(gs), total))
    return data, scales


# ----------------------------------------------------------------------------- linear
# The warpgroup-MMA kernel (w4a16_wgmma.cu, sm_90a) for WG_MIN_M..MMA_MAX_M tokens: from
# WG_MID_M tokens for weights of more than WG_MIN_WEIGHTS values; from WG_MIN_M for weights of
# more than twice that, but four times that where plan()'s one-tile grid runs 1.5-2 blocks a SM (N
# of 24-32 rows a SM). H200, 17-32 tokens, warpgroup time over mma.sync time (benchmarks/RESULTS.md,
# session 13): 0.38-0.97 on 19 of the 24 shapes the rule gives it (1024x32768 0.38, 5120x13824
# 0.65, 5120x4096 0.82, 28672x8192 0.83), 0.97-1.06 on five (14336x4096, 13824x5120, 8192x3072,
# 12288x2048, 16384x2048); 1.02-1.21 on the five where it keeps mma.sync (4096 rows, K 4096-8192).
# 33-128 tokens (session 21): on weights of 512x4096 to 2048x4096 and 1024x8192 (at most 8 Mi
# values) the tiled kernel (or mma.sync, below) ran 0.96-1.39x faster, 1.13x in geomean; from
# 2048x8192 and 3072x4096 (12 Mi) up the warpgroup kernel won but for 1024x14336 at 33-64 tokens.
WG_MIN_M = 17
WG_MID_M = 33
WG_MIN_WEIGHTS = 1 << 23


@functools.lru_cache(maxsize=None)
def _wg_ok(device: int) -> bool:
    return runtime.compute_capability(device) is not None and runtime.module_target(device) == "sm_90a"


def uses_warpgroup_kernel(m: int, n: int, k: int, device: int) -> bool:
    """Whether ``launch_w4a16`` takes w4a16_wgmma.cu for ``m`` tokens and an [n, k] weight on ``device``."""
    if m < WG_MIN_M or not _wg_ok(device):
        return False
    if m >= WG_MID_M:
        return n * k > WG_MIN_WEIGHTS
    if n * k <= 2 * WG_MIN_WEIGHTS:
        return False
    sms = _sm_count(device)  # plan()'s one-tile grid at 1.5-2 blocks a SM holds its own up to 4x the weights
    return n * k > 4 * WG_MIN_WEIGHTS or not 24 * sms <= n < 2 * TILE_ROWS * sms


# The tiled mma.sync kernel (w4a16_tiled.cu) from TILED_MIN_M tokens where the warpgroup kernel is
# not taken, but on weights of at most TILED_SMALL_WEIGHTS values from TILED_SMALL_MIN_M (past one
# token tile); below, ``plan``'s kernels (x read by each warp for its own rows, K split over
# warps). H200, 33-64 tokens, tiled time over mma.sync time (session 21): 0.72-0.76 on 2048x2048,
# 0.93-1.0 on 512x4096, 0.94 (33 tokens) and 1.05-1.06 on 1024x4096; 0.96-0.97 on 2048x4096.
TILED_MIN_M = 33
TILED_SMALL_MIN_M = 65
TILED_SMALL_WEIGHTS = 1 << 22


def uses_tiled_kernel(m: int, n: int, k: int) -> bool:
    """Whether ``launch_w4a16`` takes w4a16_tiled.cu for ``m`` tokens and an [n, k] weight where
    ``uses_warpgroup_kernel`` says no."""
    return m >= TILED_MIN_M and (m >= TILED_SMALL_MIN_M or n * k > TILED_SMALL_WEIGHTS)


# On sm_90a, SLICED_MAX_M tokens at most in slices of at most MMA_MAX_M (each the warpgroup
# kernel) on weights of more than SLICED_MIN_WEIGHTS values, instead of dequantize + cuBLAS. H200,
# fp16, speed-up over cuBLAS, slices against dequantize + cuBLAS (RESULTS.md, session 21): 129-256
# tokens 0.63-0.81x against 0.43-0.55x on seven shapes of 56-224 Mi values; 6144x4096 (24 Mi)
# 0.48-0.58x against 0.47-0.54x, 4096x4096 0.47-0.50x against 0.51-0.64x. Past 256 tokens they led
# only on the 224 Mi weights (384 tokens: 0.69-0.71x against 0.63x; 512: a tie).
SLICED_MAX_M = 256
SLICED_MIN_WEIGHTS = 1 << 25


def kernels_take(m: int, n: int, k: int, device: int) -> bool:
    """Whether ``launch_w4a16`` takes ``m`` tokens and an [n, k] weight on ``device`` (a GPU where
    ``_mma_ok``); else dequantize + cuBLAS."""
    return 0 < m and (m <= MMA_MAX_M or (m <= SLICED_MAX_M and n * k > SLICED_MIN_WEIGHTS and _wg_ok(device)))


def token_slices(m: int) -> list[tuple[int, int]]:
    """(first token, tokens) of the equal slices of at most MMA_MAX_M that ``launch_w4a16`` cuts
    ``m`` tokens into."""
    step = -(-m // -(-m // MMA_MAX_M))
    return [(t0, min(step, m - t0)) for t0 in range(0, m, step)]


def w4a16_paths(cc: tuple[int, int] | None, target: str = "") -> str:
    """Which kernels ``linear`` runs, by token count, on a GPU of compute capability ``cc`` compiled
    for ``target`` (what ``fp4cupy info`` prints)."""
    if cc is None:
        return "the CPU reference (exact, numpy or torch)"
    if tuple(cc) < MMA_MIN_CC:
        return "dequantize + cuBLAS (the W4A16 kernels need sm_75)"
    tiled = (f"tiled mma.sync {TILED_MIN_M}-{MMA_MAX_M} (from {TILED_SMALL_MIN_M} on weights of "
             f"<= {TILED_SMALL_WEIGHTS >> 20} Mi values)")
    sync = f"mma.sync 1-{TILED_MIN_M - 1} tokens, {tiled}, dequantize + cuBLAS above {MMA_MAX_M}"
    if tuple(cc) < FULL_MMA_CC:
        return f"fp16 x: {sync} (each MMA as two m16n8k8); bf16 x: dequantize + cuBLAS (no bf16 MMA before sm_80)"
    if target != "sm_90a":
        return sync
    return (f"mma.sync 1-{TILED_MIN_M - 1} tokens, warpgroup-MMA {WG_MID_M}-{MMA_MAX_M} on weights of > "
            f"{WG_MIN_WEIGHTS >> 20} Mi values (from {WG_MIN_M} on large weights), else {tiled}; "
            f"{MMA_MAX_M + 1}-{SLICED_MAX_M} in slices of warpgroup-MMA on weights of > {SLICED_MIN_WEIGHTS >> 20} "
            f"Mi values, else dequantize + cuBLAS above {MMA_MAX_M}")


def launch_w4a16(m: int, n: int, k: int, bf16: bool, device: int, stream: int, args: tuple, scratch) -> None:
    """Queue the W4A16 kernels for ``m`` tokens (where ``kernels_take``) on ``stream``. ``args``:
    the raw pointers (codes, scale codes, x, y, bias or 0, global scale). Past MMA_MAX_M tokens,
    equal slices of at most MMA_MAX_M, each queued as below (y's slices need not be 16-byte
    aligned: the kernels store y an element at a time). Where ``uses_warpgroup_kernel`` says yes,
    w4a16_wgmma.cu (``cuda_wgmma``); else where ``uses_tiled_kernel`` does, w4a16_tiled.cu
    (``cuda_tiled``); else one mma.sync launch from ``plan``. The scratch of the first two (the
    warpgroup kernel's reordered x and partial sums, ``WgPlan.workspace``; the tiled kernel's K
    splits' sums) comes from ``scratch(nbytes)`` -> (buffer, pointer), held until the launches are
    queued (the allocators reuse it in stream order, after them)."""
    if m > MMA_MAX_M:
        codes, scale_codes, x, y, bias, g = args
        for t0, tokens in token_slices(m):  # 2-byte x and y: token t starts at byte 2 t K of x, 2 t N of y
            launch_w4a16(tokens, n, k, bf16, device, stream,
                         (codes, scale_codes, x + 2 * t0 * k, y + 2 * t0 * n, bias, g), scratch)
    elif uses_warpgroup_kernel(m, n, k, device):
        cuda_wgmma.launch_wg(cuda_wgmma.wg_plan(n, k, m, bf16, device), m, n, k, stream, args, scratch)
    elif uses_tiled_kernel(m, n, k):
        cuda_tiled.launch_tiled(cuda_tiled.tiled_plan(n, k, m, bf16, device), m, n, k, stream, args, scratch)
    else:
        p = plan(n, k, m, bf16, device)
        p.launch(p.grid, p.threads, p.shared, stream, *args, m, n, k)


@functools.lru_cache(maxsize=None)
def _mma_ok(device: int, bf16: bool = False) -> bool:
    """Whether ``device`` runs the W4A16 kernels (mma.sync, tiled, grouped) for x of that dtype
    (bf16: sm_80+; fp16: sm_75+)."""
    cc = runtime.compute_capability(device)
    return cc is not None and cc >= (FULL_MMA_CC if bf16 else MMA_MIN_CC)


def linear_repacked(x, codes, scale_codes, global_scale, n: int, bias=None):
    """The host-lean W4A16 path for torch tensors, from the repacked weight alone (codes uint8
    [T/2, K/64, 2, 32, 16], scale codes, global scale float32 [] on the GPU): y, or None when a
    precondition fails (fp16/bf16 contiguous x on the weight's device, tokens that ``kernels_take``,
    bias of x's dtype and length N) and the caller must take another path. No tokens: an empty y.
    """
    t = _torch_names()
    half = t["half"]
    k = codes.shape[1] * 64
    dev = codes.get_device()
    shape = x.shape
    if (x.dtype not in half or shape[-1] != k or x.get_device() != dev or dev < 0 or not x.is_contiguous()
            or x.data_ptr() & 15 or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()
                                                           or bias.get_device() != dev or bias.numel() != n))):
        return None
    m = x.numel() // k
    y = _new_output(x, shape[:-1], n)
    if m == 0:
        return y  # no tokens: an empty y, as torch's F.linear gives
    if not _mma_ok(dev, x.dtype is half[1]) or not kernels_take(m, n, k, dev):
        return None
    args = (codes.data_ptr(), scale_codes.data_ptr(), x.data_ptr(), y.data_ptr(),
            0 if bias is None else bias.data_ptr(), global_scale.data_ptr())
    launch_w4a16(m, n, k, x.dtype is half[1], dev, _torch_stream_ptr(t["torch"], dev), args, _torch_scratch(x))
    return y


def _new_output(x, lead, n: int):
    """linear_repacked's y [*lead, n], uninitialized (the tests' poison fixture fills it)."""
    return x.new_empty(*lead, n)  # ints, not a torch.Size: ~1 us less


def _torch_scratch(like):
    """``launch_w4a16``'s scratch for torch: uint8 buffers on ``like``'s device."""
    def scratch(nbytes: int):
        buf = like.new_empty(nbytes, dtype=_torch_names()["u8"])
        return buf, buf.data_ptr()
    return scratch


def linear_torch(x, pw: PreparedWeight, bias=None):
    """``linear_repacked`` for a PreparedWeight of torch tensors."""
    return linear_repacked(x, pw.codes, pw.scale_codes, pw.global_scale, pw.weight.shape[0], bias)


def linear(x, pw: PreparedWeight, bias=None):
    """x [..., K] fp16/bf16 @ W^T (+ bias) on the GPU, in x's dtype (FP32 accumulation)."""
    lib = _Lib(x)
    w = pw.weight
    if lib.torch != arrays.is_torch(w.data):
        raise TypeError(f"linear: x ({arrays.library_of(x)}) and w ({w.library}) must come from one array library")
    n, k = w.shape
    dtype = arrays.dtype_name(x)
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    if (pw.path != "mma" or dtype not in ("float16", "bfloat16") or not _mma_ok(lib.device, dtype == "bfloat16")
            or not kernels_take(m, n, k, lib.device)):
        return _linear_dequantized(x, w, bias, lib)
    x2 = lib.contiguous_aligned(x.reshape(m, k))
    y = lib.empty((m, n), dtype)
    if bias is not None:
        bias = lib.cast(bias, dtype) if arrays.dtype_name(bias) != dtype else bias
        bias = bias.contiguous() if lib.torch else lib.mod.ascontiguousarray(bias)
    launch_w4a16(m, n, k, dtype == "bfloat16", lib.device, lib.stream.ptr, kernel_args(pw, x2, y, bias), lib.scratch)
    return y.reshape(lead + (n,))


def kernel_args(pw: PreparedWeight, x, y, bias=None) -> tuple:
    """``launch_w4a16``'s raw pointers (codes, scale codes, x, y, bias or 0, global scale) for a
    PreparedWeight and x, y (and bias) of its array library."""
    def ptr(a) -> int:
        return a.data_ptr() if arrays.is_torch(a) else a.data.ptr
    return (ptr(pw.codes), ptr(pw.scale_codes), ptr(x), ptr(y), 0 if bias is None else ptr(bias), ptr(pw.global_scale))


def _linear_dequantized(x, w: FP4Tensor, bias, lib: _Lib):
    dtype = arrays.dtype_name(x)
    wd = dequantize(w, dtype if dtype != "float64" else "float32")
    if lib.torch:
        return lib.mod.nn.functional.linear(x, wd.to(x.dtype), None if bias is None else bias.to(x.dtype))
    y = x @ wd.astype(x.dtype).T
    return y if bias is None else y + bias.astype(x.dtype)
