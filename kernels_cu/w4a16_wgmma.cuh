// w4a16_wgmma.cuh - y[M, N] = x[M, K] @ W^T * g (+ bias) for 17..128 tokens on sm_90a:
// warpgroup MMA (wgmma.m64nNTk16) with the weight decoded in registers as the A operand. NT, the
// token columns, is 24, 32, then a multiple of 16 up to 128: the plan takes the least NT >= M,
// since the loop's time grows with NT whatever M is (cuda_wgmma.WG_TOKEN_TILES).
//
// Roles: y^T = W x^T. A warpgroup owns 64 rows of W (its 4 warps one 16-row tile each, in the
// repack of prepare.cu, decoded exactly as in w4a16.cu to e2m1 * s * 2^-14) and all NT tokens:
// wgmma.m64nNTk16 with A from registers and B = x^T from shared memory, FP32 accumulators.
// A block is 4 warpgroups (256 rows of W); a cluster of 2 blocks (neighbouring row blocks, one
// "tile" of 512 rows) gets each chunk of x by one multicast copy, which halves the L2 traffic of
// re-reading x.
//
// Work: the units (tile, pair of 64-wide K chunks), tile by tile. Stream-K (w4a16_wgsk_*):
// cluster c of C takes units [U c / C, U (c + 1) / C) of all U, so every SM runs and no cluster
// has more than its share; a tile cut between clusters is finished by the cluster holding its
// first pair (its "owner", which reaches it last): the others store their FP32 partial sums in
// ws (a slot a block, in accumulator order) and raise a flag (zeroed by w4a16_wg_xprep) that the
// owner waits for before it adds them in cluster order (deterministic). Otherwise (w4a16_wg_*,
// a loop without stream-K's bookkeeping) cluster c takes tile c, or with grid.y > 1 (split K, for
// few tiles) split blockIdx.y of its pairs. w4a16_wgk2_*: K split in two over a cluster of 2
// blocks on the same 256 rows (no multicast of x), which add their partial sums through
// distributed shared memory: no workspace, and none of the L2 traffic of split K.
//
// x: w4a16_wg_xprep writes it once per call in the order the shared memory wants, so a pair of
// 64-wide K chunks is one contiguous copy: per chunk, the K order of the repack (logical column
// c of k-tile t is x column 16 (c % 8 / 2) + 4 t + c % 2 + 2 (c / 8)) in wgmma's no-swizzle
// K-major layout: core matrix (p = 2 t + c / 8, token group tg) of 8 tokens x 16 bytes at byte
// p * NT * 16 + tg * 128, word q of a token's row holding x columns 16 q + 2 p, +1; tokens past M
// are zero. Weights and scale codes: each thread copies its own with cp.async and reads them back.
//
// Split K: the gridDim.y blocks on the same rows store their FP32 partial sums (all but the share
// each adds up itself) and, once all have, each adds up and stores its share of those rows'
// outputs (in split order: deterministic).
// Split in two over a cluster (K2): the same, with the partial sums in each block's shared memory.
// Off sm_90a the kernels trap.
// Grouped (w4a16_wgmma_grouped.cu, a MoE block's experts): a tile of up to NT rows of one expert
// a grid row (blockIdx.y), a cluster a 512-row tile of its weight as in the plain loop, no split.
#pragma once
#include "hopper.cuh"
#include "w4a16_decode.cuh"

#define WG_SLOTS 8  // chunk slots in shared memory (4 pairs)
#define WG_AHEAD 2  // pairs copied ahead
#define WG_CLUSTER 2  // CTAs a cluster: neighbouring row blocks share each copy of x (multicast)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define WG_CLUSTER_DIMS_0 __cluster_dims__(WG_CLUSTER, 1, 1)
#define WG_CLUSTER_DIMS_1 __cluster_dims__(1, 2, 1)  // K2: the two K splits of 256 rows
#else
#define WG_CLUSTER_DIMS_0
#define WG_CLUSTER_DIMS_1
#endif

// Unit i (16 bytes) of x [m, k] (2-byte elements, as words; x: the first token's row) reordered
// into xp [k / 64 + 1][8][nt][4] words: (chunk c, p, token t) holds x words 32 c + 8 q + p (q =
// 0..3) of token t, zero past m and in the extra last chunk (the partner of an odd last chunk). The
// lanes of a warp are 8 p of 4 tokens, so that each load reads whole 32-byte sectors and each p's
// stores 64 contiguous bytes.
__device__ __forceinline__ void wg_xprep_unit(const u32* __restrict__ x, uint4* __restrict__ xp, i64 i, int m, int k,
                                              int nt) {
    const int p = (int)(i & 7), tok = (int)((i >> 3) % nt), c = (int)((i >> 3) / nt);
    if (c > (k >> 6)) return;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (c < (k >> 6) && tok < m) {
        const u32* r = x + (i64)tok * (k >> 1) + 32 * c + p;
        v = make_uint4(__ldg(r), __ldg(r + 8), __ldg(r + 16), __ldg(r + 24));
    }
    xp[((i64)c * 8 + p) * nt + tok] = v;
}

template <bool BF16, int NT, bool SK, bool K2, bool GR = false>
__device__ void w4a16_wg_body(const uint4* __restrict__ wq, const unsigned short* __restrict__ sq,
                              const uint4* __restrict__ xp, typename Act<BF16>::T* __restrict__ y,
                              float* __restrict__ ws, const typename Act<BF16>::T* __restrict__ bias,
                              const float* __restrict__ g_ptr, int m, int n, int k, int chunks_per_split) {
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __trap();  // wgmma needs sm_90a; other GPUs take w4a16.cu or dequantize + cuBLAS
#else
    typedef typename Act<BF16>::T T;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int x_bytes = NT * 128;  // one chunk of x: 8 core-matrix columns of NT tokens
    const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, g = lane >> 2, q = lane & 3, groups = nthreads >> 7;
    // RC blocks of a cluster on neighbouring rows share each copy of x; rank: a block's place among them
    constexpr int RC = K2 ? 1 : WG_CLUSTER;
    const u32 crank = cluster_rank(), rank = K2 ? 0 : crank;
    // An odd chunk count gets one more chunk of zero x (its weights are the last real chunk's),
    // so chunks run in pairs: npt pairs a tile.
    const int nchunks = k >> 6, npt = (nchunks + 1) >> 1, cl = blockIdx.x / RC;
    const int clusters = gridDim.x / RC, tiles = (n + 64 * groups * RC - 1) / (64 * groups * RC);
    const bool split = !SK && !GR && gridDim.y > 1;
    const int sy = GR ? 0 : (int)blockIdx.y;  // the K split (grouped: grid y is the tile of x)
    auto first_unit = [&](int c) { return (int)((i64)tiles * npt * c / clusters); };
    const int u0 = SK ? first_unit(cl) : cl * npt + sy * (chunks_per_split >> 1);
    const int npairs = (SK ? first_unit(cl + 1) : min(u0 + (chunks_per_split >> 1), (cl + 1) * npt)) - u0;
    const u32 base = (u32)__cvta_generic_to_shared(smem);
    // wgmma descriptor of slot 0, k-tile 0 (LBO: next core matrix along K, NT * 16 bytes; SBO: next
    // 8 tokens, 128 bytes); other slots and k-tiles add their byte offset / 16 to the address field
    const u64 desc0 = smem_desc(base, NT * 16, 128);
    const u32 w_base = base + WG_SLOTS * x_bytes, s_base = w_base + WG_SLOTS * nthreads * 16;
    // This warpgroup's first row in tile t, and the 16-row tile of the repack its warp computes on
    // (a warpgroup past N takes the last 64 rows, so every warp runs the same wgmmas, with no
    // divergent path around them, and stores nothing).
    auto group_row = [&](int t) { return ((t * RC + (int)rank) * groups + wg) * 64; };
    auto warp_tile = [&](int t) { return min(group_row(t), (n - 1) / 64 * 64) / 16 + (warp & 3); };

    // Local pair j (unit u0 + j: tile t, pair p of the tile) goes to pair slot j % 4 (chunk slots
    // 2 j % 8, +1). x: thread 0 of each CTA expects the pair's bytes on full[slot]; thread 0 of the
    // cluster's first CTA waits until all 8 warpgroups of the cluster have released the slot's
    // previous pair (empty[slot], in its shared memory) and copies the pair once into both CTAs
    // (multicast; K2: each CTA copies its own). Weights and scale codes: every thread copies its
    // own (cp.async), no barrier needed.
    const u32 full0 = s_base + WG_SLOTS * nthreads * 4, empty0 = full0 + 8 * (WG_SLOTS / 2);
    constexpr u32 pair_bytes = 2 * x_bytes;
    auto issue_x = [&](int j, int p) {
        const u32 sl = j % (WG_SLOTS / 2);
        mbar_expect_arrive(full0 + 8 * sl, pair_bytes);
        if (rank == 0) {
            if (j >= WG_SLOTS / 2) mbar_wait(empty0 + 8 * sl, (j / (WG_SLOTS / 2) - 1) & 1);
            bulk_multicast(base + sl * pair_bytes, xp + (i64)p * 2 * NT * 8, pair_bytes, full0 + 8 * sl,
                           K2 ? 1u << crank : 3u);
        }
    };
    const uint4* w_tile;  // this thread's weights and scale codes in the tile being copied
    const unsigned short* s_tile;
    auto issue_w = [&](int j, int p) {
        const int st = (2 * j) % WG_SLOTS;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int c = min(2 * p + h, nchunks - 1);
            cp_async16(w_base + ((st + h) * nthreads + tid) * 16, w_tile + (i64)c * (W4_PAIR * 32));
            cp_async4(s_base + ((st + h) * nthreads + tid) * 4, s_tile + (i64)c * (W4_PAIR * 32), 4);
        }
    };
    if (tid == 0) {
        for (int sl = 0; sl < WG_SLOTS / 2; ++sl) {
            mbar_init(full0 + 8 * sl, 1);
            mbar_init(empty0 + 8 * sl, RC * groups);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    cluster_sync();

    float acc[NT / 2];
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) acc[i] = 0.0f;

    // The weights and scale codes a thread copied for a chunk (read back once they have landed).
    uint4 wv;
    u32 sv;
    auto read_own = [&](int i) {
        const int st = i % WG_SLOTS;
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(wv.x), "=r"(wv.y), "=r"(wv.z), "=r"(wv.w)
                     : "r"(w_base + (st * nthreads + tid) * 16));
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sv) : "r"(s_base + (st * nthreads + tid) * 4));
    };
    // Decode chunk i's A (from wv, sv).
    auto decode = [&](u32 (&a)[4][4]) {
        const u32 sc = (g & 1) ? sv >> 16 : sv & 0xFFFFu;
        const u32 s_lo = scale_pair<BF16>(sc & 0xFFu), s_hi = scale_pair<BF16>(sc >> 8);
        const u32 words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            if (BF16) decode_bf16(words[t], a[t]); else decode_f16(words[t], a[t]);
            a[t][0] = mul2<BF16>(a[t][0], s_lo);
            a[t][1] = mul2<BF16>(a[t][1], s_hi);
            a[t][2] = mul2<BF16>(a[t][2], s_lo);
            a[t][3] = mul2<BF16>(a[t][3], s_hi);
        }
    };
    // Queue chunk i's 4 wgmmas as one group.
    auto mma = [&](int i, const u32 (&a)[4][4]) {
        const u64 desc = desc0 + (u32)((i % WG_SLOTS) * (x_bytes >> 4));
        wgmma_fence();
#pragma unroll
        for (int t = 0; t < 4; ++t) wgmma<BF16, NT>(acc, a[t], desc + t * (2 * NT * 16 >> 4));
        wgmma_commit();
    };

    // Thread th's acc[4 j + e] in tile t: row ((t * RC + rank) * groups + th / 128) * 64 +
    // 16 (th / 32 % 4) + th % 32 / 4 + 8 (e / 2), token 8 j + 2 (th % 4) + e % 2.
    const float gs = *g_ptr * 16384.0f;
    auto store4 = [&](int t, int th, int j, float4 v) {
        const int r0 = ((t * RC + (int)rank) * groups + (th >> 7)) * 64 + 16 * ((th >> 5) & 3)
                       + ((th & 31) >> 2);
        const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = r0 + 8 * (e >> 1), tok = 8 * j + 2 * (th & 3) + (e & 1);
            if (row < n && tok < m) {
                float o = vals[e] * gs;
                if (bias) o += to_float(bias[row]);
                y[(i64)tok * n + row] = from_float<T>(o);
            }
        }
    };
    auto acc4 = [&](int i) { return make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]); };
    auto store_y = [&](int t) {
#pragma unroll
        for (int j = 0; j < NT / 8; ++j) store4(t, tid, j, acc4(j));
    };
    // Stream-K and split K: ws holds a flag or counter a block column (gridDim.x words, rounded up
    // to 4, zeroed by xprep), then a partial-sum slot a block (blockIdx.x-major): [NT / 8][nthreads]
    // float4, thread tid's acc[4 i .. 4 i + 3] at [i][tid].
    u32* flags = reinterpret_cast<u32*>(ws);
    float4* parts = reinterpret_cast<float4*>(ws + ((gridDim.x + 3) & ~3));
    auto store_slot = [&](float4* slot) {  // then fence and barrier
#pragma unroll
        for (int i = 0; i < NT / 8; ++i) __stcg(slot + i * nthreads, acc4(i));
        __threadfence();
        __syncthreads();
    };
    auto end_tile = [&](int t, int p0, int p1) {  // the tile's pairs [p0, p1) are in acc
        if (p0 > 0) {  // not the owner: hand the partial sums over
            store_slot(parts + (i64)blockIdx.x * (NT / 8) * nthreads + tid);
            if (tid == 0) asm volatile("st.release.gpu.global.u32 [%0], 1;" ::"l"(flags + blockIdx.x) : "memory");
        } else {
            // a tile cut at p1: add the partial sums of the clusters that start inside it
            for (int c = cl + 1; p1 < npt && c < clusters && first_unit(c) < (t + 1) * npt; ++c) {
                const int b = c * WG_CLUSTER + (int)rank;
                if (tid == 0) {
                    u32 ready = 0;
                    while (!ready) asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(ready) : "l"(flags + b) : "memory");
                }
                __syncthreads();
                const float4* slot = parts + (i64)b * (NT / 8) * nthreads + tid;
                float4 v[NT / 8];
#pragma unroll
                for (int i = 0; i < NT / 8; ++i) v[i] = __ldcg(slot + i * nthreads);
#pragma unroll
                for (int i = 0; i < NT / 8; ++i) {
                    acc[4 * i] += v[i].x, acc[4 * i + 1] += v[i].y, acc[4 * i + 2] += v[i].z, acc[4 * i + 3] += v[i].w;
                }
            }
            store_y(t);
        }
#pragma unroll
        for (int i = 0; i < NT / 2; ++i) acc[i] = 0.0f;
    };

    // Chunk pairs: decode chunk 2 j, wait for the pair's x, queue chunk 2 j; once chunk 2 j - 1
    // is done (the previous pair complete: release its slot), decode and queue chunk 2 j + 1. A chunk's A
    // registers stay untouched until the wait after the next chunk's wgmmas; the tensor cores run
    // while the next chunk decodes. Copies run WG_AHEAD pairs ahead.
    u32 a0[4][4], a1[4][4];
    auto compute_pair = [&](int j) {  // with pair j + 1's weights read back at the end
        cp_async_commit();
        decode(a0);  // chunk 2 j (weights only: before the wait for x)
        read_own(2 * j + 1);
        mbar_wait(full0 + 8 * (j % (WG_SLOTS / 2)), (j / (WG_SLOTS / 2)) & 1);
        mma(2 * j, a0);
        wgmma_wait<1>();  // chunk 2 j - 1 done: a1 and the previous pair's slot are free
        if (j > 0 && (tid & 127) == 0) mbar_arrive_remote(empty0 + 8 * ((j - 1) % (WG_SLOTS / 2)), K2 ? crank : 0);
        decode(a1);
        mma(2 * j + 1, a1);
        cp_async_wait<WG_AHEAD - 1>();  // this thread's copies of pair j + 1
        if (j + 1 < npairs) read_own(2 * j + 2);
    };
    auto copy_tile = [&](int t) {
        w_tile = wq + w4_slot(warp_tile(t), nchunks) * 32 + lane;
        s_tile = sq + w4_slot(warp_tile(t), nchunks) * 32 + q * 8 + (g & ~1);
    };
    int ct = cl;  // the tile being computed
    if constexpr (SK) {
        // (it, ip): the unit the next copy is for; (ct, cp): the unit being computed, whose run on
        // its tile began at pair p0. (The two loops are apart because this bookkeeping in the
        // other one made ptxas keep its counter out of the uniform registers: 3-6% slower, H200.)
        int it = u0 / npt, ip = u0 - it * npt, cp = ip, p0 = ip;
        ct = it;
        copy_tile(it);
        auto next_copy = [&]() {
            if (++ip == npt) ip = 0, ++it, copy_tile(it);
        };
#pragma unroll
        for (int j = 0; j < WG_AHEAD; ++j) {  // the weights do not depend on xprep: copy them first
            if (j < npairs) issue_w(j, ip);
            cp_async_commit();
            next_copy();
        }
        grid_dependency_wait();  // launched after xprep (Launcher.after): its x and zeroed flags from here on
        if (tid == 0)
            for (int j = 0, p = cp; j < WG_AHEAD && j < npairs; ++j, p = p + 1 == npt ? 0 : p + 1) issue_x(j, p);
        cp_async_wait<WG_AHEAD - 1>();
        read_own(0);
        for (int j = 0; j < npairs; ++j) {
            if (j + WG_AHEAD < npairs) {
                if (tid == 0) issue_x(j + WG_AHEAD, ip);
                issue_w(j + WG_AHEAD, ip);
                next_copy();
            }
            compute_pair(j);
            if (cp + 1 == npt || j + 1 == npairs) {  // the end of this cluster's run on tile ct
                wgmma_wait<0>();
                end_tile(ct, p0, cp + 1);
                ++ct, cp = p0 = 0;
            } else {
                ++cp;
                wgmma_wait<1>();  // chunk 2 j done: a0 is free
            }
        }
    } else {
        const int p0 = sy * (chunks_per_split >> 1);  // this split's first pair of tile cl
        copy_tile(cl);
#pragma unroll
        for (int j = 0; j < WG_AHEAD; ++j) {  // the weights do not depend on xprep: copy them first
            if (j < npairs) issue_w(j, p0 + j);
            cp_async_commit();
        }
        grid_dependency_wait();  // launched after xprep (Launcher.after): its x and zeroed ws from here on
        if (tid == 0)
            for (int j = 0; j < WG_AHEAD && j < npairs; ++j) issue_x(j, p0 + j);
        cp_async_wait<WG_AHEAD - 1>();
        read_own(0);
        for (int j = 0; j < npairs; ++j) {
            if (j + WG_AHEAD < npairs) {
                if (tid == 0) issue_x(j + WG_AHEAD, p0 + j + WG_AHEAD);
                issue_w(j + WG_AHEAD, p0 + j + WG_AHEAD);
            }
            compute_pair(j);
            wgmma_wait<1>();  // chunk 2 j done: a0 is free
        }
    }
    cp_async_wait<0>();
    wgmma_wait<0>();
    launch_dependents();  // a programmatic dependent may be scheduled as blocks end (all are running by then)
    cluster_sync();  // no CTA leaves while its partner may still arrive on its barriers
    if (SK) return;
    if (!split) {  // a tile a cluster
        store_y(ct);
        return;
    }
    const int live = min(NT / 8, (m + 7) >> 3), total = live * nthreads;  // float4 of a slot below M
    if (K2) {
        // Each block puts its partial sums in its shared memory (the slots are free: every copy has
        // landed and been read), then adds both blocks' for its half of the outputs, split 0 first.
        float4* own = reinterpret_cast<float4*>(smem);
#pragma unroll
        for (int i = 0; i < NT / 8; ++i)
            if (i < live) own[i * nthreads + tid] = acc4(i);
        cluster_sync();
        for (int i = (int)crank * total / 2 + tid; i < ((int)crank + 1) * total / 2; i += nthreads) {
            const float4 a = cluster_load4(base + 16 * i, 0), b = cluster_load4(base + 16 * i, 1);
            store4(cl, i % nthreads, i / nthreads, make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w));
        }
        cluster_sync();  // neither block leaves while the other reads its shared memory
        return;
    }

    // Split K: block y of the column adds up the share [y T / S, (y + 1) T / S) of the T float4 of a
    // slot (only those holding tokens below M) over the S splits, in split order: bitwise the same
    // run to run, and no finish kernel. Each block stores its partial sums in its slot, but its own
    // share in its shared memory (the x slots are free), and counts itself in on its column's
    // counter; once all gridDim.y have (they run at once: wg_grid keeps the grid within one wave),
    // each adds up its share: 1 / S less L2 traffic than every slot whole.
    const int S = gridDim.y, y0 = (int)blockIdx.y, lo = y0 * total / S, hi = (y0 + 1) * total / S;
    const float4* column = parts + (i64)blockIdx.x * S * total;
    float4* slot = parts + ((i64)blockIdx.x * S + y0) * total;
    float4* own = reinterpret_cast<float4*>(smem);  // share float4 i at own[i - lo]
#pragma unroll
    for (int j = 0; j < NT / 8; ++j) {
        const int i = j * nthreads + tid;
        if (j < live) {
            if (i >= lo && i < hi) own[i - lo] = acc4(j);
            else __stcg(slot + i, acc4(j));
        }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(flags + blockIdx.x) : "memory");
        u32 in = 0;
        while (in < (u32)S)
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(in) : "l"(flags + blockIdx.x) : "memory");
    }
    __syncthreads();
    for (int i = lo + tid; i < hi; i += nthreads) {
        float4 v = y0 == 0 ? own[i - lo] : __ldcg(column + i);
        for (int sp = 1; sp < S; ++sp) {
            const float4 w = sp == y0 ? own[i - lo] : __ldcg(column + (i64)sp * total + i);
            v.x += w.x, v.y += w.y, v.z += w.z, v.w += w.w;
        }
        store4(cl, i % nthreads, i / nthreads, v);
    }
#endif
}
