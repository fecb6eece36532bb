// w4a16_tiled.cu - y[M, N] = x[M, K] @ W^T * g (+ bias) for 33-128 tokens on sm_80+ GPUs
// (mma.sync.m16n8k16; Hopper takes w4a16_wgmma.cu but for weights of at most 8 Mi values) and, for
// fp16 x, on sm_75 (each MMA as two m16n8k8, w4a16_decode.cuh), W repacked by prepare.cu, x fp16 or
// bf16, FP32 accumulation, y in x's type.
//
// A block is 8 warps over 256 rows of W (a pair of 16-row tiles a warp) and 64 tokens. Each chunk
// of 64 K values, the block's x tile and its 16 row tiles' codes and scale codes, is copied into
// shared memory (cp.async, a ring of TILED_STAGES chunks). x is read there by all 8 warps, so each
// x byte crosses L2 once a 256 rows (w4a16.cu's warps split K and each reads x for its own rows),
// and each 16-byte x read feeds four MMAs. Each warp decodes its tiles' chunk in registers once
// (w4a16_decode.cuh: 8 codes -> one A fragment, times the block scale) and multiplies it with all
// 8 token tiles. Lane 4g + q reads x[token 8j + g][16q .. 16q + 15] of the chunk (the repack's K
// order), the two 16-byte halves at a position XORed with the token's parity, so that the eight
// lanes of each quarter-warp read 8 distinct 16-byte columns (no bank conflicts).
//
// Grid: (token tiles of 64 times K splits of chunks_per_split chunks, the split varying fastest;
// row blocks of 256), so that the blocks of one row block run side by side and read its weights
// from memory once. With one split the block scales, adds the bias, rounds and stores y; with S
// splits split s stores its FP32 sums in ws[s][M][N] and w4a16_tiled_finish adds them in split
// order (deterministic), then scales, adds and rounds; on sm_90+ it is launched as a programmatic
// dependent, so its launch overlaps the main kernel's end.
// w4a16_tiled_grouped_{f16,bf16}: a MoE block's experts in one launch (grouped_passes in
// w4a16_decode.cuh), grid (blocks sharing an expert's rows, row blocks, experts or rows), passes
// of 64 rows until the expert's rows are done, K not split.
#include "w4a16_decode.cuh"

#define TILED_WARPS 8
#define TILED_NT 8      // token tiles of 8 a block: 64 tokens
#define TILED_RT 2      // row tiles of 16 a warp (a repack pair): each x fragment feeds two MMAs
#define TILED_STAGES 3  // chunks in the ring, two in flight (H200: as fast as 6, and 52 KB fit any sm_80+)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define TILED_BLOCKS_A_SM 1  // sm_75: 64 KB of shared memory a SM, one block's 52 KB
#else
#define TILED_BLOCKS_A_SM 2
#endif

template <bool BF16>
__device__ void w4a16_tiled_body(const uint4* __restrict__ wq, const unsigned short* __restrict__ sq,
                                 const typename Act<BF16>::T* __restrict__ x, typename Act<BF16>::T* __restrict__ y,
                                 float* __restrict__ ws, const typename Act<BF16>::T* __restrict__ bias,
                                 const float* __restrict__ g_ptr, int m, int n, int k, int chunks_per_split) {
    typedef typename Act<BF16>::T T;
#if __CUDA_ARCH__ < 750
    __trap();  // mma.sync needs sm_75; fp4cupy.linear takes the dequantize path on older GPUs
#else
    if (BF16 && __CUDA_ARCH__ < 800) {  // bf16 MMAs need sm_80 (fp4cupy.linear: the dequantize path)
        __trap();
        return;
    }
    // a stage: x (BM token rows of 128 bytes), the codes of the block's 16 row tiles (8 pairs of
    // 1 KB, as in the repack), their scale codes (8 pairs of 128 bytes)
    constexpr int NT = TILED_NT, RT = TILED_RT, STAGES = TILED_STAGES;
    constexpr int BM = 8 * NT, TILES = TILED_WARPS * RT, X_BYTES = BM * 128, W_BYTES = TILES * 512;
    constexpr int STAGE_BYTES = X_BYTES + W_BYTES + TILES * 64, THREADS = TILED_WARPS * 32;
    extern __shared__ __align__(16) unsigned char smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int nchunks = k >> 6, splits = (nchunks + chunks_per_split - 1) / chunks_per_split;
    const int split = blockIdx.x % splits, tok0 = blockIdx.x / splits * BM, row_block = blockIdx.y;
    const int c_lo = split * chunks_per_split, c_hi = min(nchunks, c_lo + chunks_per_split);

    // The copies of one chunk: f(i, shared address, source, source bytes: 16, or 0 for zeros) for
    // this thread's 16-byte units i < COPIES. x: column u of token row r to (r, u ^ (r & 1)); tokens
    // past M are zeros. Codes: unit i (of 64 a pair) of pair i / 64, RT units a thread (16 tiles x
    // 512 bytes over 256 threads); scale codes: unit i (of 8 a pair) of pair i / 8, one a thread of
    // the first TILES * 4. Pairs past the repack's (tiles are allocated in fours) are clamped.
    constexpr int X_COPIES = BM * 8 / THREADS, COPIES = X_COPIES + RT + 1;
    const u32 base = (u32)__cvta_generic_to_shared(smem);
    const int pairs = (n + 63) >> 6 << 1, pair0 = row_block * (TILES / 2);
    auto chunk_copies = [&](int c, auto f) {
        const u32 dst = base + (c % STAGES) * STAGE_BYTES;
#pragma unroll
        for (int it = 0; it < X_COPIES; ++it) {
            const int i = it * THREADS + threadIdx.x, r = i >> 3, u = i & 7, tok = tok0 + r;
            const T* src = x + (i64)(tok < m ? tok : 0) * k + c * 64 + u * 8;
            f(it, dst + r * 128 + ((u ^ (r & 1)) << 4), src, tok < m ? 16 : 0);
        }
#pragma unroll
        for (int it = 0; it < RT; ++it) {
            const int i = it * THREADS + threadIdx.x, pair = min(pair0 + (i >> 6), pairs - 1);
            f(X_COPIES + it, dst + X_BYTES + i * 16,
              reinterpret_cast<const char*>(wq) + ((i64)pair * nchunks + c) * 1024 + (i & 63) * 16, 16);
        }
        if (threadIdx.x < TILES * 4) {
            const int i = threadIdx.x, pair = min(pair0 + (i >> 3), pairs - 1);
            f(COPIES - 1, dst + X_BYTES + W_BYTES + i * 16,
              reinterpret_cast<const char*>(sq) + ((i64)pair * nchunks + c) * 128 + (i & 7) * 16, 16);
        }
    };
#if __CUDA_ARCH__ >= 800
    // sm_80+: cp.async, two chunks in flight while one is computed on
    auto copy_chunk = [&](int c) {
        chunk_copies(c, [&](int, u32 dst, const void* src, int bytes) { cp_async16(dst, src, bytes); });
    };
#else
    // sm_75 (no cp.async): a chunk's units are loaded into registers (held) before the chunk two
    // ahead of it is computed on, and stored to shared memory after
    uint4 held[COPIES];
    auto load_chunk = [&](int c) {
        chunk_copies(c, [&](int i, u32, const void* src, int bytes) {
            held[i] = bytes ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0u, 0u, 0u, 0u);
        });
    };
    auto store_chunk = [&](int c) {
        chunk_copies(c, [&](int i, u32 dst, const void*, int) {
            asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst), "r"(held[i].x), "r"(held[i].y),
                         "r"(held[i].z), "r"(held[i].w) : "memory");
        });
    };
    auto copy_chunk = [&](int c) { load_chunk(c), store_chunk(c); };
#endif
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (c_lo + s < c_hi) copy_chunk(c_lo + s);
        cp_async_commit();
    }

    float acc[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[r][j][0] = acc[r][j][1] = acc[r][j][2] = acc[r][j][3] = 0.0f;
    // in a stage: this lane's x row of a token tile, the XOR of its 16-byte columns (the row's
    // parity), its 16 bytes of the warp's first tile's codes and its scale codes (rows g, g + 8)
    const int x_lane = g * 128, x_swz = g & 1;
    const int w_lane = X_BYTES + warp * RT * 512 + lane * 16;
    const int s_lane = X_BYTES + W_BYTES + warp * RT * 64 + (q * 8 + g) * 2;

    auto compute = [&](int c) {
        const unsigned char* stage = smem + (c % STAGES) * STAGE_BYTES;
        uint4 w[RT];
        u32 s_lo[RT], s_hi[RT];
#pragma unroll
        for (int r = 0; r < RT; ++r) {
            w[r] = *reinterpret_cast<const uint4*>(stage + w_lane + r * 512);
            const u32 s = *reinterpret_cast<const unsigned short*>(stage + s_lane + r * 64);
            s_lo[r] = scale_pair<BF16>(s & 0xFFu), s_hi[r] = scale_pair<BF16>(s >> 8);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // K steps 2h and 2h + 1 use x's 16-byte column 2q + h
            u32 a[RT][2][4];
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const u32 word = h ? (t ? w[r].w : w[r].z) : (t ? w[r].y : w[r].x);
                    if (BF16) decode_bf16(word, a[r][t]); else decode_f16(word, a[r][t]);
                    a[r][t][0] = mul2<BF16>(a[r][t][0], s_lo[r]), a[r][t][1] = mul2<BF16>(a[r][t][1], s_hi[r]);
                    a[r][t][2] = mul2<BF16>(a[r][t][2], s_lo[r]), a[r][t][3] = mul2<BF16>(a[r][t][3], s_hi[r]);
                }
            const unsigned char* col = stage + x_lane + (((2 * q + h) ^ x_swz) << 4);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const uint4 xb = *reinterpret_cast<const uint4*>(col + j * 1024);
#pragma unroll
                for (int r = 0; r < RT; ++r) {
                    mma<BF16>(acc[r][j], a[r][0], xb.x, xb.y);
                    mma<BF16>(acc[r][j], a[r][1], xb.z, xb.w);
                }
            }
        }
    };
    for (int c = c_lo; c < c_hi; ++c) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of chunk c
        __syncthreads();               // everyone's, and chunk c - 1's slot is free again
        const bool ahead = c + STAGES - 1 < c_hi;
#if __CUDA_ARCH__ >= 800
        if (ahead) copy_chunk(c + STAGES - 1);
        cp_async_commit();
        compute(c);
#else
        if (ahead) load_chunk(c + STAGES - 1);
        compute(c);
        if (ahead) store_chunk(c + STAGES - 1);
#endif
    }
    cp_async_wait<0>();
    launch_dependents();  // the finish kernel's blocks may be scheduled (sm_90+); they wait for y's sums

    // accumulator e of row tile r, token tile j: row (tile) * 16 + g + 8 (e >> 1), token 8j + 2q + (e & 1)
    const float gs = *g_ptr * 16384.0f;
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = ((row_block * TILED_WARPS + warp) * RT + r) * 16 + g + 8 * (e >> 1);
                const int tok = tok0 + 8 * j + 2 * q + (e & 1);
                if (row >= n || tok >= m) continue;
                if (splits > 1) {
                    ws[((i64)split * m + tok) * n + row] = acc[r][j][e];
                } else {
                    float v = acc[r][j][e] * gs;
                    if (bias) v += to_float(bias[row]);
                    y[(i64)tok * n + row] = from_float<T>(v);
                }
            }
#endif
}

// y[tok][row] = round(sum over the S splits of ws[s][tok][row], in split order, * g * 2^14 + bias)
template <bool BF16>
__device__ void w4a16_tiled_finish_body(const float* __restrict__ ws, typename Act<BF16>::T* __restrict__ y,
                                        const typename Act<BF16>::T* __restrict__ bias, const float* __restrict__ g_ptr,
                                        int m, int n, int splits) {
    grid_dependency_wait();  // launched as a programmatic dependent of the main kernel (sm_90+)
    const i64 total = (i64)m * n;
    const float gs = *g_ptr * 16384.0f;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < splits; ++s) v += ws[s * total + i];
        v *= gs;
        if (bias) v += to_float(bias[i % n]);
        y[i] = from_float<typename Act<BF16>::T>(v);
    }
}

extern "C" __global__ void __launch_bounds__(TILED_WARPS * 32, TILED_BLOCKS_A_SM)
w4a16_tiled_f16(const uint4* wq, const unsigned short* sq, const __half* x, __half* y, float* ws, const __half* bias,
                const float* g, int m, int n, int k, int cps) {
    w4a16_tiled_body<false>(wq, sq, x, y, ws, bias, g, m, n, k, cps);
}
extern "C" __global__ void __launch_bounds__(TILED_WARPS * 32, TILED_BLOCKS_A_SM)
w4a16_tiled_bf16(const uint4* wq, const unsigned short* sq, const __nv_bfloat16* x, __nv_bfloat16* y, float* ws,
                 const __nv_bfloat16* bias, const float* g, int m, int n, int k, int cps) {
    w4a16_tiled_body<true>(wq, sq, x, y, ws, bias, g, m, n, k, cps);
}

template <bool BF16>
__device__ void w4a16_tiled_grouped(const u64* table, const i64* expert_of_row, const int* offsets,
                                    const typename Act<BF16>::T* x, typename Act<BF16>::T* y, int experts, int by_row,
                                    int n, int k) {
    grouped_passes(table, expert_of_row, offsets, x, y, experts, by_row, n, k, 8 * TILED_NT,
                   [&](const uint4* wq, const unsigned short* sq, const typename Act<BF16>::T* xs,
                       typename Act<BF16>::T* ys, const typename Act<BF16>::T* bias, const float* g, int m) {
                       w4a16_tiled_body<BF16>(wq, sq, xs, ys, nullptr, bias, g, m, n, k, k >> 6);  // K not split
                   });
}
extern "C" __global__ void __launch_bounds__(TILED_WARPS * 32, TILED_BLOCKS_A_SM)
w4a16_tiled_grouped_f16(const u64* table, const i64* expert_of_row, const int* offsets, const __half* x, __half* y,
                        int experts, int by_row, int n, int k) {
    w4a16_tiled_grouped<false>(table, expert_of_row, offsets, x, y, experts, by_row, n, k);
}
extern "C" __global__ void __launch_bounds__(TILED_WARPS * 32, TILED_BLOCKS_A_SM)
w4a16_tiled_grouped_bf16(const u64* table, const i64* expert_of_row, const int* offsets, const __nv_bfloat16* x,
                         __nv_bfloat16* y, int experts, int by_row, int n, int k) {
    w4a16_tiled_grouped<true>(table, expert_of_row, offsets, x, y, experts, by_row, n, k);
}

extern "C" __global__ void w4a16_tiled_finish_f16(const float* ws, __half* y, const __half* bias, const float* g,
                                                  int m, int n, int splits) {
    w4a16_tiled_finish_body<false>(ws, y, bias, g, m, n, splits);
}
extern "C" __global__ void w4a16_tiled_finish_bf16(const float* ws, __nv_bfloat16* y, const __nv_bfloat16* bias,
                                                   const float* g, int m, int n, int splits) {
    w4a16_tiled_finish_body<true>(ws, y, bias, g, m, n, splits);
}
