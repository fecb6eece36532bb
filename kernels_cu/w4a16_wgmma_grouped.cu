// w4a16_wgmma_grouped.cu - a MoE block's experts in one warpgroup-MMA launch on sm_90a: x's rows
// sorted by expert, cut into tiles of at most NT rows of one expert (moe_route.cu's moe_tiles:
// tiles[t] = (first row, rows), rows 0 past the last), and y[r] = x[r] @ W_e^T * g_e (+ b_e) for
// each row r of expert e. Grid (clusters over the weight's rows, tiles): each block runs
// w4a16_wgmma.cuh's plain loop (a cluster a 512-row tile, all of K) on its tile's rows and its
// expert's weight from the table (codes, scale codes, global scale, bias or 0 an expert), so each
// tile's arithmetic is that of ``linear`` on those rows with the same NT.
#include "w4a16_wgmma.cuh"

// x [rows, k] -> xp: tile t's rows reordered as w4a16_wg_xprep does (wg_xprep_unit) at xp + t *
// (k / 64 + 1) * 8 * nt; tiles of no rows are left as they are (their blocks return at once).
extern "C" __global__ void w4a16_wgg_xprep(const u32* __restrict__ x, uint4* __restrict__ xp,
                                           const int2* __restrict__ tiles, int capacity, int k, int nt) {
    launch_dependents();  // the main kernel's blocks may start (and read the table) as these end
    const i64 units = (i64)((k >> 6) + 1) * 8 * nt, i = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    const int t = (int)(i / units);
    if (t >= capacity) return;
    const int2 tile = tiles[t];
    if (tile.y > 0) wg_xprep_unit(x + (i64)tile.x * (k >> 1), xp + t * units, i - t * units, tile.y, k, nt);
}

template <bool BF16, int NT>
__device__ void w4a16_wgg(const u64* __restrict__ table, const int2* __restrict__ tiles,
                          const i64* __restrict__ expert_of_row, const uint4* __restrict__ xp,
                          typename Act<BF16>::T* __restrict__ y, int n, int k) {
    typedef typename Act<BF16>::T T;
    // the tiles and rows' experts come from launches before xprep, which this one follows
    const int2 tile = tiles[blockIdx.y];
    if (tile.y == 0) return;  // both blocks of a cluster: they share the tile
    const u64* w = table + 4 * expert_of_row[tile.x];
    const int chunks = (k >> 6) + 1, pairs = chunks >> 1;  // chunks with the zero one; pairs of all K
    w4a16_wg_body<BF16, NT, false, false, true>(
        reinterpret_cast<const uint4*>(w[0]), reinterpret_cast<const unsigned short*>(w[1]),
        xp + (i64)blockIdx.y * chunks * 8 * NT, y + (i64)tile.x * n, nullptr, reinterpret_cast<const T*>(w[3]),
        reinterpret_cast<const float*>(w[2]), tile.y, n, k, 2 * pairs);
}

// w4a16_wgg_nt{NT}_{f16,bf16}; NT: keep in step with cuda_grouped.WG_GROUPED_TILES
#define W4A16_WGG(NT)                                                                                              \
    extern "C" __global__ void __launch_bounds__(512, 1) WG_CLUSTER_DIMS_0 w4a16_wgg_nt##NT##_f16(                 \
        const u64* table, const int2* tiles, const i64* expert_of_row, const uint4* xp, __half* y, int n, int k) { \
        w4a16_wgg<false, NT>(table, tiles, expert_of_row, xp, y, n, k);                                            \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(512, 1) WG_CLUSTER_DIMS_0 w4a16_wgg_nt##NT##_bf16(                \
        const u64* table, const int2* tiles, const i64* expert_of_row, const uint4* xp, __nv_bfloat16* y, int n,  \
        int k) {                                                                                                   \
        w4a16_wgg<true, NT>(table, tiles, expert_of_row, xp, y, n, k);                                             \
    }
W4A16_WGG(32)
W4A16_WGG(64)
W4A16_WGG(96)
W4A16_WGG(128)
