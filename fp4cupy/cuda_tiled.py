"""The launches of kernels_cu/w4a16_tiled.cu: W4A16 for 33-128 tokens where the warpgroup kernel is
not taken (Ampere, Ada, Blackwell; small weights on Hopper; fp16 x on Turing). A block is 8 warps
over 256 weight rows and 64 tokens; each chunk of x and of the block's weights is staged in shared
memory once for all its warps; K is split over blocks (their FP32 sums added in split order by a
second kernel, a programmatic dependent on sm_90+) where the grid would leave SMs idle."""
from __future__ import annotations

import functools

from . import runtime
from .cuda_ops import _sm_count

TILED_ROWS, TILED_TOKENS = 256, 64  # a block's tile: keep in step with w4a16_tiled.cu
TILED_THREADS = 256
TILED_STAGES = 3                    # chunks in a block's ring, as in the kernel
TILED_SHARED = TILED_STAGES * (TILED_TOKENS * 128 + TILED_ROWS // 16 * (512 + 64))  # x, codes, scale codes
MIN_CHUNKS_A_SPLIT = 8              # chunks of 64 a K split, or 4 where a block a SM at most runs
_SIGNATURE = "PPPPPPPiiii"          # codes, scale codes, x, y, ws, bias, g, m, n, k, chunks a split
_FINISH_SIGNATURE = "PPPPiii"       # ws, y, bias, g, m, n, splits


class TiledPlan:
    """One call's launches: ``launch`` on ``grid`` (token tiles x splits, row blocks), and with
    more than one split ``finish``, which adds the splits' sums from the FP32 workspace."""

    __slots__ = ("launch", "finish", "grid", "splits", "cps", "name")

    def __init__(self, **kw):
        for key, value in kw.items():
            setattr(self, key, value)

    def __repr__(self):
        return f"TiledPlan({self.name}, grid={self.grid}, splits={self.splits}, chunks a split={self.cps})"


def tiled_splits(blocks: int, nchunks: int, resident: int, sms: int) -> tuple[int, int]:
    """(splits, chunks a split): the most splits, a power of two, that keep the grid within the
    blocks that run at once (``resident``) with MIN_CHUNKS_A_SPLIT chunks a split or more, or
    within one block a SM with half that. H200, fp16, S in 1-16 timed on eight shapes at 33-128
    tokens (RESULTS.md, session 20): 1.4% off the best S in geomean, at most 7% (the first clause
    alone: 3.1%, at most 27%); the second takes 2048x4096 at 33-64 tokens from 8 splits to 16
    (12.6 -> 9.9 us). 3, 6 and 12 splits were slower than the better power of two beside them in
    all 60 cases."""
    most = max(1, min(resident // blocks, nchunks // MIN_CHUNKS_A_SPLIT),
               min(sms // blocks, nchunks // (MIN_CHUNKS_A_SPLIT // 2)))
    cps = -(-nchunks // (1 << (most.bit_length() - 1)))
    return -(-nchunks // cps), cps


def kernel_name(bf16: bool) -> str:
    return f"w4a16_tiled_{'bf16' if bf16 else 'f16'}"


def finish_kernel_name(bf16: bool) -> str:
    return f"w4a16_tiled_finish_{'bf16' if bf16 else 'f16'}"


@functools.lru_cache(maxsize=4096)
def tiled_plan(n: int, k: int, m: int, bf16: bool, device: int) -> TiledPlan:
    """The launches for (n, k, m): row blocks x token tiles, with the K splits of ``tiled_splits``
    at the blocks a SM the driver reports (two on an H200, H100 or A100)."""
    launch = runtime.launcher("w4a16_tiled.cu", kernel_name(bf16), device, _SIGNATURE).allow_shared(TILED_SHARED)
    row_blocks, token_tiles = -(-n // TILED_ROWS), -(-m // TILED_TOKENS)
    sms = _sm_count(device)
    resident = (launch.max_active_blocks(TILED_THREADS, TILED_SHARED) or 1) * sms
    splits, cps = tiled_splits(row_blocks * token_tiles, k // 64, resident, sms)
    finish = runtime.launcher("w4a16_tiled.cu", finish_kernel_name(bf16), device, _FINISH_SIGNATURE)
    return TiledPlan(launch=launch, finish=finish, grid=(token_tiles * splits, row_blocks), splits=splits, cps=cps,
                     name=launch.name)


def launch_tiled(p: TiledPlan, m: int, n: int, k: int, stream: int, args: tuple, scratch) -> None:
    """Queue ``p``'s launches; ``args`` (codes, scale codes, x, y, bias, g) and ``scratch`` as in
    ``cuda_linear.launch_w4a16``."""
    codes, scale_codes, x, y, bias, g = args
    ws_buf, ws = scratch(4 * p.splits * m * n) if p.splits > 1 else (None, 0)
    p.launch(p.grid, TILED_THREADS, TILED_SHARED, stream, codes, scale_codes, x, y, ws, bias, g, m, n, k, p.cps)
    if p.splits > 1:
        # a programmatic dependent (sm_90+): scheduled as the main kernel's blocks end, it waits for their sums
        p.finish.after(min(-(-m * n // 256), 4096), 256, 0, stream, ws, y, bias, g, m, n, p.splits)
