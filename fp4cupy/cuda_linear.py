"""The W4A16 ``linear`` on the GPU (kernels_cu/w4a16.cu, w4a16_wgmma.cu); the FP4 x FP4 ``gemm``
is in cuda_gemm.py.

Up to 16 tokens, one launch of an mma.sync kernel chosen from ``plan()`` by (M bucket, N), K
split over thread block clusters for few-row weights on sm_90+; on sm_90a, the warpgroup-MMA
kernel (w4a16_wgmma.cu, ``cuda_wgmma``) from 33 tokens, and from 17 on large weights
(``uses_warpgroup_kernel``); elsewhere the mma.sync kernel up to ``MMA_MAX_M``. The weight must be
``prepare``d (repacked once, prepare.cu). Past ``MMA_MAX_M`` tokens, on GPUs older than sm_80, or
for weights the kernel does not take, W is dequantized and cuBLAS multiplies.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import arrays, cuda_wgmma, runtime
from .cuda_ops import THREADS, _Lib, _sm_count, _torch_names, _torch_stream_ptr, dequantize
from .prepared import PAIR, PreparedWeight
from .tensor import FP4Tensor

MMA_MAX_M = 128           # larger batches: dequantize + cuBLAS (see benchmarks/RESULTS.md)
MMA_MIN_CC = (8, 0)       # mma.m16n8k16
TILE_ROWS = 16
TILE_PAD = 4              # row tiles are allocated in multiples of the largest RT
SHARED_LIMIT = 48 * 1024
_SIGNATURE = "PPPPPPiii"  # codes, scale codes, x, y, bias, g, m, n, k


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
class Plan:
    """One launch configuration of the w4a16 kernel."""

    __slots__ = ("launch", "grid", "threads", "shared", "name")

    def __init__(self, launch, grid, threads, shared, name):
        self.launch, self.grid, self.threads, self.shared, self.name = launch, grid, threads, shared, name

    def __repr__(self):
        return f"Plan({self.name}, grid={self.grid}, threads={self.threads}, shared={self.shared})"


# (RT row tiles per block, NT token tiles, U chunks per pipeline step, most warps a block): the
# kernels in w4a16.cu. Those built for at most 4 warps run under a 72-register cap; the two-tile
# 9-16 token kernel under a 64-register cap (no spills: four blocks of 8 warps a SM).
NARROW = {1: (1, 1, 2, 4), 2: (1, 2, 1, 4)}  # NT -> the one-tile 4-warp kernel
NARROW_TWO = {(1, False): (2, 1, 1, 4)}  # (NT, bf16) -> the two-tile one
NARROW_BLOCKS_PER_SM = 7  # 4 warps at 72 registers
VARIANTS = ((1, 1, 2, 16), (1, 1, 4, 16), (2, 1, 2, 16), (4, 1, 1, 16), (1, 2, 2, 16), (2, 2, 1, 16), (4, 2, 1, 16),
            (1, 4, 1, 16), (2, 4, 1, 16), (1, 8, 1, 16), *NARROW.values(), *NARROW_TWO.values())


# NT -> (the two-tile kernel, the one-tile kernel) the plan weighs (at NT = 8 one kernel of one tile)
TWO_AND_ONE = {1: ((2, 1, 2, 16), (1, 1, 2, 16)), 2: ((2, 2, 1, 16), (1, 2, 2, 16)),
               4: ((2, 4, 1, 16), (1, 4, 1, 16)), 8: ((1, 8, 1, 16), (1, 8, 1, 16))}


def token_tiles(m: int) -> int:
    """NT, the token tiles of 8 a block of the mma.sync kernels for ``m`` tokens."""
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


# K split over clusters of S blocks (sm_90+): NT -> the one-tile kernel built for it, and the S built.
SPLIT_VARIANTS = {1: (1, 1, 2, 16), 2: (1, 2, 2, 16), 4: (1, 4, 1, 16)}
SPLITS = (2, 4, 8)


def kernel_name(rt: int, nt: int, u: int, max_warps: int, bf16: bool, splits: int = 1) -> str:
    return (f"w4a16_rt{rt}_nt{nt}_u{u}{f'_w{max_warps}' if max_warps < 16 else ''}{f'_s{splits}' if splits > 1 else ''}"
            f"_{'bf16' if bf16 else 'f16'}")


def make_plan(n: int, m: int, variant, warps: int, bf16: bool, device: int, splits: int = 1) -> Plan:
    """The launch of ``variant`` as ``warps`` warps a block, K split over clusters of ``splits``
    blocks (one of SPLITS, with SPLIT_VARIANTS' kernels) or not."""
    rt, nt, u, max_warps = variant
    if warps > max_warps:
        raise ValueError(f"variant {variant} runs at most {max_warps} warps a block, not {warps}")
    if splits > 1 and (splits not in SPLITS or SPLIT_VARIANTS.get(nt) != variant):
        raise ValueError(f"no kernel splits K over {splits} blocks for variant {variant}; split kernels: "
                         f"S in {SPLITS} for the variants {sorted(SPLIT_VARIANTS.values())}")
    name = kernel_name(rt, nt, u, max_warps, bf16, splits)
    launch = runtime.launcher("w4a16.cu", name, device, _SIGNATURE)
    grid = (-(-m // (8 * nt)) * splits, -(-(-(-n // TILE_ROWS)) // rt))
    per_warp = rt * nt * 512  # bytes of partial sums a warp; split K adds the block's own sums
    return Plan(launch, grid, 32 * warps, (warps + (splits > 1)) * per_warp, name)


@functools.lru_cache(maxsize=4096)
def plan(n: int, k: int, m: int, bf16: bool, device: int) -> Plan:
    """The kernel variant for (M bucket, N), from benchmarks/w4a16_variants.py on an H100 (and an
    H200 for the choices at M <= 8).

    NT token tiles of 8 (M <= 8, 16, 32, 64); two row tiles of 16 per block (x read half as often)
    unless that leaves fewer blocks than SMs, then one (a deeper pipeline for NT >= 2); 8 warps
    split K. Above 8 tokens, 16 warps when there are fewer than two blocks per SM. At M <= 8:
    - 4 warps when there are at least four blocks per SM (28672x8192: 51 vs 54 us on an H100), and
      never 16: the two-tile kernel's 109 registers fit one block of 16 warps a SM, so such grids
      ran in two waves (H200, 8 against 16 warps: 8192x8192 12.7 against 14.6 us, 6144x4096 7.7
      against 9.3, 8192x28672 36.3 against 37.1);
    - the single row tile takes U=2: with its buffers taking turns, U=4 needs 128 registers and was
      0-9% slower (H200);
    - where one-tile blocks of 4 warps (72 registers, seven a SM) fill 90-100% of one wave, they run
      (H200: 14336x4096 12.0 against 13.1 us, 13824x5120 14.3 against 15.3; at 11008 or 16384 rows
      the wave is fuller with two-tile blocks, and bf16 lost there);
    - else, where one-tile blocks leave the busiest SM a row tile less than two-tile ones
      (ceil(T / SMs) odd, below LESS_WORK_MAX_TILES), the one-tile kernel as 4 warps, uncapped or
      NARROW's, whichever runs the busiest SM's blocks in fewer rounds, then the fuller last round
      (``_one_tile_rounds``; H200, M=1: bf16 18944x4096 15.3 against 16.7 us, fp16 22016x8192
      28.9 against 30.5);
    - else, where the two-tile blocks of 8 warps take more than one wave but the uncapped one-tile
      kernel as 4 warps fits in one (``_blocks_per_sm``: six a SM in fp16, five in bf16), it runs
      (H200, M=1: 10240x4096 8.9 against 11.0 us, 12288x4096 10.4 against 11.4, 9216x14336 24.4
      against 27.6; bf16 10240x4096 9.8 against 11.9; where it would take a second wave, bf16
      11008x8192, it lost 16%).
    At 9-16 tokens, likewise the one-tile blocks of 4 warps where they fill 90-100% of one wave
    (H200, N of 13312-14784: fp16 2-5% faster, 14336x4096 14.5 against 15.4 us; bf16 8-10%, 15.6
    against 16.9; at 12288 or 15360 rows they lost).
    Two-tile blocks of 4 warps at 72 registers (seven a SM, one chunk a step, ``NARROW_TWO``) run
    where their waves come out fuller than the plan's two-tile grid's: fp16 at M <= 8 (H200, 34
    rows of 17408-57344 rows at M=1 and 8, all as predicted: up to 11% faster where taken,
    28672x8192 36.5 against 37.2 us; 13-16% slower where not, 32768 rows). bf16 measured equal.
    (bf16 at 9-16 tokens took them too until the tile pairs let its 8-warp two-tile kernel run
    unspilled: since then that kernel is 2-6% faster at 22016-57344 rows, three runs, H200.)
    Where two-tile blocks are at most 2 x SMs (N up to 64 rows a SM; below 32 at 17-32 tokens),
    ``_one_wave_launch`` picks the kernel, its warps and, on sm_90+, how many blocks of a cluster
    split K (H200, against the former rules: up to 1.55x faster, M=1 512x28672 10.8 -> 7.2 us,
    M=16 2560x4096 9.5 -> 6.4, M=1 6144x4096 7.3 -> 6.1, 5120x28672 33.1 -> 26.4; M=16 6144x4096
    bf16 9.5 -> 8.3).
    """
    nt = token_tiles(m)
    sms = _sm_count(device)
    tiles = -(-n // TILE_ROWS)
    mtiles = -(-m // (8 * nt))
    two, one = TWO_AND_ONE[nt]
    blocks = -(-tiles // two[0]) * mtiles
    measured = blocks <= 2 * sms if nt <= 2 else blocks < sms  # split_sweep.py's range (17-32 tokens: few rows)
    launch = None
    if measured and SPLIT_VARIANTS.get(nt) == one:
        launch = _one_wave_launch(tiles, mtiles, k, two, one, bf16, device)
    if launch is not None:
        variant, splits, warps = launch
        if splits > 1:
            return make_plan(n, m, variant, warps, bf16, device, splits)
    elif blocks < sms:
        variant, warps = one, 8
    elif nt <= 2 and 0.9 <= tiles / (NARROW_BLOCKS_PER_SM * sms) <= 1:
        variant, warps = NARROW[nt], 4  # one wave, at least 90% full
    elif (nt == 1 and -(-tiles // sms) < min(2 * -(-blocks // sms), LESS_WORK_MAX_TILES)
          and (fewer := _one_tile_rounds(tiles, one, bf16, device))):
        variant, warps = fewer, 4  # one-tile blocks leave the busiest SM a tile less
    elif (nt == 1 and blocks > _blocks_per_sm(two, 8, bf16, device) * sms
          and tiles <= _blocks_per_sm(one, 4, bf16, device) * sms):
        variant, warps = one, 4  # one wave instead of more than one
    else:
        variant, warps = two, (4 if blocks >= 4 * sms else 8) if nt == 1 else 16 if blocks < 2 * sms else 8
        narrow = NARROW_TWO.get((nt, bf16))
        resident = _blocks_per_sm(two, warps, bf16, device) * sms if narrow else 0
        if resident and _last_wave_fill(blocks, NARROW_BLOCKS_PER_SM * sms) > _last_wave_fill(blocks, resident):
            variant, warps = narrow, 4  # its waves are fuller than the two-tile grid's
    warps = max(1, min(warps, (k // 64) // 2 or 1, SHARED_LIMIT // (variant[0] * nt * 512)))
    return make_plan(n, m, variant, warps, bf16, device)


# One-tile blocks where they leave the busiest SM fewer row tiles than two-tile blocks (ceil(T / SMs)
# odd) and fewer than this many: a tile saved of q + 1 outweighs the two-tile kernel's 2-5% better
# rate up to q = 23 (H200: q = 27 lost 2-5%).
LESS_WORK_MAX_TILES = 24


def _one_tile_rounds(tiles: int, one, bf16: bool, device: int):
    """Of the one-tile kernel as 4 warps (``one``, uncapped) and the capped NARROW[1] kernel, the
    one whose blocks on the busiest SM (ceil(tiles / SMs) of them) run in the fewest rounds, then
    the fuller last round; None if the driver cannot say how many run at once."""
    q = -(-tiles // _sm_count(device))
    ranked = []
    for variant in (one, NARROW[1]):
        per_sm = _blocks_per_sm(variant, 4, bf16, device)
        if not per_sm:
            return None
        rounds = -(-q // per_sm)
        last = q - (rounds - 1) * per_sm
        ranked.append(((rounds, -last / per_sm), variant))
    return min(ranked)[1]


SPLIT_BLOCKS_PER_SM = 3  # ties take the most blocks up to this many a SM, else the fewest


def _one_wave_launch(tiles: int, mtiles: int, k: int, two, one, bf16: bool, device: int):
    """(variant, S, warps) for a grid of at most 2 x SMs ``two``-tile blocks (``tiles`` row
    tiles of 16, ``mtiles`` token tiles); None where no launch qualifies (K under 8 chunks, or the
    driver cannot say what runs at once).

    The launches: the ``one``-tile kernel as 4 or 8 warps, K split over the S blocks of a cluster
    (S in 1 and SPLITS; 1 only before sm_90), and the two-tile kernel as 4, 8 or 16 warps; each
    block 8 chunks of 64 or more, each warp two, and at most SHARED_LIMIT of partial sums. Of those
    whose blocks all run at once (a second wave cost 1.3-1.6x; clusters hold fewer blocks than
    blocks a SM say: 77 clusters of 8 blocks of 4 warps, not 99), take the least work on the
    busiest SM (its blocks x row tiles a block / S: at 4608-6144 rows three one-tile blocks a SM
    beat two two-tile ones by 8-27%), then the most warps in all, then the most blocks up to
    SPLIT_BLOCKS_PER_SM a SM, else the fewest.

    From benchmarks/split_sweep.py on an H200 (fp16 and bf16, K 4096-28672, M = 1 and 16 at
    512-8448 rows, M = 32 below 4224): 1.4% off the best launch in geomean below 4224 rows, at most
    12%; 0.7% at 4224-8192, at most 11%. The former rules: 8.6% and 9.6%, at most 58% and 27%; at
    8448 rows (2 x SMs two-tile blocks) they ran 8 warps a block at 9-16 tokens, 16 ran 7-17% faster."""
    chunks, sms = k // 64, _sm_count(device)
    cc = runtime.compute_capability(device)
    options = [(one, s, w) for s in ((1, *SPLITS) if cc is not None and cc >= (9, 0) else (1,)) for w in (4, 8)]
    ranked = []
    for variant, s, w in options + [(two, 1, w) for w in (4, 8, 16)]:
        blocks = -(-tiles // variant[0]) * mtiles * s
        shared = (w + (s > 1)) * variant[0] * variant[1] * 512
        if (chunks // s >= max(2 * w, 8) and shared <= SHARED_LIMIT
                and blocks <= _resident_blocks(variant, w, s, bf16, device)):
            busiest = -(-blocks // sms) * variant[0] * SPLITS[-1] // s  # in 1/8ths of a tile's K
            crowded = blocks > SPLIT_BLOCKS_PER_SM * sms
            ranked.append(((busiest, -blocks * w, crowded, blocks if crowded else -blocks), (variant, s, w)))
    return min(ranked)[1] if ranked else None


@functools.lru_cache(maxsize=None)
def _resident_blocks(variant, warps: int, splits: int, bf16: bool, device: int) -> int:
    """Blocks of ``variant`` as ``warps`` warps, K split over clusters of ``splits``, that run at
    once on the whole device: blocks a SM x SMs, or the driver's resident clusters x ``splits``
    (cuOccupancyMaxActiveClusters; a cluster's blocks share one GPC); 0 if unknown."""
    if splits == 1:
        return _blocks_per_sm(variant, warps, bf16, device) * _sm_count(device)
    p = make_plan(16, 1, variant, warps, bf16, device, splits)
    return p.launch.max_active_clusters(splits, p.threads, p.shared) * splits


def _last_wave_fill(blocks: int, per_wave: int) -> float:
    """How full the waves of ``blocks`` blocks run, ``per_wave`` at once: 1.0 when they come out even."""
    return blocks / (-(-blocks // per_wave) * per_wave)


@functools.lru_cache(maxsize=None)
def _blocks_per_sm(variant, warps: int, bf16: bool, device: int) -> int:
    """Blocks of ``variant`` as ``warps`` warps (one token tile) that run at once on one SM, from
    the driver (registers and warps decide: the two-tile M <= 8 kernel has ~109 registers, two
    blocks of 8 warps a SM; the one-tile kernel ~80, six blocks of 4 warps in fp16); 0 if unknown."""
    p = make_plan(16, 1, variant, warps, bf16, device)
    return p.launch.max_active_blocks(p.threads, p.shared)


# The warpgroup-MMA kernel (w4a16_wgmma.cu, sm_90a) for WG_MIN_M..MMA_MAX_M tokens: from
# WG_ANY_WEIGHT_M for every weight; from WG_MIN_M for weights of more than WG_MIN_WEIGHTS values,
# but twice that where plan()'s one-tile grid runs 1.5-2 blocks a SM (N of 24-32 rows a SM). H200,
# 17-32 tokens, warpgroup time over mma.sync time (benchmarks/RESULTS.md, session 13): 0.38-0.97
# on 19 of the 24 shapes the rule gives it (1024x32768 0.38, 5120x13824 0.65, 5120x4096 0.82,
# 28672x8192 0.83), 0.97-1.06 on five (14336x4096, 13824x5120, 8192x3072, 12288x2048, 16384x2048);
# 1.02-1.21 on the five where it keeps mma.sync (4096 rows, K 4096-8192).
WG_MIN_M = 17
WG_ANY_WEIGHT_M = 33
WG_MIN_WEIGHTS = 1 << 24


@functools.lru_cache(maxsize=None)
def _wg_ok(device: int) -> bool:
    cc = runtime.compute_capability(device)
    return cc is not None and runtime.target_for(cc) == "sm_90a"


def uses_warpgroup_kernel(m: int, n: int, k: int, device: int) -> bool:
    """Whether ``launch_w4a16`` takes w4a16_wgmma.cu for ``m`` tokens and an [n, k] weight on ``device``."""
    if m < WG_MIN_M or not _wg_ok(device):
        return False
    if m >= WG_ANY_WEIGHT_M:
        return True
    if n * k <= WG_MIN_WEIGHTS:
        return False
    sms = _sm_count(device)  # plan()'s one-tile grid at 1.5-2 blocks a SM holds its own up to 2x the weights
    return n * k > 2 * WG_MIN_WEIGHTS or not 24 * sms <= n < 2 * TILE_ROWS * sms


def launch_w4a16(m: int, n: int, k: int, bf16: bool, device: int, stream: int, args: tuple, scratch) -> None:
    """Queue the W4A16 kernels for ``m`` (1..MMA_MAX_M) tokens on ``stream``. ``args``: the raw
    pointers (codes, scale codes, x, y, bias or 0, global scale). Where ``uses_warpgroup_kernel``
    says no, one mma.sync launch from ``plan``; else w4a16_wgmma.cu (``cuda_wgmma``), whose scratch
    (the reordered x, and the partial sums of split K or of stream-K's cut tiles,
    ``WgPlan.workspace``) comes from ``scratch(nbytes)`` -> (buffer, pointer), held until the
    launches are queued (the allocators reuse it in stream order, after them)."""
    if not uses_warpgroup_kernel(m, n, k, device):
        p = plan(n, k, m, bf16, device)
        p.launch(p.grid, p.threads, p.shared, stream, *args, m, n, k)
        return
    cuda_wgmma.launch_wg(cuda_wgmma.wg_plan(n, k, m, bf16, device), m, n, k, stream, args, scratch)


@functools.lru_cache(maxsize=None)
def _mma_ok(device: int) -> bool:
    cc = runtime.compute_capability(device)
    return cc is not None and cc >= MMA_MIN_CC


def linear_repacked(x, codes, scale_codes, global_scale, n: int, bias=None):
    """The host-lean W4A16 path for torch tensors, from the repacked weight alone (codes uint8
    [T/2, K/64, 2, 32, 16], scale codes, global scale float32 [] on the GPU): y, or None when a
    precondition fails (fp16/bf16 contiguous x on the weight's device, at most MMA_MAX_M tokens,
    bias of x's dtype and length N) and the caller must take another path."""
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
    if not 0 < m <= MMA_MAX_M or not _mma_ok(dev):
        return None
    y = x.new_empty(*shape[:-1], n)  # ints, not a torch.Size: ~1 us less
    args = (codes.data_ptr(), scale_codes.data_ptr(), x.data_ptr(), y.data_ptr(),
            0 if bias is None else bias.data_ptr(), global_scale.data_ptr())
    launch_w4a16(m, n, k, x.dtype is half[1], dev, _torch_stream_ptr(t["torch"], dev), args, _torch_scratch(x))
    return y


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
    if pw.path != "mma" or dtype not in ("float16", "bfloat16") or m > MMA_MAX_M or m == 0 or not _mma_ok(lib.device):
        return _linear_dequantized(x, w, bias, lib)
    x2 = lib.contiguous_aligned(x.reshape(m, k))
    y = lib.empty((m, n), dtype)
    if bias is not None:
        bias = lib.cast(bias, dtype) if arrays.dtype_name(bias) != dtype else bias
        bias = bias.contiguous() if lib.torch else lib.mod.ascontiguousarray(bias)
    args = (lib.ptr(pw.codes), lib.ptr(pw.scale_codes), lib.ptr(x2), lib.ptr(y), 0 if bias is None else lib.ptr(bias),
            lib.ptr(pw.global_scale))
    launch_w4a16(m, n, k, dtype == "bfloat16", lib.device, lib.stream.ptr, args, lib.scratch)
    return y.reshape(lead + (n,))


def _linear_dequantized(x, w: FP4Tensor, bias, lib: _Lib):
    dtype = arrays.dtype_name(x)
    wd = dequantize(w, dtype if dtype != "float64" else "float32")
    if lib.torch:
        return lib.mod.nn.functional.linear(x, wd.to(x.dtype), None if bias is None else bias.to(x.dtype))
    y = x @ wd.astype(x.dtype).T
    return y if bias is None else y + bias.astype(x.dtype)
