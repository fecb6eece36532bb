"""Every expert of a MoE block in one W4A16 launch (kernels_cu/w4a16.cu ``w4a16_grouped_*``,
w4a16_tiled.cu ``w4a16_tiled_grouped_*``, w4a16_wgmma_grouped.cu ``w4a16_wgg_*`` on sm_90a).

x's rows sorted by expert; expert e's rows ``offsets[e] .. offsets[e + 1] - 1`` are multiplied by
expert e's repacked weight (``expert_table``), FP32 accumulation on the tensor cores, y in x's
dtype: the same arithmetic as ``linear`` on each expert's rows. Few rows an expert: the mma.sync
kernel, a block one 16-row tile and 8 * NT rows a pass, its warps splitting K; more (a pass of
TILED_MIN_PASS or more): the tiled kernel, a block 256 weight rows and 64 rows of x a pass, staged
in shared memory (sm_80+; on sm_75 fp16 only, the tiled kernel copying through registers). The
host reads no count back: the grid is (pass_blocks, row tiles, experts), the pass_blocks blocks
of an expert and row tile sharing its rows a pass each, then the next (any number of rows, no
count needed); or (1, row tiles, rows) when x has fewer rows than there are experts. So there is
no sync, and a CUDA graph can hold the call. Rows of experts >= E (expert parallelism's "not
here") are neither read nor written. On sm_90a, from WG_MIN_PASS rows an expert
(``expected_rows``): the warpgroup-MMA kernel, each expert's rows cut into tiles of at most 32,
64, 96 or 128 (``expert_tiles``, on the GPU: no count to the host either), a grid row a tile, its
x reordered once as ``linear``'s warpgroup kernel reads it.

``route`` (kernels_cu/moe_route.cu) sorts a block's (token, slot) pairs into those rows and
``combine`` adds each token's weighted rows back, each one launch.
"""
from __future__ import annotations

import functools
import math

from . import cuda_linear
from .cuda_ops import _torch_names, _torch_stream_ptr
from .cuda_tiled import TILED_ROWS, TILED_SHARED, TILED_THREADS, TILED_TOKENS
from .cuda_wgmma import WG_CLUSTER, WG_GROUPS, wg_shared, wg_tiles
from .mma_plan import TILE_ROWS, token_tiles
from .runtime import launcher

WARPS = 4  # warps a block of w4a16.cu's grouped kernels (NT = 1, 2, 4 token tiles a pass; 64 rows: tiled)
TILED_MIN_PASS = 33  # pass widths (pass_tokens) from which the tiled kernel runs
_SIGNATURE = "PPPPPiiii"  # table, expert of row, offsets, x, y, experts, by_row, n, k
ROUTE_THREADS = 1024
MAX_GRID_Y = 65535
WG_GROUPED_TILES = (32, 64, 96, 128)  # rows a tile of w4a16_wgmma_grouped.cu's kernels (NT)
# Expected rows an expert (expected_rows) from which sm_90a takes the warpgroup kernel. H200, bf16,
# its time over w4a16.cu's / w4a16_tiled.cu's (scratch A/B, session 25), Mixtral-8x7B and
# Qwen3-30B-A3B: 0.70 / 0.77 at 8 rows, 0.89 / 0.86 at 14, 1.32 / 1.39 at 19-24, 1.25 / 1.00 at 44,
# 1.67 / 1.15 at 80, 1.46 / 1.13 at 151, 1.56 at 288, 1.76 at 1615-2139.
WG_MIN_PASS = 17
_WG_SIGNATURE = "PPPPPii"  # table, tiles, expert of row, reordered x, y, n, k


def expert_table(layers, dtype, reuse=None):
    """(table int64 [E, 4] on the layers' GPU: each layer's codes, scale codes, global scale and
    bias (0 for none) pointers, the tensors it points at, the pointers as a host list) for
    NVFP4Linear ``layers`` held as the W4A16 repack on a GPU that runs the mma.sync kernels for
    ``dtype`` (``cuda_linear._mma_ok``: sm_75 for fp16, sm_80 for bf16), with biases (if any) of
    ``dtype``; else None (the caller loops instead). The second element keeps the tensors alive as
    long as the table. ``reuse``: a table returned before, returned again where every pointer is the
    same (no upload, so a CUDA graph capture can ask again)."""
    torch = _torch_names()["torch"]
    device = layers[0].codes.device if layers[0].codes is not None else None
    if device is None or not all(_held(layer, device, dtype) for layer in layers):
        return None
    if not cuda_linear._mma_ok(device.index, dtype == torch.bfloat16):  # fp16 from sm_75, bf16 from sm_80
        return None
    rows, held = [], []
    for layer in layers:
        g = layer.kernel_global_scale if layer.kernel_global_scale is not None else layer.weight_global_scale
        held += [layer.codes, layer.scale_codes, g] + ([layer.bias] if layer.bias is not None else [])
        rows.append([layer.codes.data_ptr(), layer.scale_codes.data_ptr(), g.data_ptr(),
                     0 if layer.bias is None else layer.bias.data_ptr()])
    if reuse is not None and reuse[2] == rows and reuse[0].device == device:
        return reuse
    return torch.tensor(rows, dtype=torch.int64).to(device), held, rows


def _held(layer, device, dtype) -> bool:
    """Whether ``layer`` is held as the repack on ``device``, its bias (if any) contiguous, of ``dtype``."""
    bias = layer.bias
    return (layer.codes is not None and layer.codes.device == device
            and (bias is None or (bias.dtype == dtype and bias.is_contiguous())))


def expected_rows(tokens: int, rows: int, experts: int) -> int:
    """The rows of a busy expert for ``rows`` rows of ``tokens`` tokens over ``experts`` experts:
    past the mean by two standard deviations (uniform routing), at most ``tokens`` (an expert's
    most rows when each token picks distinct experts), at least 1."""
    mean = rows / max(experts, 1)
    return max(1, min(tokens, math.ceil(mean + 2 * math.sqrt(mean))))


def pass_tokens(tokens: int, rows: int, experts: int) -> int:
    """Tokens a block of w4a16.cu's or w4a16_tiled.cu's grouped kernels multiplies in one pass
    (8 * NT): ``expected_rows``, at most 64. An expert with more rows takes more passes, each
    reading its weight again."""
    return 8 * token_tiles(min(64, expected_rows(tokens, rows, experts)))


def wg_tile_rows(tokens: int, rows: int, experts: int, device: int) -> int:
    """Rows a tile of the grouped warpgroup kernel (one of WG_GROUPED_TILES) where it takes the
    call: sm_90a, WG_MIN_PASS or more ``expected_rows``; else 0."""
    expected = expected_rows(tokens, rows, experts)
    if expected < WG_MIN_PASS or not cuda_linear._wg_ok(device):
        return 0
    return next((nt for nt in WG_GROUPED_TILES if nt >= expected), WG_GROUPED_TILES[-1])


def pass_blocks(tokens: int, rows: int, experts: int, width: int) -> int:
    """Blocks that share an expert's rows (grid x), each ``width`` rows of every x * width. One where
    the mean rows an expert fit a pass; else enough for twice the mean (more rows take more passes),
    at most an expert's most rows (``tokens``); blocks whose expert has fewer rows return at once.
    H200, bf16, side by side against one block (scratch A/B, session 24): 1.04-1.14x from 64 rows
    an expert on average (Mixtral-8x7B, Qwen3-30B-A3B, up to 1024 rows), 0.95-0.99x below."""
    mean = rows / max(experts, 1)
    if mean < width:
        return 1
    return math.ceil(min(tokens, 2 * mean + width) / width)


def route(index, experts: int):
    """(expert_of_row int64 [S], token_of_row int64 [S], offsets int32 [E + 1], row_of_slot int32
    [S]) for ``index`` int64 [T, k] on the GPU, S = T k slots, slot s = token s // k's (s % k)-th
    expert: the slots as rows sorted by expert (within an expert in no set order), expert e's rows
    from offsets[e], and offsets[E] the rows of experts here (index values >= E: another rank's,
    after them). One launch, no sync."""
    t = _torch_names()
    slots, k = index.numel(), index.shape[-1]
    longs = index.new_empty(2 * slots)
    ints = index.new_empty(experts + 1 + slots, dtype=t["torch"].int32)
    dev = index.get_device()
    launcher("moe_route.cu", "moe_route", dev, "PiiiPPPP")(
        1, ROUTE_THREADS, 4 * (experts + 1 + ROUTE_THREADS), _torch_stream_ptr(t["torch"], dev), index.data_ptr(),
        slots, k, experts, longs.data_ptr(), longs.data_ptr() + 8 * slots, ints.data_ptr(),
        ints.data_ptr() + 4 * (experts + 1))
    return longs[:slots], longs[slots:], ints[:experts + 1], ints[experts + 1:]


def expert_tiles(offsets, nt: int, capacity: int):
    """int32 [capacity, 2] on the GPU: (first row, rows) of each tile of at most ``nt`` rows of an
    expert's rows (``offsets`` int32 [E + 1] from ``route``), expert by expert, then (0, 0); the
    tiles fit where ``capacity`` >= rows / nt + E. One launch, no sync."""
    t = _torch_names()
    experts = offsets.shape[0] - 1
    tiles = offsets.new_empty((capacity, 2))
    dev = offsets.get_device()
    launcher("moe_route.cu", "moe_tiles", dev, "PiiiP")(
        1, ROUTE_THREADS, 4 * (experts + 1 + ROUTE_THREADS), _torch_stream_ptr(t["torch"], dev), offsets.data_ptr(),
        experts, nt, capacity, tiles.data_ptr())
    return tiles


def combine(h, row_of_slot, index, weights, experts: int):
    """out [T, H] in h's dtype: out[t] = sum over j of round(h[row_of_slot[t k + j]] * weights[t, j])
    in float32, in slot order, rounded once; slots whose index is >= ``experts`` are skipped. h [S, H]
    fp16/bf16 rows (``route``'s order), index int64 [T, k], weights [T, k]. One launch."""
    t = _torch_names()
    torch = t["torch"]
    tokens, k = weights.shape
    hidden = h.shape[1]
    if weights.dtype not in (torch.float32, h.dtype):
        weights = weights.float()
    weights, h = weights.contiguous(), h.contiguous()
    out = cuda_linear._new_output(h, (tokens,), hidden)
    sfx = t["suffix"]
    dev = h.get_device()
    launcher("moe_route.cu", f"moe_combine_{sfx[h.dtype]}_{sfx[weights.dtype]}", dev, "PPPPPiiii")(
        max(1, min(-(-tokens * hidden // 256), 8192)), 256, 0, _torch_stream_ptr(torch, dev), h.data_ptr(),
        row_of_slot.data_ptr(), index.data_ptr(), weights.data_ptr(), out.data_ptr(), tokens, k, hidden, experts)
    return out


def grouped_linear(x, table, expert_of_row, offsets, n: int, tokens: int):
    """y [rows, n] = each row of x [rows, K] (fp16/bf16, contiguous, sorted by expert) @ its expert's
    W^T * g (+ bias). ``expert_of_row`` int64 [rows] (sorted), ``offsets`` int32 [E + 1] (expert e's
    first row; rows from offsets[E] on belong to no expert here and are left unwritten),
    ``tokens``: the call's tokens (an expert's most rows, which picks the pass width)."""
    t = _torch_names()
    rows, k = x.shape
    experts = table.shape[0]
    y = cuda_linear._new_output(x, (rows,), n)
    if rows == 0:
        return y
    sfx = "bf16" if x.dtype is t["half"][1] else "f16"
    dev = x.get_device()
    nt = wg_tile_rows(tokens, rows, experts, dev)
    capacity = rows // nt + experts if nt else 0  # the most tiles of nt rows an expert the rows can make
    if 0 < capacity <= MAX_GRID_Y:  # a grid row a tile
        _grouped_wg(x, y, table, expert_of_row, offsets, n, nt, capacity, sfx, dev)
        return y
    width = pass_tokens(tokens, rows, experts)
    if width >= TILED_MIN_PASS:
        launch, threads, shared, tile = _tiled_launcher(sfx, dev), TILED_THREADS, TILED_SHARED, TILED_ROWS
        width = TILED_TOKENS  # the tiled kernel's pass
    else:
        nt = token_tiles(width)
        launch = launcher("w4a16.cu", f"w4a16_grouped_nt{nt}_{sfx}", dev, _SIGNATURE)
        threads, shared, tile = 32 * WARPS, WARPS * nt * 512, TILE_ROWS  # width is 8 * nt already
    by_row = rows < experts
    side = 1 if by_row else pass_blocks(tokens, rows, experts, width)
    launch((side, -(-n // tile), rows if by_row else experts), threads, shared, _torch_stream_ptr(t["torch"], dev),
           table.data_ptr(), expert_of_row.data_ptr(), offsets.data_ptr(), x.data_ptr(), y.data_ptr(), experts,
           int(by_row), n, k)
    return y


@functools.lru_cache(maxsize=None)
def _tiled_launcher(sfx: str, device: int):
    return launcher("w4a16_tiled.cu", f"w4a16_tiled_grouped_{sfx}", device, _SIGNATURE).allow_shared(TILED_SHARED)


def _grouped_wg(x, y, table, expert_of_row, offsets, n: int, nt: int, capacity: int, sfx: str,
                device: int) -> None:
    """grouped_linear through w4a16_wgmma_grouped.cu: ``capacity`` tiles of at most ``nt`` rows of
    an expert (``expert_tiles``), x reordered a tile, then grid (blocks over the weight's rows,
    tiles), each cluster one 512-row tile of its expert's weight on one tile's rows."""
    t = _torch_names()
    k = x.shape[1]
    stream = _torch_stream_ptr(t["torch"], device)
    tiles = expert_tiles(offsets, nt, capacity)
    units = (k // 64 + 1) * 8 * nt  # 16-byte units of a tile's reordered x (one zero chunk more)
    xp = x.new_empty(capacity * units * 16, dtype=t["u8"])
    launcher("w4a16_wgmma_grouped.cu", "w4a16_wgg_xprep", device, "PPPiii")(
        -(-capacity * units // 256), 256, 0, stream, x.data_ptr(), xp.data_ptr(), tiles.data_ptr(), capacity, k, nt)
    _wg_launcher(nt, sfx, device).after(  # a programmatic dependent of xprep: starts copying weights early
        (WG_CLUSTER * wg_tiles(n), capacity), 128 * WG_GROUPS, wg_shared(nt), stream, table.data_ptr(),
        tiles.data_ptr(), expert_of_row.data_ptr(), xp.data_ptr(), y.data_ptr(), n, k)


@functools.lru_cache(maxsize=None)
def _wg_launcher(nt: int, sfx: str, device: int):
    return launcher("w4a16_wgmma_grouped.cu", f"w4a16_wgg_nt{nt}_{sfx}", device,
                    _WG_SIGNATURE).allow_shared(wg_shared(nt))
