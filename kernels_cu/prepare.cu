// prepare.cu - repack an NVFP4 weight [N, K] (canonical FP4Tensor layout) into the layout that
// w4a16.cu streams. fp4cupy/prepared.py holds the numpy twin of both kernels and documents the layout.
//
// Codes: u32 [N/32 tile pairs][K/64 chunks][2 row tiles][32 lanes][4 k-tiles] (w4_slot in
// w4a16_decode.cuh: chunk c of both tiles of a pair side by side). Lane l = 4g + q of a warp gets,
// for k-tile t, the 8 codes of its mma.m16n8k16 A fragment over rows r = 16*tile + g and r + 8 and
// columns c = 64*chunk + 16q + 4t + {0,1,2,3} (the kernel permutes K the same way for x):
//   H0 = (W[r][c], W[r][c+1]),   H1 = (W[r+8][c], W[r+8][c+1]),
//   H2 = (W[r][c+2], W[r][c+3]), H3 = (W[r+8][c+2], W[r+8][c+3]),
// with nibbles placed so that both decodes are short:
//   H0.lo bits 0-3, H0.hi 16-19, H1.lo 8-11, H1.hi 24-27, H2.lo 4-7, H2.hi 20-23, H3.lo 12-15, H3.hi 28-31.
// A block whose scale is 0 gets codes 0 (value 0 whatever its codes said).
// Scales: u8 [N/32][K/64][2][4 (q)][8 (g)][2 (r, r+8)] in the codes' slots, one per 16 columns
// (64 chunk + 16 q ..), as the "fp16 code" of the E4M3 value s: the bits 7..14 of s as an fp16
// (every E4M3 value is a normal fp16, 3 mantissa bits), so that fp16 bits = code << 7 and bf16
// bits of s * 2^112 = (code << 4) + 0x7000. NaN stays NaN.
#include "w4a16_decode.cuh"

__device__ __forceinline__ u32 nibble(const u8* row, int i) { return (row[i >> 1] >> (4 * (i & 1))) & 15u; }

__device__ __forceinline__ u32 scale_byte(const u8* scales, int n, int kg, int r, int col, int gs) {
    return r < n ? scales[(i64)r * kg + col / gs] : 0u;
}

// The tile and chunk of repack slot ``slot`` (the inverse of w4_slot(tile, nchunks) + W4_PAIR chunk).
struct Slot {
    i64 tile;
    int chunk;
    __device__ Slot(i64 slot, int nchunks) {
        const i64 rest = slot / W4_PAIR;
        tile = rest / nchunks * W4_PAIR + slot % W4_PAIR;
        chunk = (int)(rest % nchunks);
    }
};

// Which rows and columns the lane slot ``idx`` of the code layout holds: rows r0 and r0 + 8,
// columns col .. col + 15 (idx = 32 slot + lane, lane = 4g + q).
struct LaneSlot {
    int r0, col;
    __device__ LaneSlot(i64 idx, int k) {
        const int lane = (int)(idx & 31);
        const Slot at(idx >> 5, k / 64);
        r0 = (int)(at.tile * 16) + (lane >> 2);
        col = at.chunk * 64 + 16 * (lane & 3);
    }
};

extern "C" __global__ void w4_repack_codes(const u8* __restrict__ data, const u8* __restrict__ scales,
                                           uint4* __restrict__ out, int n, int k, int gs, i64 total) {
    const i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const LaneSlot at(idx, k);
    const int r0 = at.r0, r1 = at.r0 + 8, col = at.col;
    const int kg = k / gs;
    u8 a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    // 16 codes of each row (8 bytes), zero where the row is padding or its block scale is 0
    if (r0 < n && (scale_byte(scales, n, kg, r0, col, gs) & 0x7F) != 0)
        *reinterpret_cast<uint2*>(a) = *reinterpret_cast<const uint2*>(data + (i64)r0 * (k / 2) + col / 2);
    if (r1 < n && (scale_byte(scales, n, kg, r1, col, gs) & 0x7F) != 0)
        *reinterpret_cast<uint2*>(b) = *reinterpret_cast<const uint2*>(data + (i64)r1 * (k / 2) + col / 2);
    u32 w[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const int c = 4 * t;
        w[t] = nibble(a, c) | nibble(a, c + 1) << 16 | nibble(b, c) << 8 | nibble(b, c + 1) << 24 |
               nibble(a, c + 2) << 4 | nibble(a, c + 3) << 20 | nibble(b, c + 2) << 12 | nibble(b, c + 3) << 28;
    }
    out[idx] = make_uint4(w[0], w[1], w[2], w[3]);
}

// E4M3 bits -> fp16 code (bits 7..14 of the value as an fp16). Negative scales are rejected on the host.
__device__ __forceinline__ u32 e4m3_to_f16_code(u32 b) {
    if ((b & 0x7Fu) == 0x7Fu) return 0xFFu;  // NaN
    const float s = fp4_e4m3_decode(b & 0x7Fu);
    return ((u32)__half_as_ushort(__float2half_rn(s)) >> 7) & 0xFFu;  // exact: s has 4 significant bits
}

extern "C" __global__ void w4_repack_scales(const u8* __restrict__ scales, u8* __restrict__ out,
                                            int n, int k, int gs, i64 total) {
    const i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int j = (int)(idx & 15), q = (int)((idx >> 4) & 3);  // idx = (4 slot + q) * 16 + j
    const Slot at(idx >> 6, k / 64);
    const int r = (int)(at.tile * 16) + (j >> 1) + 8 * (j & 1);
    out[idx] = (u8)e4m3_to_f16_code(scale_byte(scales, n, k / gs, r, at.chunk * 64 + q * 16, gs));
}

// The inverses, for exporting a weight held only in the repacked form (codes of zero-scale blocks
// come back as 0, which is what fp4cupy's quantizer writes there anyway).
extern "C" __global__ void w4_unrepack_codes(const uint4* __restrict__ codes, u8* __restrict__ data,
                                             int n, int k, i64 total) {
    const i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const LaneSlot at(idx, k);
    const int r0 = at.r0, r1 = at.r0 + 8, col = at.col;
    const uint4 v = codes[idx];
    const u32 w[4] = {v.x, v.y, v.z, v.w};
    u32 a[2] = {0, 0}, b[2] = {0, 0};  // 16 codes of rows r0 and r1, element 2i in the low nibble
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const u32 u = w[t];
        const u32 ra = (u & 15u) | ((u >> 16) & 15u) << 4 | ((u >> 4) & 15u) << 8 | ((u >> 20) & 15u) << 12;
        const u32 rb = ((u >> 8) & 15u) | ((u >> 24) & 15u) << 4 | ((u >> 12) & 15u) << 8 | ((u >> 28) & 15u) << 12;
        a[t >> 1] |= ra << (16 * (t & 1));
        b[t >> 1] |= rb << (16 * (t & 1));
    }
    if (r0 < n) *reinterpret_cast<uint2*>(data + (i64)r0 * (k / 2) + col / 2) = make_uint2(a[0], a[1]);
    if (r1 < n) *reinterpret_cast<uint2*>(data + (i64)r1 * (k / 2) + col / 2) = make_uint2(b[0], b[1]);
}

extern "C" __global__ void w4_unrepack_scales(const u8* __restrict__ scale_codes, u8* __restrict__ scales,
                                              int n, int k, int gs, i64 total) {
    const i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x;  // one per (row, group)
    if (idx >= total) return;
    const int kg = k / gs;
    const int r = (int)(idx / kg), grp = (int)(idx % kg);
    const int tile = r / 16, within = r % 16, g = within % 8, half = within / 8, grp16 = grp * (gs / 16);
    const i64 slot = w4_slot(tile, k / 64) + W4_PAIR * (grp16 / 4);
    const u32 c = scale_codes[((slot * 4 + grp16 % 4) * 8 + g) * 2 + half];
    scales[idx] = c == 0xFFu ? 0x7Fu : (u8)fp4_e4m3_encode(__half2float(__ushort_as_half((unsigned short)(c << 7))));
}
