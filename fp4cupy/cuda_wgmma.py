"""The launches of kernels_cu/w4a16_wgmma.cu (sm_90a): token columns, grid, workspace and kernel
for a call that ``cuda_linear.uses_warpgroup_kernel`` sends there."""
from __future__ import annotations

import functools

from . import runtime
from .cuda_ops import _sm_count

# Token columns of its kernels (NT): the least NT >= M runs, since the kernel's time grows with
# NT whatever M is (H200: NT = M + 0..15 against NT = 64 / 128 was 2-17% faster at every M and
# shape measured, 28672x8192 M=65 103.8 -> 87.0 us). Keep in step with w4a16_wgmma.cu.
WG_TOKEN_TILES = (24, 32, 48, 64, 80, 96, 112, 128)
WG_SLOTS = 8              # chunk slots in shared memory, as in the kernel
WG_GROUPS = 4             # warpgroups a block: 256 rows of W share each chunk of x
WG_CLUSTER = 2            # blocks a cluster (multicast copies of x), as in the kernel
_WG_SIGNATURE = "PPPPPPPiiii"  # codes, scale codes, reordered x, y, ws, bias, g, m, n, k, chunks a split
_XPREP_SIGNATURE = "PPPqiii"  # x, reordered x, ws, ws words to zero, m, k, NT


class WgPlan:
    """The launches of w4a16_wgmma.cu: ``xprep`` reorders x (and zeroes the workspace's head),
    w4a16_wg{,sk,k2}_nt{NT} runs on grid (blocks, K splits). Stream-K (sk, chunks a split 0):
    clusters of WG_CLUSTER blocks share the (tile, pair of chunks) units evenly; a tile cut
    between clusters is finished by its first cluster from the others' partial sums. Split K:
    the blocks of a tile store their partial sums, then each adds up and stores a share of the
    tile (in split order). The workspace: a flag or counter a block column, then a slot of
    NT / 2 floats a thread, a block. Two splits (k2): the two blocks of 256 rows are a cluster
    and add their partial sums through distributed shared memory, with no workspace."""

    __slots__ = ("xprep", "launch", "grid", "threads", "shared", "cps", "nt", "name")

    def __init__(self, **kw):
        for key, value in kw.items():
            setattr(self, key, value)

    @property
    def split(self) -> bool:
        return self.grid[1] > 1

    @property
    def stream_k(self) -> bool:
        return self.cps == 0  # wg_grid's mark of a stream-K grid

    def workspace(self, n: int, m: int) -> tuple[int, int]:
        """(FP32 words of the workspace, how many of them xprep zeroes) for a call."""
        blocks, splits = self.grid
        one_tile_a_cluster = not self.split and (not self.stream_k or blocks == wg_tiles(n) * WG_CLUSTER)
        if one_tile_a_cluster or wg_loop(splits, self.cps) == "k2":
            return 0, 0  # y stored directly (two splits add up in shared memory)
        flags = (blocks + 3) & ~3
        return flags + blocks * splits * self.threads * self.nt // 2, flags

    def __repr__(self):
        return f"WgPlan({self.name}, grid={self.grid}, threads={self.threads}, shared={self.shared}, chunks a split={self.cps})"


def wg_tiles(n: int) -> int:
    """Tiles of w4a16_wgmma.cu: a cluster's rows, 64 * WG_GROUPS a block."""
    return -(-n // (64 * WG_GROUPS * WG_CLUSTER))


def wg_grid(n: int, k: int, sms: int, resident: int = 0) -> tuple[int, int, int]:
    """(blocks, K splits, chunks of 64 a split) for w4a16_wgmma.cu.
    ``resident``: clusters that run at once (0: unknown, then SMs / WG_CLUSTER). With at least
    half as many tiles as that, stream-K: one split, ``resident`` clusters (or one a pair of
    chunks, if fewer), each tile cut into at most 3 runs (chunks a split: 0). Else a cluster a
    tile and K split so that all blocks run at once (the splits of a tile wait for each other),
    at least 4 chunks and an even number a split (only the last split may end on an odd chunk).
    Two splits: a block a 256 rows (the two splits of a block are the cluster).
    On an H100 or H200 (132 SMs, 66 clusters): 28672 rows -> 132 blocks, stream-K; 14336 rows x
    K 4096 -> 56 blocks x 2 splits; 4096 rows x K 4096 -> 16 blocks x 8 splits of 8 chunks.
    (Stream-K over 28 tiles measured slower than 2 splits: 14336 x 4096, M=128 on an H200, 41.1
    against 38.9 us.)"""
    tiles, nchunks = wg_tiles(n), k // 64
    if resident and 2 * tiles >= resident:
        return WG_CLUSTER * min(resident, tiles * -(-nchunks // 2)), 1, 0
    blocks = tiles * WG_CLUSTER
    splits = max(1, min((resident * WG_CLUSTER or sms) // blocks, nchunks // 4))
    cps = -(-nchunks // splits)
    cps += cps & 1
    splits = -(-nchunks // cps)
    return (-(-n // (64 * WG_GROUPS)) if splits == 2 else blocks), splits, cps


def wg_shared(nt: int) -> int:
    """Dynamic shared memory of a w4a16_wgmma.cu block: x, weight and scale slots, mbarriers."""
    return WG_SLOTS * (nt * 128 + 128 * WG_GROUPS * 20) + 8 * WG_SLOTS


WG_LOOPS = ("", "sk", "k2")  # a tile a cluster or split K; stream-K; two K splits a cluster


def wg_loop(splits: int, cps: int) -> str:
    """The kernel loop of a wg_grid: stream-K (cps 0), two splits a cluster, or the plain loop."""
    return "sk" if cps == 0 else "k2" if splits == 2 else ""


def wg_kernel_name(nt: int, bf16: bool, loop: str = "") -> str:
    """w4a16_wg{loop}_nt{nt}_{f16,bf16}, ``loop`` one of WG_LOOPS."""
    if loop not in WG_LOOPS:
        raise ValueError(f"no warpgroup kernel loop {loop!r}; there are {WG_LOOPS}")
    return f"w4a16_wg{loop}_nt{nt}_{'bf16' if bf16 else 'f16'}"


def wg_kernel(nt: int, bf16: bool, loop: str, device: int):
    """The launcher of ``wg_kernel_name(nt, bf16, loop)``."""
    return runtime.launcher("w4a16_wgmma.cu", wg_kernel_name(nt, bf16, loop), device,
                            _WG_SIGNATURE).allow_shared(wg_shared(nt))


def wg_token_tile(m: int) -> int:
    """The kernel's token columns NT for ``m`` tokens: the least of WG_TOKEN_TILES that holds them."""
    return next(nt for nt in WG_TOKEN_TILES if nt >= m)


@functools.lru_cache(maxsize=4096)
def wg_plan(n: int, k: int, m: int, bf16: bool, device: int) -> WgPlan:
    """``wg_token_tile(m)`` token columns, the grid of ``wg_grid`` and its kernel."""
    nt = wg_token_tile(m)
    threads, shared = 128 * WG_GROUPS, wg_shared(nt)
    # stream-K's owners and split K's blocks wait for others: only with the whole grid running at once
    resident = wg_kernel(nt, bf16, "sk", device).max_active_clusters(WG_CLUSTER, threads, shared)
    blocks, splits, cps = wg_grid(n, k, _sm_count(device), resident)
    launch = wg_kernel(nt, bf16, wg_loop(splits, cps), device)
    xprep = runtime.launcher("w4a16_wgmma.cu", "w4a16_wg_xprep", device, _XPREP_SIGNATURE)
    return WgPlan(xprep=xprep, launch=launch, grid=(blocks, splits), threads=threads, shared=shared, cps=cps, nt=nt,
                  name=launch.name)


def launch_wg(p: WgPlan, m: int, n: int, k: int, stream: int, args: tuple, scratch) -> None:
    """Queue ``p``'s launches (xprep, then the main kernel); ``args`` and ``scratch`` as in
    ``launch_w4a16``."""
    codes, scale_codes, x, y, bias, g = args
    xp_buf, xp = scratch((k + 64) * p.nt * 2)  # + one zero chunk
    ws_words, ws_zeroed = p.workspace(n, m)
    ws_buf, ws = scratch(4 * ws_words) if ws_words else (None, 0)
    p.xprep(-(-(k // 64 + 1) * 8 * p.nt // 256), 256, 0, stream, x, xp, ws, ws_zeroed, m, k, p.nt)
    # programmatic dependents (sm_90): the main kernel copies its first weights while xprep ends
    p.launch.after(p.grid, p.threads, p.shared, stream, codes, scale_codes, xp, y, ws, bias, g, m, n, k, p.cps)


