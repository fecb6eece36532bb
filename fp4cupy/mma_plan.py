"""Which launch of the mma.sync W4A16 kernels (kernels_cu/w4a16.cu) runs ``linear`` for an
[N, K] weight and M tokens on this GPU: the kernel variant (row tiles a block, token tiles,
chunks a pipeline step, most warps), its warps, how many blocks of a thread block cluster split
K, the grid.

``plan()`` reads the GPU's SM count and, from the driver, how many blocks of each kernel run at
once; the rules and the measurements behind each are in its docstring (H100 and H200,
benchmarks/split_sweep.py and w4a16_variants.py). cuda_linear.py launches what it returns.
"""
from __future__ import annotations

import functools

from . import runtime
from .cuda_ops import _sm_count

TILE_ROWS = 16
SHARED_LIMIT = 48 * 1024
_SIGNATURE = "PPPPPPiii"  # codes, scale codes, x, y, bias, g, m, n, k


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
# No K split at this many 64-wide chunks of K or fewer (K <= 5120) and M <= 16 once the one-tile
# blocks cover half the SMs: the split's cluster reduction then costs more than the work it evens out
# (H200, split_sweep.py: fitted at 64 on 1280-5120 rows x K 3584-4096, where the splits lost up to
# 11%; on 112 rows it had not seen, 1792-4864 x K 2048-4096, each pick it changed was the best
# launch, the former ones 2-22% slower. 80 from K = 5120 in that run, checked in another on 36
# other rows: 2.1% -> 0.15% off the best. At K = 6144 a bound of 96 lost 0.3%, at 8192 of 128, 23%).
SHORT_K_CHUNKS = 80


def _one_wave_launch(tiles: int, mtiles: int, k: int, two, one, bf16: bool, device: int):
    """(variant, S, warps) for a grid of at most 2 x SMs ``two``-tile blocks (``tiles`` row
    tiles of 16, ``mtiles`` token tiles); None where no launch qualifies (K under 8 chunks, or the
    driver cannot say what runs at once).

    The launches: the ``one``-tile kernel as 4 or 8 warps, K split over the S blocks of a cluster
    (S in 1 and SPLITS; 1 only before sm_90 or at short K, SHORT_K_CHUNKS), and the two-tile kernel
    as 4, 8 or 16 warps; each block 8 chunks of 64 or more, each warp two, and at most
    SHARED_LIMIT of partial sums. Of those whose blocks all run at once (a second wave cost
    1.3-1.6x; clusters hold fewer blocks than blocks a SM say: 77 clusters of 8 blocks of 4 warps,
    not 99), take the least work on the busiest SM (its blocks x row tiles a block / S: at
    4608-6144 rows three one-tile blocks a SM beat two two-tile ones by 8-27%), then the most warps
    in all, then the most blocks up to SPLIT_BLOCKS_PER_SM a SM, else the fewest.

    From benchmarks/split_sweep.py on an H200 (fp16 and bf16, K 4096-28672, M = 1 and 16 at
    512-8448 rows, M = 32 below 4224): 1.4% off the best launch in geomean below 4224 rows, at most
    12%; 0.7% at 4224-8192, at most 11%. The former rules: 8.6% and 9.6%, at most 58% and 27%; at
    8448 rows (2 x SMs two-tile blocks) they ran 8 warps a block at 9-16 tokens, 16 ran 7-17% faster."""
    chunks, sms = k // 64, _sm_count(device)
    cc = runtime.compute_capability(device)
    splits = SPLITS if cc is not None and cc >= (9, 0) else ()
    if chunks <= SHORT_K_CHUNKS and one[1] <= 2 and tiles >= sms // 2:
        splits = ()
    options = [(one, s, w) for s in (1, *splits) for w in (4, 8)]
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
