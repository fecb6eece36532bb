// w4a16_wgmma.cu - y[M, N] = x[M, K] @ W^T * g (+ bias) for 33..128 tokens on sm_90a:
// warpgroup MMA (wgmma.m64nNTk16) with the weight decoded in registers as the A operand.
//
// Roles: y^T = W x^T. A warpgroup owns 64 rows of W (its 4 warps one 16-row tile each, in the
// repack of prepare.cu, decoded exactly as in w4a16.cu to e2m1 * s * 2^-14) and all NT tokens:
// wgmma.m64nNTk16 with A from registers and B = x^T from shared memory, FP32 accumulators.
// A block is 4 warpgroups (256 rows of W); a cluster of 2 blocks (neighbouring row blocks) gets
// each chunk of x by one multicast copy, which halves the L2 traffic of re-reading x; grid.y
// splits K.
//
// x: w4a16_wg_xprep writes it once per call in the order the shared memory wants, so a pair of
// 64-wide K chunks is one contiguous copy: per chunk, the K order of the repack (logical column
// c of k-tile t is x column 16 (c % 8 / 2) + 4 t + c % 2 + 2 (c / 8)) in wgmma's no-swizzle
// K-major layout: core matrix (p = 2 t + c / 8, token group tg) of 8 tokens x 16 bytes at byte
// p * NT * 16 + tg * 128, word q of a token's row holding x columns 16 q + 2 p, +1; tokens past M
// are zero. Weights and scale codes: each thread copies its own with cp.async and reads them back.
//
// Split K (grid.y > 1) adds FP32 partial sums into ws[N][M rounded up to 4] (zeroed by
// w4a16_wg_xprep), and w4a16_finish_<dtype> scales, adds the bias, rounds and transposes.
// Off sm_90a the kernels trap.
#include "w4a16_decode.cuh"

#define WG_SLOTS 8  // chunk slots in shared memory (4 pairs)
#define WG_AHEAD 2  // pairs copied ahead
#define WG_CLUSTER 2  // CTAs a cluster: neighbouring row blocks share each copy of x (multicast)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define WG_CLUSTER_DIMS __cluster_dims__(WG_CLUSTER, 1, 1)
#else
#define WG_CLUSTER_DIMS
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ u32 cluster_rank() { u32 r; asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r)); return r; }
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_arrive(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n\t.reg .pred P;\nWAIT:\n\tmbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n\t@!P bra WAIT;\n}"
                 ::"r"(bar), "r"(parity) : "memory");
}
// arrive on the mbarrier at the same offset in the shared memory of cluster CTA ``rank``
__device__ __forceinline__ void mbar_arrive_remote(u32 bar, u32 rank) {
    asm volatile("{\n\t.reg .b32 ra;\n\tmapa.shared::cluster.u32 ra, %0, %1;\n\t"
                 "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}" ::"r"(bar), "r"(rank) : "memory");
}
// bytes from global memory into the same shared-memory offset of every CTA in ``mask``, each
// completing ``bytes`` of transaction count on its own mbarrier at offset ``bar``
__device__ __forceinline__ void bulk_multicast(u32 dst, const void* src, u32 bytes, u32 bar, unsigned short mask) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], %4;"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "h"(mask) : "memory");
}

// shared-memory matrix descriptor, no swizzle: start, LBO (next core matrix along K), SBO (along N)
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}

#define WG_D32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_D64 WG_D32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_F32 WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24)
#define WG_F64 WG_F32, WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56)
#define WG_MMA(N, TY, DL, A0, DESC, ONE)                                                              \
    "{.reg .pred p; setp.ne.b32 p, " ONE ", 0; wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY \
    " {" DL "}, {" A0 "}, " DESC ", p, 1, 1, 0;}"

// d (+)= A (64 x 16, registers) * B (16 x NT, shared memory via desc), one specialization a
// (type, NT): the accumulator operand list is spelled out per NT
template <bool BF16, int NT> __device__ __forceinline__ void wgmma(float (&d)[NT / 2], const u32 (&a)[4], u64 desc);
#define WG_MMA_FN(BF16, NT, TY, DL, FL, A0, DESC, ONE)                                                     \
    template <> __device__ __forceinline__ void wgmma<BF16, NT>(float (&d)[NT / 2], const u32 (&a)[4], u64 desc) { \
        asm volatile(WG_MMA(NT, TY, DL, A0, DESC, ONE)                                                       \
                     : FL : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                  \
    }
WG_MMA_FN(false, 128, "f16", WG_D64, WG_F64, "%64, %65, %66, %67", "%68", "%69")
WG_MMA_FN(true, 128, "bf16", WG_D64, WG_F64, "%64, %65, %66, %67", "%68", "%69")
WG_MMA_FN(false, 64, "f16", WG_D32, WG_F32, "%32, %33, %34, %35", "%36", "%37")
WG_MMA_FN(true, 64, "bf16", WG_D32, WG_F32, "%32, %33, %34, %35", "%36", "%37")
#endif

// x [m, k] (2-byte elements, as words) -> xp [k / 64 + 1][8][nt / 8][8][4] words, zero past m and
// in the extra last chunk (the partner of an odd last chunk); and the split-K workspace ws
// (ws_words floats, none when 0) zeroed.
extern "C" __global__ void w4a16_wg_xprep(const uint4* __restrict__ x, u32* __restrict__ xp, float* __restrict__ ws,
                                          i64 ws_words, int m, int k, int nt) {
    launch_dependents();  // the main kernel's blocks may start (and copy weights) as these end
    const i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;  // 4 words of x (or of zeros past m)
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 j = i; j < ws_words; j += stride) ws[j] = 0.0f;
    for (i64 j = i; j < (i64)nt * 32; j += stride) xp[(i64)(k >> 6) * nt * 32 + j] = 0u;
    const int per_row = k >> 3;
    if (i >= (i64)nt * per_row) return;
    const int tok = (int)(i / per_row), w0 = (int)(i % per_row) * 4;
    const uint4 v = tok < m ? x[i] : make_uint4(0u, 0u, 0u, 0u);
    const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int w = w0 + j, c = w >> 5, q = (w >> 3) & 3, p = w & 7;
        xp[(i64)c * nt * 32 + p * nt * 4 + (tok >> 3) * 32 + (tok & 7) * 4 + q] = words[j];
    }
}

template <bool BF16, int NT>
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
    const int wg = warp >> 2, g = lane >> 2, q = lane & 3;
    const int row0 = (blockIdx.x * (nthreads >> 7) + wg) * 64;  // this warpgroup's first row
    // A warpgroup past N computes on the last 64 rows (every warp runs the same wgmmas: no
    // divergent path around them) and stores nothing. An odd chunk count gets one more chunk of
    // zero x (its weights are the last real chunk's), so chunks run in pairs.
    const int tile = min(row0, (n - 1) / 64 * 64) / 16 + (warp & 3);  // this warp's 16-row tile
    const int nchunks = k >> 6, c0 = blockIdx.y * chunks_per_split;
    const int nloc = min(nchunks - c0, chunks_per_split), npairs = (nloc + 1) >> 1;
    const u32 base = (u32)__cvta_generic_to_shared(smem);
    // wgmma descriptor of slot 0, k-tile 0 (LBO: next core matrix along K, NT * 16 bytes; SBO: next
    // 8 tokens, 128 bytes); other slots and k-tiles add their byte offset / 16 to the address field
    const u64 desc0 = smem_desc(base, NT * 16, 128);
    const u32 w_base = base + WG_SLOTS * x_bytes, s_base = w_base + WG_SLOTS * nthreads * 16;
    const uint4* wsrc = wq + (i64)tile * nchunks * 32 + lane;
    const unsigned short* ssrc = sq + ((i64)tile * (k >> 4) + q) * 8 + (g & ~1);

    // Pair pr of local chunks (2 pr, 2 pr + 1) goes to pair slot pr % 4 (chunk slots 2 pr % 8, +1).
    // x: thread 0 of each CTA expects the pair's bytes on full[slot]; thread 0 of the cluster's
    // first CTA waits until all 8 warpgroups of the cluster have released the slot's previous pair
    // (empty[slot], in its shared memory) and copies the pair once into both CTAs (multicast).
    // Weights and scale codes: every thread copies its own (cp.async), no barrier needed.
    const u32 rank = cluster_rank();
    const u32 full0 = s_base + WG_SLOTS * nthreads * 4, empty0 = full0 + 8 * (WG_SLOTS / 2);
    constexpr u32 pair_bytes = 2 * x_bytes;
    auto issue_x = [&](int pr) {
        const u32 sl = pr % (WG_SLOTS / 2);
        mbar_expect_arrive(full0 + 8 * sl, pair_bytes);
        if (rank == 0) {
            if (pr >= WG_SLOTS / 2) mbar_wait(empty0 + 8 * sl, (pr / (WG_SLOTS / 2) - 1) & 1);
            bulk_multicast(base + sl * pair_bytes, xp + (i64)(c0 + 2 * pr) * NT * 8, pair_bytes, full0 + 8 * sl, 3);
        }
    };
    auto issue_w = [&](int pr) {
        const int st = (2 * pr) % WG_SLOTS;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int c = c0 + min(2 * pr + h, nloc - 1);
            cp_async16(w_base + ((st + h) * nthreads + tid) * 16, wsrc + (i64)c * 32);
            cp_async4(s_base + ((st + h) * nthreads + tid) * 4, ssrc + (i64)c * 32, 4);
        }
    };
    if (tid == 0) {
        for (int sl = 0; sl < WG_SLOTS / 2; ++sl) {
            mbar_init(full0 + 8 * sl, 1);
            mbar_init(empty0 + 8 * sl, WG_CLUSTER * (nthreads >> 7));
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

    // Chunk pairs: decode chunk 2 pr, wait for the pair's x, queue chunk 2 pr; once chunk 2 pr - 1
    // is done (the previous pair complete: release its slot), decode and queue chunk 2 pr + 1. A chunk's A
    // registers stay untouched until the wait after the next chunk's wgmmas; the tensor cores run
    // while the next chunk decodes. Copies run WG_AHEAD pairs ahead.
#pragma unroll
    for (int pr = 0; pr < WG_AHEAD; ++pr) {  // the weights do not depend on xprep: copy them first
        if (pr < npairs) issue_w(pr);
        cp_async_commit();
    }
    grid_dependency_wait();  // launched after xprep (Launcher.after): its x and zeroed ws from here on
    if (tid == 0)
        for (int pr = 0; pr < WG_AHEAD && pr < npairs; ++pr) issue_x(pr);
    cp_async_wait<WG_AHEAD - 1>();
    read_own(0);
    u32 a0[4][4], a1[4][4];
    for (int pr = 0; pr < npairs; ++pr) {
        if (pr + WG_AHEAD < npairs) {
            if (tid == 0) issue_x(pr + WG_AHEAD);
            issue_w(pr + WG_AHEAD);
        }
        cp_async_commit();
        decode(a0);  // chunk 2 pr (weights only: before the wait for x)
        read_own(2 * pr + 1);
        mbar_wait(full0 + 8 * (pr % (WG_SLOTS / 2)), (pr / (WG_SLOTS / 2)) & 1);
        mma(2 * pr, a0);
        wgmma_wait<1>();  // chunk 2 pr - 1 done: a1 and the previous pair's slot are free
        if (pr > 0 && (tid & 127) == 0) mbar_arrive_remote(empty0 + 8 * ((pr - 1) % (WG_SLOTS / 2)), 0);
        decode(a1);
        mma(2 * pr + 1, a1);
        cp_async_wait<WG_AHEAD - 1>();  // this thread's copies of pair pr + 1
        if (pr + 1 < npairs) read_own(2 * pr + 2);
        wgmma_wait<1>();  // chunk 2 pr done: a0 is free
    }
    cp_async_wait<0>();
    wgmma_wait<0>();
    launch_dependents();  // the finish kernel may be scheduled as blocks end
    cluster_sync();  // no CTA leaves while its partner may still arrive on its barriers

    // acc[4j + e]: row row0 + 16 (warp % 4) + g + 8 (e / 2), token 8 j + 2 q + e % 2
    if (gridDim.y > 1) {
        // Split K: the block's partial sums go through shared memory (free after the barrier
        // above), [rows][NT + 8] floats (no bank conflicts), then each warp adds one row of NT
        // tokens into ws[row][token] with 16-byte reds: half the reds of adding each pair.
        constexpr int LD = NT + 8;
        float* part = reinterpret_cast<float*>(smem);
        const int rl = 64 * wg + 16 * (warp & 3) + g;
#pragma unroll
        for (int j = 0; j < NT / 8; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                *reinterpret_cast<float2*>(part + (rl + 8 * h) * LD + 8 * j + 2 * q) =
                    make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
        __syncthreads();
        const int mp = (m + 3) & ~3, rows = nthreads >> 1, first = blockIdx.x * rows;
        for (int i = tid; i < rows * (NT / 4); i += nthreads) {
            const int r = i / (NT / 4), tok = i % (NT / 4) * 4, row = first + r;
            if (row < n && tok < m) {
                const float4 v = *reinterpret_cast<const float4*>(part + r * LD + tok);
                asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(ws + (i64)row * mp + tok),
                             "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
            }
        }
        return;
    }
    if (row0 >= n) return;
    const float gs = *g_ptr * 16384.0f;
#pragma unroll
    for (int j = 0; j < NT / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + 16 * (warp & 3) + g + 8 * (e >> 1), tok = 8 * j + 2 * q + (e & 1);
            if (row < n && tok < m) {
                float v = acc[4 * j + e] * gs;
                if (bias) v += to_float(bias[row]);
                y[(i64)tok * n + row] = from_float<T>(v);
            }
        }
#endif
}

// y[token][row] = ws[row][token] * g * 2^14 (+ bias), through a 32 x 32 shared tile (256 threads,
// grid (rows / 32, tokens / 32)) so that both the read and the write are coalesced.
template <typename T>
__device__ void w4a16_finish_body(const float* __restrict__ ws, T* __restrict__ y, const T* __restrict__ bias,
                                  const float* __restrict__ g_ptr, int m, int n) {
    grid_dependency_wait();  // launched after the main kernel (Launcher.after)
    __shared__ float tile[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5, r0 = blockIdx.x * 32, t0 = blockIdx.y * 32;
    const int mp = (m + 3) & ~3;
    for (int i = ty; i < 32; i += 8) {
        const int row = r0 + i, tok = t0 + tx;
        tile[i][tx] = row < n && tok < m ? ws[(i64)row * mp + tok] : 0.0f;
    }
    __syncthreads();
    const float gs = *g_ptr * 16384.0f;
    for (int i = ty; i < 32; i += 8) {
        const int tok = t0 + i, row = r0 + tx;
        if (row < n && tok < m) {
            float v = tile[tx][i] * gs;
            if (bias) v += to_float(bias[row]);
            y[(i64)tok * n + row] = from_float<T>(v);
        }
    }
}

#define W4A16_WG(NT)                                                                                               \
    extern "C" __global__ void __launch_bounds__(512, 1) WG_CLUSTER_DIMS w4a16_wg_nt##NT##_f16(                                   \
        const uint4* wq, const unsigned short* sq, const uint4* xp, __half* y, float* ws, const __half* bias,      \
        const float* g, int m, int n, int k, int cps) {                                                            \
        w4a16_wg_body<false, NT>(wq, sq, xp, y, ws, bias, g, m, n, k, cps);                                        \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(512, 1) WG_CLUSTER_DIMS w4a16_wg_nt##NT##_bf16(                                  \
        const uint4* wq, const unsigned short* sq, const uint4* xp, __nv_bfloat16* y, float* ws,                  \
        const __nv_bfloat16* bias, const float* g, int m, int n, int k, int cps) {                                 \
        w4a16_wg_body<true, NT>(wq, sq, xp, y, ws, bias, g, m, n, k, cps);                                         \
    }

W4A16_WG(64)
W4A16_WG(128)


extern "C" __global__ void w4a16_finish_f16(const float* ws, __half* y, const __half* bias, const float* g, int m, int n) {
    w4a16_finish_body<__half>(ws, y, bias, g, m, n);
}
extern "C" __global__ void w4a16_finish_bf16(const float* ws, __nv_bfloat16* y, const __nv_bfloat16* bias,
                                             const float* g, int m, int n) {
    w4a16_finish_body<__nv_bfloat16>(ws, y, bias, g, m, n);
}
