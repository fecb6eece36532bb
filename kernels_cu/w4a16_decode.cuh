// w4a16_decode.cuh - the in-register decode shared by the W4A16 kernels (w4a16.cu, w4a16_wgmma.cu, w4a16_tiled.cu):
// 8 repacked E2M1 codes -> the 4 A registers of one m16n8k16 fragment (see prepare.cu for the
// nibble order), the block-scale multiply that makes them e2m1 * s * 2^-14 exactly, and where a
// tile's chunk lies in the repack.
#pragma once
#include "common.cuh"

// The repack's order of 16-row tiles (prepare.cu): in pairs, chunk c of tiles 2p and 2p + 1 side
// by side, so that a block's two row tiles come from one stretch of memory (H200, session 16: the
// two-tile kernels 2-4% faster than with each tile's chunks in one run, bf16 at M=16 7-9%, whose
// addressing then fits 64 registers without spills). A slot is one chunk of one tile: 32 uint4 of
// codes (lane l's at 32 slot + l), 32 unsigned shorts of scale codes; chunk c of a tile is its
// chunk 0's slot + W4_PAIR c.
#define W4_PAIR 2
__device__ __forceinline__ i64 w4_slot(i64 tile, int nchunks) {
    return tile / W4_PAIR * nchunks * W4_PAIR + tile % W4_PAIR;
}

template <bool BF16> struct Act;
template <> struct Act<false> { typedef __half T; };
template <> struct Act<true> { typedef __nv_bfloat16 T; };

// 8 codes (repacked order) -> A registers {H0, H1, H2, H3}, before the scale.
__device__ __forceinline__ void decode_f16(u32 u, u32 (&a)[4]) {
    // fp16 high bytes (sign at bit 7, magnitude at bits 1-3) of the codes in the low / high nibbles
    const u32 lo = ((u << 1) & 0x0E0E0E0Eu) | ((u << 4) & 0x80808080u);
    const u32 hi = ((u >> 3) & 0x0E0E0E0Eu) | (u & 0x80808080u);
    a[0] = __byte_perm(lo, 0u, 0x2404);
    a[1] = __byte_perm(lo, 0u, 0x3414);
    a[2] = __byte_perm(hi, 0u, 0x2404);
    a[3] = __byte_perm(hi, 0u, 0x3414);
}

__device__ __forceinline__ void decode_bf16(u32 u, u32 (&a)[4]) {
    // a nibble n at bits 0-3 (and 16-19): n * (2^6 + 2^12) puts its magnitude at bits 6-8 and its sign at 15
    a[0] = ((u & 0x000F000Fu) * 0x1040u) & 0x81C081C0u;
    a[1] = (((u >> 8) & 0x000F000Fu) * 0x1040u) & 0x81C081C0u;
    a[2] = (((u >> 4) & 0x000F000Fu) * 0x1040u) & 0x81C081C0u;
    a[3] = (((u >> 12) & 0x000F000Fu) * 0x1040u) & 0x81C081C0u;
}

template <bool BF16> __device__ __forceinline__ u32 scale_pair(u32 code) {
    return BF16 ? code * 0x00100010u + 0x70007000u : code * 0x00800080u;
}

// bf16 arithmetic and MMAs need sm_80; on sm_75 the bf16 kernels trap before they get here.
template <bool BF16> __device__ __forceinline__ u32 mul2(u32 a, u32 b) {
    u32 d = 0;
    if (BF16) {
#if __CUDA_ARCH__ >= 800
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));  // + -0: exact
#else
        __trap();
#endif
    } else {
        asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    }
    return d;
}

// c += A (16 x 16, a[0..3]) x B (16 x 8, b0: k 0-7, b1: k 8-15). sm_75 (Turing) has no m16n8k16: it
// runs the two halves of K as m16n8k8, whose A fragments are {a[0], a[1]} and {a[2], a[3]}.
template <bool BF16> __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16) {
#if __CUDA_ARCH__ >= 800
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
        __trap();
#endif
    } else {
#if __CUDA_ARCH__ >= 800
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(b0));
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
    }
}

// The grouped launches (a MoE block's experts: w4a16.cu, w4a16_tiled.cu). x's rows are sorted by
// expert, expert e's the rows offsets[e] .. offsets[e + 1] - 1, its weight, scale codes, global
// scale and bias (or 0) at table[4e .. 4e + 3]. Grid z = experts, or, where x has fewer rows than
// there are experts (by_row), rows: block z then runs the expert whose first row z is, the others
// none. Grid x: blocks that share an expert's rows, block x taking rows [x * width, (x + 1) * width)
// of every gridDim.x * width (the bodies pick their rows by blockIdx.x: tok0 = blockIdx.x * width),
// so an expert of many rows runs its passes side by side (and they read its weight through L2)
// rather than one after another. The rows go to pass(wq, sq, x, y, bias, g, rows), a kernel body;
// a block with no rows left returns. Rows of experts >= experts (another rank's) are neither read
// nor written.
template <typename T, typename Pass>
__device__ __forceinline__ void grouped_passes(const u64* __restrict__ table, const i64* __restrict__ expert_of_row,
                                               const int* __restrict__ offsets, const T* x, T* y, int experts,
                                               int by_row, int n, int k, int width, Pass pass) {
    const int e = by_row ? (int)expert_of_row[blockIdx.z] : (int)blockIdx.z;
    if (e >= experts || (by_row && offsets[e] != (int)blockIdx.z)) return;
    const int lo = offsets[e], m = offsets[e + 1] - lo;
    const u64* w = table + 4 * e;
    const int step = (int)gridDim.x * width;
    for (int t0 = 0; t0 + (int)blockIdx.x * width < m; t0 += step) {
        if (t0) __syncthreads();  // the last pass is done with shared memory
        pass(reinterpret_cast<const uint4*>(w[0]), reinterpret_cast<const unsigned short*>(w[1]), x + (i64)(lo + t0) * k,
             y + (i64)(lo + t0) * n, reinterpret_cast<const T*>(w[3]), reinterpret_cast<const float*>(w[2]), m - t0);
    }
}
