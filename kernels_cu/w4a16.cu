// w4a16.cu - y[M, N] = x[M, K] @ W^T * g (+ bias), W an NVFP4 weight repacked by prepare.cu,
// x fp16 or bf16, FP32 accumulation on the tensor cores (mma.sync.m16n8k16), y in x's type.
//
// The weight is the A operand (16 rows of W = 16 output features), x^T the B operand (8 tokens).
// Each warp decodes its A fragment in registers: 8 E2M1 codes -> 4 half2 / bfloat162 holding
// e2m1 * 2^-14 (fp16: magnitude at bit 9) or e2m1 * 2^-126 (bf16: magnitude at bit 6), then one
// multiply by the block scale (fp16 s, or bf16 s * 2^112) gives e2m1 * s * 2^-14 exactly
// (e2m1 * s has at most 6 significant bits and lies in [2^-10, 2688]); the epilogue multiplies by
// g * 2^14. The K order inside each 64-wide chunk is permuted (see prepare.cu) so that lane 4g+q
// reads x[token][64c + 16q .. +15] with two 16-byte loads and needs one scale per row per chunk.
//
// Grid: x = token tiles of 8*NT, y = row tiles of 16*RT. Block: any number of warps; warp w takes
// chunks w, w + nwarps, ... (split-K inside the block) and the block reduces through shared memory.
// <w4a16_rt{RT}_nt{NT}_u{U}[_w4]_{f16,bf16}> (U chunks per pipeline step; _w4: at most 4 warps a
// block). Needs sm_80, or sm_75 for fp16 (each MMA as two m16n8k8); traps on older targets,
// which take another path.
// <..._s{S}_...> (sm_90+): K split over the S blocks of a cluster along x (x = token tile * S +
// split), each block taking a contiguous run of chunks; then every block of the cluster adds up a
// share of the outputs over the S blocks' sums in split order, read through distributed shared
// memory (deterministic; no workspace, no second launch). For grids of fewer blocks than SMs.
// <w4a16_grouped_nt{NT}_{f16,bf16}>: every expert of a MoE block in one launch (see below).
#include "w4a16_decode.cuh"

__device__ __forceinline__ uint4 load_stream(const uint4* p) {  // read once: keep it out of L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

template <int B> struct Buf { static constexpr int value = B; };

// The main loop's buffer scheme and register cap per kernel, from A/Bs on an H200 (NOTES.md,
// sessions 6, 12 and 16): with one row tile the two buffers taking turns is fastest, but for fp16
// NT=2 U=1 (14.5 against 15.0 us at 14336x4096 M=16); with two, copying the prefetched buffer
// is, but for RT=2 U=1 at NT=1 (M=1 28672x8192 36.6 against 38.8 us) and bf16 NT=2. The RT=2
// NT=2 kernels run under a 64-register cap, four blocks of 8 warps a SM (with the tile pairs'
// addressing neither dtype spills there; uncapped, fp16 took 75 and three blocks a SM).
// A kernel built for at most 4 warps a block (the ``_w4`` ones) is capped at 72 registers, seven
// blocks a SM (session 8: 14336x4096 M=1 11.7-12.0 us, 13.4 at 80 registers, six blocks a SM).
template <bool BF16, int RT, int NT, int U> constexpr bool ping_pong() {
    if (RT == 1) return BF16 || NT != 2 || U != 1;
    return RT == 2 && U == 1 && (NT == 1 || (BF16 && NT == 2));
}
constexpr int min_blocks(int rt, int nt, int u, int max_warps) {
    return max_warps == 4 ? 7 : rt == 2 && nt == 2 && u == 1 ? 2 : 0;
}

template <bool BF16, int RT, int NT, int U, int S = 1>
__device__ void w4a16_body(const uint4* __restrict__ wq, const unsigned short* __restrict__ sq,
                           const typename Act<BF16>::T* __restrict__ x, typename Act<BF16>::T* __restrict__ y,
                           const typename Act<BF16>::T* __restrict__ bias, const float* __restrict__ g_ptr,
                           int m, int n, int k) {
    typedef typename Act<BF16>::T T;
#if __CUDA_ARCH__ < 750
    __trap();  // mma.sync needs sm_75; fp4cupy.linear takes the dequantize path on older GPUs
#else
    if (BF16 && __CUDA_ARCH__ < 800) {  // bf16 MMAs need sm_80 (fp4cupy.linear: the dequantize path)
        __trap();
        return;
    }
    if (S > 1 && __CUDA_ARCH__ < 900) __trap();  // clusters need sm_90
    extern __shared__ float red[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int nchunks = k >> 6, tile0 = blockIdx.y * RT, tok0 = blockIdx.x / S * (8 * NT);
    // this block's chunks [c_lo, c_hi): all of them, or split blockIdx.x % S's run
    const int run = S > 1 ? (nchunks + S - 1) / S : nchunks, c_lo = S > 1 ? (int)(blockIdx.x % S) * run : 0;
    const int c_hi = S > 1 ? min(nchunks, c_lo + run) : nchunks;
    float acc[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[r][j][0] = acc[r][j][1] = acc[r][j][2] = acc[r][j][3] = 0.0f;

    // Byte addresses: each stream's base for this thread, and a chunk's offset as an unsigned
    // 32-bit product added in one IMAD.WIDE (a chunk offset stays below 16 K bytes, K the row length).
    const char* xrow[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int tok = tok0 + 8 * j + g;
        xrow[j] = reinterpret_cast<const char*>(x + (i64)(tok < m ? tok : 0) * k + 16 * q);
    }
    // Row tile tile0 + r's chunk 0 (w4_slot, in int arithmetic: with w4_slot's i64 division here
    // the one-tile kernels ran 5-10% slower, H200, session 16, though their loops were the same).
    // tile0 starts a pair when RT is even: the pair's second tile is one slot on, a constant the
    // loads take as an offset, which keeps the two-tile kernels' addressing to few registers.
    static_assert(RT == 1 || RT % W4_PAIR == 0, "row tiles a block: 1 or whole pairs");
    const char* wrow[RT];
    const char* srow[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
        const i64 slot = (i64)(tile0 / W4_PAIR + r / W4_PAIR) * nchunks * W4_PAIR + (tile0 % W4_PAIR + r % W4_PAIR);
        wrow[r] = reinterpret_cast<const char*>(wq + (slot * 32 + lane));
        srow[r] = reinterpret_cast<const char*>(sq + (slot * 32 + q * 8 + g));
    }

    // Weights, scales and x of U chunks are loaded one step ahead (two register buffers), so the
    // loads of a step are in flight while the other buffer decodes and multiplies; chunk indices
    // past the end are clamped for the load and skipped (warp-uniformly) for the math. Tokens
    // past M read row 0 of x; their output columns are never stored.
    const int step = U * nwarps;
    uint4 w[2][U][RT], xv[2][U][NT][2];
    u32 s[2][U][RT];
    auto load = [&](auto buf, int c0) {
        constexpr int b = decltype(buf)::value;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const unsigned c = min(c0 + u * nwarps, c_hi - 1);
#pragma unroll
            for (int r = 0; r < RT; ++r) {
                w[b][u][r] = load_stream(reinterpret_cast<const uint4*>(wrow[r] + (u64)(c * (W4_PAIR * 512u))));
                s[b][u][r] = *reinterpret_cast<const unsigned short*>(srow[r] + (u64)(c * (W4_PAIR * 64u)));
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const uint4* xp = reinterpret_cast<const uint4*>(xrow[j] + (u64)(c * 128u));
                xv[b][u][j][0] = __ldg(xp);
                xv[b][u][j][1] = __ldg(xp + 1);
            }
        }
    };
    auto compute = [&](auto buf, int c0) {
        constexpr int b = decltype(buf)::value;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c0 + u * nwarps >= c_hi) break;
#pragma unroll
            for (int r = 0; r < RT; ++r) {
                const u32 s_lo = scale_pair<BF16>(s[b][u][r] & 0xFFu), s_hi = scale_pair<BF16>(s[b][u][r] >> 8);
                const u32 words[4] = {w[b][u][r].x, w[b][u][r].y, w[b][u][r].z, w[b][u][r].w};
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    u32 a[4];
                    if (BF16) decode_bf16(words[t], a); else decode_f16(words[t], a);
                    a[0] = mul2<BF16>(a[0], s_lo);
                    a[1] = mul2<BF16>(a[1], s_hi);
                    a[2] = mul2<BF16>(a[2], s_lo);
                    a[3] = mul2<BF16>(a[3], s_hi);
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        const uint4 xb = xv[b][u][j][t >> 1];
                        mma<BF16>(acc[r][j], a, (t & 1) ? xb.z : xb.x, (t & 1) ? xb.w : xb.y);
                    }
                }
            }
        }
    };
    if (ping_pong<BF16, RT, NT, U>()) {  // the buffers take turns: no copies, a loop twice as long
        load(Buf<0>(), c_lo + warp);
        for (int c0 = c_lo + warp; c0 < c_hi; c0 += 2 * step) {
            load(Buf<1>(), c0 + step);
            compute(Buf<0>(), c0);
            if (c0 + step >= c_hi) break;
            load(Buf<0>(), c0 + 2 * step);
            compute(Buf<1>(), c0 + step);
        }
    } else {  // buffer 0 is always the one in flight: copy it to buffer 1, reload it, decode 1
        load(Buf<0>(), c_lo + warp);
        for (int c0 = c_lo + warp; c0 < c_hi; c0 += step) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int r = 0; r < RT; ++r) w[1][u][r] = w[0][u][r], s[1][u][r] = s[0][u][r];
#pragma unroll
                for (int j = 0; j < NT; ++j) xv[1][u][j][0] = xv[0][u][j][0], xv[1][u][j][1] = xv[0][u][j][1];
            }
            load(Buf<0>(), c0 + step);
            compute(Buf<1>(), c0);
        }
    }

    // split-K reduction across the block's warps, then scale, bias, round and store
    constexpr int PER_WARP = RT * NT * 128;
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) red[warp * PER_WARP + ((r * NT + j) * 4 + e) * 32 + lane] = acc[r][j][e];
    __syncthreads();
    float* sums = red + nwarps * PER_WARP;  // split K over a cluster: this block's sums, read by all of it
    if (S > 1) {
        for (int idx = threadIdx.x; idx < PER_WARP; idx += blockDim.x) {
            float v = 0.0f;
            for (int wi = 0; wi < nwarps; ++wi) v += red[wi * PER_WARP + idx];
            sums[idx] = v;
        }
        cluster_sync();
    }
    const float gs = *g_ptr * 16384.0f;
    const int share = PER_WARP / S, i0 = S > 1 ? (int)(blockIdx.x % S) * share : 0;
    for (int idx = i0 + threadIdx.x; idx < i0 + share; idx += blockDim.x) {
        float v = 0.0f;
        if (S > 1) {
            for (int rank = 0; rank < S; ++rank) v += cluster_load(sums + idx, rank);  // in split order
        } else {
            for (int wi = 0; wi < nwarps; ++wi) v += red[wi * PER_WARP + idx];
        }
        const int l = idx & 31, e = (idx >> 5) & 3, rj = idx >> 7, j = rj % NT, r = rj / NT;
        const int row = (tile0 + r) * 16 + (l >> 2) + 8 * (e >> 1);
        const int tok = tok0 + 8 * j + 2 * (l & 3) + (e & 1);
        if (row < n && tok < m) {
            v *= gs;
            if (bias) v += to_float(bias[row]);
            y[(i64)tok * n + row] = from_float<T>(v);
        }
    }
    if (S > 1) cluster_sync();  // no block leaves while the others may read its sums
#endif
}

// Grouped (a MoE block's experts; grouped_passes in w4a16_decode.cuh): grid (blocks sharing an
// expert's rows, row tiles, experts or rows), passes of 8 * NT rows until the expert's rows are
// done, so the grid needs no count from the host.
template <bool BF16, int NT, int U>
__device__ void w4a16_grouped(const u64* table, const i64* expert_of_row, const int* offsets,
                              const typename Act<BF16>::T* x, typename Act<BF16>::T* y, int experts, int by_row, int n,
                              int k) {
    grouped_passes(table, expert_of_row, offsets, x, y, experts, by_row, n, k, 8 * NT,
                   [&](const uint4* wq, const unsigned short* sq, const typename Act<BF16>::T* xs,
                       typename Act<BF16>::T* ys, const typename Act<BF16>::T* bias, const float* g, int m) {
                       w4a16_body<BF16, 1, NT, U>(wq, sq, xs, ys, bias, g, m, n, k);
                   });
}
#define W4A16_GROUPED(NT, U, W)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * W, min_blocks(1, NT, U, W)) w4a16_grouped_nt##NT##_f16(  \
        const u64* table, const i64* expert_of_row, const int* offsets, const __half* x, __half* y, int experts, \
        int by_row, int n, int k) {                                                                         \
        w4a16_grouped<false, NT, U>(table, expert_of_row, offsets, x, y, experts, by_row, n, k);            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * W, min_blocks(1, NT, U, W)) w4a16_grouped_nt##NT##_bf16( \
        const u64* table, const i64* expert_of_row, const int* offsets, const __nv_bfloat16* x,              \
        __nv_bfloat16* y, int experts, int by_row, int n, int k) {                                          \
        w4a16_grouped<true, NT, U>(table, expert_of_row, offsets, x, y, experts, by_row, n, k);             \
    }

// Clusters of S blocks along x for the split-K kernels (none for S = 1, or before sm_90)
#define W4A16_CLUSTER_1
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define W4A16_CLUSTER_2 __cluster_dims__(2, 1, 1)
#define W4A16_CLUSTER_4 __cluster_dims__(4, 1, 1)
#define W4A16_CLUSTER_8 __cluster_dims__(8, 1, 1)
#else
#define W4A16_CLUSTER_2
#define W4A16_CLUSTER_4
#define W4A16_CLUSTER_8
#endif
#define W4A16_KERNELS(RT, NT, U, W, S, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * W, min_blocks(RT, NT, U, W)) W4A16_CLUSTER_##S    \
    NAME##_f16(const uint4* wq, const unsigned short* sq, const __half* x, __half* y, const __half* bias,     \
               const float* g, int m, int n, int k) {                                                          \
        w4a16_body<false, RT, NT, U, S>(wq, sq, x, y, bias, g, m, n, k);                                       \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * W, min_blocks(RT, NT, U, W)) W4A16_CLUSTER_##S     \
    NAME##_bf16(const uint4* wq, const unsigned short* sq, const __nv_bfloat16* x, __nv_bfloat16* y,          \
                const __nv_bfloat16* bias, const float* g, int m, int n, int k) {                              \
        w4a16_body<true, RT, NT, U, S>(wq, sq, x, y, bias, g, m, n, k);                                        \
    }
#define W4A16(RT, NT, U) W4A16_KERNELS(RT, NT, U, 16, 1, w4a16_rt##RT##_nt##NT##_u##U)
#define W4A16_W4(RT, NT, U) W4A16_KERNELS(RT, NT, U, 4, 1, w4a16_rt##RT##_nt##NT##_u##U##_w4)
#define W4A16_SPLIT(RT, NT, U, S) W4A16_KERNELS(RT, NT, U, 16, S, w4a16_rt##RT##_nt##NT##_u##U##_s##S)

// (RT, NT, U), at most 16 or 4 warps a block: keep in step with mma_plan.VARIANTS
W4A16(1, 1, 2)
W4A16(1, 1, 4)
W4A16(2, 1, 2)
W4A16(4, 1, 1)
W4A16(1, 2, 2)
W4A16(2, 2, 1)
W4A16(4, 2, 1)
W4A16(1, 4, 1)
W4A16(2, 4, 1)
W4A16(1, 8, 1)
W4A16_W4(1, 1, 2)
W4A16_W4(1, 2, 1)
W4A16_W4(2, 1, 1)
// split K over clusters of S blocks: keep in step with mma_plan.SPLIT_VARIANTS and SPLITS
W4A16_SPLIT(1, 1, 2, 2)
W4A16_SPLIT(1, 1, 2, 4)
W4A16_SPLIT(1, 1, 2, 8)
W4A16_SPLIT(1, 2, 2, 2)
W4A16_SPLIT(1, 2, 2, 4)
W4A16_SPLIT(1, 2, 2, 8)
W4A16_SPLIT(1, 4, 1, 2)
W4A16_SPLIT(1, 4, 1, 4)
W4A16_SPLIT(1, 4, 1, 8)
// grouped (NT, U, most warps): passes of 8, 16 and 32 rows (cuda_grouped.pass_tokens; 64: the tiled kernel)
W4A16_GROUPED(1, 2, 4)
W4A16_GROUPED(2, 1, 4)
W4A16_GROUPED(4, 1, 16)
