// quantize.cu - FP4 quantization kernels, bit-exact with fp4cupy/reference.py.
//
// fp4_amax_<dtype>:                 max|x| over finite x and the NaN/Inf count, into status[].
// <fmt>_quantize_g<GS>_<dtype>:     a thread takes blocks of GS elements along the flat input,
//                                   grid-stride (K is a multiple of GS: blocks never straddle rows).
// NVFP4 takes its global scale g from g_given when > 0 (one pass) or from status' amax (g = amax/2688, 1 if 0),
// and writes g to g_out. A block holding NaN/Inf gets a NaN scale and zero codes, and is counted
// when count_bad is set, so a graph-captured launch never emits finite codes for NaN.
// Either kernel given a host pointer publishes status[0..2] there when it is done (publish_status).
#include "common.cuh"

enum { RULE_NVFP4 = 0, RULE_MX_FLOOR = 1, RULE_MX_RCEIL = 2, RULE_MX_ROUND = 3 };

template <typename T> struct is_bf16 { static constexpr bool value = false; };
template <> struct is_bf16<__nv_bfloat16> { static constexpr bool value = true; };

// |x| as bit patterns: a word holds two 16-bit lanes or one float; join keeps the maximum per
// lane. Bit patterns of non-negative values order like the values; NaN/Inf lie at or above
// NONFINITE, above every finite one.
template <typename T> struct AbsBits {
    static constexpr u32 NONFINITE = sizeof(T) == 4 ? 0x7F800000u : is_bf16<T>::value ? 0x7F80u : 0x7C00u;
    static __device__ __forceinline__ u32 word(u32 w) { return w & (sizeof(T) == 4 ? 0x7FFFFFFFu : 0x7FFF7FFFu); }
    static __device__ __forceinline__ u32 join(u32 a, u32 b) { return sizeof(T) == 4 ? max(a, b) : __vmaxu2(a, b); }
    static __device__ __forceinline__ u32 max4(const uint4& u) {
        return join(join(word(u.x), word(u.y)), join(word(u.z), word(u.w)));
    }
    // the larger lane of a joined word, and its value as a float
    static __device__ __forceinline__ u32 top(u32 m) { return sizeof(T) == 4 ? m : max(m & 0xFFFFu, m >> 16); }
    static __device__ __forceinline__ float value(u32 b) {
        if (sizeof(T) == 4) return __uint_as_float(b);
        if (is_bf16<T>::value) return __uint_as_float(b << 16);
        return __half2float(__ushort_as_half((unsigned short)b));
    }
};

// max|x| over finite x and the NaN/Inf count, grid-stride with U 16-byte loads in flight a thread:
// the loop keeps only the maximum bit pattern; a thread whose maximum says NaN/Inf scans its
// elements again to count them and report the first.
template <typename T>
__device__ void amax_body(const T* __restrict__ x, i64 n, u64* status) {
    constexpr int PER = 16 / sizeof(T), U = 4;
    typedef AbsBits<T> B;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const i64 nvec = n / PER, stride = (i64)gridDim.x * blockDim.x, first = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    u32 bits = 0;
    for (i64 i = first; i < nvec; i += U * stride) {
        uint4 u[U];
#pragma unroll
        for (int k = 0; k < U; ++k) u[k] = i + k * stride < nvec ? __ldg(xv + i + k * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int k = 0; k < U; ++k) bits = B::join(bits, B::max4(u[k]));
    }
    float m = B::value(B::top(bits));
    u32 bad = 0;
    if (B::top(bits) >= B::NONFINITE) {  // rare: count and report, and take the maximum over finite x
        m = 0.0f;
        for (i64 i = first; i < nvec; i += stride) {
            float v[PER];
            load_floats<T, PER>(x + i * PER, v);
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                const float a = fabsf(v[j]);
                if (a <= 3.402823466e38f) m = fmaxf(m, a);
                else { ++bad; report_nonfinite(status, 0, (u64)(i * PER + j)); }
            }
        }
    }
    __shared__ float sm[32];
    __shared__ u32 sb[32];
    m = warp_max(m);
    bad = warp_sum(bad);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sm[warp] = m; sb[warp] = bad; }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        m = lane < nw ? sm[lane] : 0.0f;
        bad = lane < nw ? sb[lane] : 0u;
        m = warp_max(m);
        bad = warp_sum(bad);
        if (lane == 0) {
            atomicMax(&status[STATUS_AMAX], (u64)__float_as_uint(m));
            if (bad) atomicAdd(&status[STATUS_BAD], (u64)bad);
        }
    }
}

// A block of GS elements as raw 32-bit words: element i as float, and max|x| of the block.
template <typename T, int GS>
struct RawBlock {
    static constexpr int WORDS = GS * (int)sizeof(T) / 4;
    u32 w[WORDS];

    __device__ __forceinline__ void load(const T* __restrict__ p) {
#pragma unroll
        for (int i = 0; i < WORDS / 4; ++i) {
            const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
            w[4 * i] = u.x; w[4 * i + 1] = u.y; w[4 * i + 2] = u.z; w[4 * i + 3] = u.w;
        }
    }
    // The sign bits of elements 8v .. 8v+7, element j's at bit 4j + 3 (where its packed code keeps
    // it): PRMT gathers the bytes holding the signs, even elements into one word, odd into another.
    __device__ __forceinline__ u32 signs8(int v) const {
        u32 even, odd;
        if (sizeof(T) == 4) {  // element j is word 8v + j, its sign in byte 3
            const u32* p = w + 8 * v;
            even = __byte_perm(__byte_perm(p[0], p[2], 0x0073), __byte_perm(p[4], p[6], 0x0073), 0x5410);
            odd = __byte_perm(__byte_perm(p[1], p[3], 0x0073), __byte_perm(p[5], p[7], 0x0073), 0x5410);
        } else {  // elements 2i, 2i + 1 are word 4v + i, their signs in bytes 1 and 3
            const u32* p = w + 4 * v;
            const u32 lo = __byte_perm(p[0], p[1], 0x7351), hi = __byte_perm(p[2], p[3], 0x7351);
            even = __byte_perm(lo, hi, 0x5410);
            odd = __byte_perm(lo, hi, 0x7632);
        }
        return ((even >> 4) & 0x08080808u) | (odd & 0x80808080u);
    }
    __device__ __forceinline__ float value(int i) const {
        if (sizeof(T) == 4) return __uint_as_float(w[i]);
        const u32 h = w[i / 2];
        if (is_bf16<T>::value) return __uint_as_float(i & 1 ? h & 0xFFFF0000u : h << 16);
        return __half2float(__ushort_as_half((unsigned short)(i & 1 ? h >> 16 : h & 0xFFFFu)));
    }
    // max|x| as a float, and whether the block holds NaN/Inf
    __device__ __forceinline__ float absmax(bool& nonfinite) const {
        typedef AbsBits<T> B;
        u32 m = 0;
#pragma unroll
        for (int i = 0; i < WORDS; ++i) m = B::join(m, B::word(w[i]));
        nonfinite = B::top(m) >= B::NONFINITE;
        return B::value(B::top(m));
    }
};

// The E2M1 magnitude index of r (0..7) in the low 3 bits of the result (bits 3..22 zero, the bits
// above junk). The FMA rounding of fp4_e2m1_index with m and the offset made by integer ops from
// the exponent e = 127 + k of a = min(|r|, 6) (k = 0, 1, 2 for a < 2, < 4, <= 6): a * 2^(1-k) +
// 2^23 + 2k rounds a * 2^(1-k) to an integer (RNE; ties stay even as 2k is even) and adds 2k.
__device__ __forceinline__ u32 e2m1_index_bits(float r) {
    const float a = fminf(fabsf(r), 6.0f);
    const u32 e = max(__float_as_uint(a) >> 23, 127u);
    const float m = __uint_as_float((255u - e) << 23);
    const float c = __uint_as_float(0x4B000000u - 254u + 2u * e);
    return __float_as_uint(__fmaf_rn(a, m, c));
}

// 8 indices (low bits of f[0..7]) packed into one word, element 0 in the lowest nibble.
__device__ __forceinline__ u32 pack8(const u32 (&f)[8]) {
    const u32 p0 = f[0] + (f[1] << 4), p1 = f[2] + (f[3] << 4), p2 = f[4] + (f[5] << 4), p3 = f[6] + (f[7] << 4);
    return __byte_perm(__byte_perm(p0, p1, 0x0040), __byte_perm(p2, p3, 0x0040), 0x5410);
}

// The block's codes packed into words (element 0 in the lowest nibble), element i encoded from
// scaled(x_i), x_i over the block scale; the sign bits are x's (signs8).
template <typename T, int GS, typename Scaled>
__device__ __forceinline__ void encode_block(const RawBlock<T, GS>& blk, u32 (&words)[GS / 8], Scaled scaled) {
#pragma unroll
    for (int v = 0; v < GS / 8; ++v) {
        u32 f[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = e2m1_index_bits(scaled(blk.value(8 * v + j)));
        words[v] = pack8(f) | blk.signs8(v);
    }
}

// 1/d correctly rounded for d in [2^-125, 2^125]: the hardware approximation and one Newton step,
// which is __frcp_rn without its check for the exponent range.
__device__ __forceinline__ float rcp_rn_normal(float d) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
    return __fmaf_rn(r, __fmaf_rn(-d, r, 1.0f), r);
}

// Exact value of a non-negative finite E4M3 code: its bits at float bit 20 give value * 2^-120
// (codes below 8, the E4M3 subnormals, land on float subnormals), so one exact multiply decodes.
__device__ __forceinline__ float e4m3_value(u32 code) {
    return __fmul_rn(__uint_as_float(code << 20), 1.329227995784916e+36f);  // 2^120
}

// NVFP4 block scale code RN(bam / d6) in E4M3, d6 = 6 g. Markstein's division with the correctly
// rounded rd6 = 1/d6 is exact wherever the quotient reaches E4M3's rounding points (>= 2^-10) when
// d6 lies in [2^-60, 2^60] (fast6): every intermediate is then a normal float. Below 2^-10 any
// approximation rounds to code 0 like the exact quotient, and an overflowing one (inf, or NaN
// from inf - inf) saturates at 448 through fminf.
__device__ __forceinline__ u32 nvfp4_scale_code(float bam, float d6, float rd6, bool fast6) {
    if (!fast6) return fp4_e4m3_encode(fminf(__fdiv_rn(bam, d6), 448.0f));
    const float q0 = __fmul_rn(bam, rd6);
    return fp4_e4m3_encode(fminf(__fmaf_rn(__fmaf_rn(-q0, d6, bam), rd6, q0), 448.0f));
}

// What every block of a launch shares: the decode scale g, and for NVFP4 d6 = 6 g with its
// correctly rounded reciprocal (see nvfp4_scale_code).
struct GlobalScale {
    float g = 1.0f, d6 = 6.0f, rd6 = 1.0f;
    bool fast6 = true;
};

template <typename T, int GS, int RULE>
__device__ void quantize_group(const T* __restrict__ x, u8* __restrict__ data, u8* __restrict__ scales,
                               const GlobalScale& gsc, u64* status, i64 grp, int count_bad) {
    RawBlock<T, GS> blk;
    blk.load(x + grp * GS);
    bool nonfinite;
    const float bam = blk.absmax(nonfinite);
    u32 words[GS / 8];
    if (nonfinite) {
        if (count_bad) {
            u32 bad = 0, first = GS;
#pragma unroll
            for (int i = 0; i < GS; ++i) {
                const bool nf = !(fabsf(blk.value(i)) <= 3.402823466e38f);
                bad += nf;
                first = nf && first == GS ? i : first;
            }
            report_nonfinite(status, bad, (u64)(grp * GS + first));
        }
        scales[grp] = RULE == RULE_NVFP4 ? 0x7Fu : 0xFFu;  // NaN scale: the block decodes to NaN
#pragma unroll
        for (int w = 0; w < GS / 8; ++w) words[w] = 0u;
    } else if (RULE == RULE_NVFP4) {
        const u32 sb = nvfp4_scale_code(bam, gsc.d6, gsc.rd6, gsc.fast6);
        const float d = __fmul_rn(e4m3_value(sb), gsc.g);
        scales[grp] = (u8)sb;
        // x / d by Markstein's correction with the correctly rounded 1/d: exact where no
        // intermediate leaves the normal range, which d in [2^-60, 2^60] guarantees for every
        // quotient that can reach the E2M1 thresholds, and finite while bam / d < 2^100;
        // elsewhere IEEE division. The choice is made once per block.
        const float rcp = rcp_rn_normal(d);  // used only where d is in that range
        if (d == 0.0f) {  // a zero scale (all zero or underflow): codes 0
#pragma unroll
            for (int w = 0; w < GS / 8; ++w) words[w] = 0u;
        } else if (d >= 8.673617379884035e-19f && d <= 1.152921504606847e18f && __fmul_rn(bam, rcp) < 1.2676506e30f) {
            encode_block(blk, words, [&](float v) {
                const float q0 = __fmul_rn(v, rcp);
                return __fmaf_rn(__fmaf_rn(-q0, d, v), rcp, q0);
            });
        } else {
            encode_block(blk, words, [&](float v) { return __fdiv_rn(v, d); });
        }
    } else {
        const int e = RULE == RULE_MX_FLOOR   ? fp4_e8m0_floor_exponent(bam)
                      : RULE == RULE_MX_RCEIL ? fp4_e8m0_rceil_exponent(bam)
                                              : fp4_e8m0_round_exponent(bam);
        scales[grp] = (u8)(e + 127);
        const float mult = fp4_exp2i(-e);  // exact power-of-two scaling
        encode_block(blk, words, [&](float v) { return __fmul_rn(v, mult); });
    }
    u8* out = data + grp * (GS / 2);
    if (GS == 8) {
        *reinterpret_cast<u32*>(out) = words[0];
    } else if (GS == 16) {
        *reinterpret_cast<uint2*>(out) = make_uint2(words[0], words[1]);
    } else {
#pragma unroll
        for (int w = 0; w < GS / 8; w += 4)
            reinterpret_cast<uint4*>(out)[w / 4] = make_uint4(words[w], words[w + 1], words[w + 2], words[w + 3]);
    }
}

#define AMAX(NAME, T)                                                                                 \
    extern "C" __global__ void NAME(const T* x, i64 n, u64* status, u64* host) {                        \
        launch_dependents(); /* the quantize pass may be scheduled as this grid's blocks end */        \
        amax_body<T>(x, n, status);                                                                     \
        if (host) publish_status(status, host);                                                         \
    }
// Grid-stride over the groups, so that g and its reciprocal are made once per thread.
template <typename T, int GS, int RULE>
__device__ void quantize_groups(const T* __restrict__ x, u8* __restrict__ data, u8* __restrict__ scales,
                                float g_given, u64* status, float* g_out, i64 ngroups, int count_bad) {
    GlobalScale gsc;
    const i64 first = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (RULE == RULE_NVFP4) {
        if (g_given > 0.0f) {
            gsc.g = g_given;
        } else {
            gsc.g = __fdiv_rn(__uint_as_float((u32)status[STATUS_AMAX]), 2688.0f);
            if (gsc.g == 0.0f) gsc.g = 1.0f;
        }
        if (first == 0 && g_out) *g_out = gsc.g;
        gsc.d6 = __fmul_rn(6.0f, gsc.g);
        gsc.rd6 = __frcp_rn(gsc.d6);
        gsc.fast6 = gsc.d6 >= 8.673617379884035e-19f && gsc.d6 <= 1.152921504606847e18f;
    }
    for (i64 grp = first; grp < ngroups; grp += (i64)gridDim.x * blockDim.x)
        quantize_group<T, GS, RULE>(x, data, scales, gsc, status, grp, count_bad);
}

#define QUANT(NAME, T, GS, RULE)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* x, u8* data, u8* scales,            \
        float g_given, u64* status, float* g_out, i64 ngroups, int count_bad, u64* host) {               \
        grid_dependency_wait(); /* launched after the amax pass: its status, and x */                   \
        quantize_groups<T, GS, RULE>(x, data, scales, g_given, status, g_out, ngroups, count_bad);      \
        if (host) publish_status(status, host);                                                         \
    }
#define QUANT_DTYPES(PREFIX, GS, RULE)                  \
    QUANT(PREFIX##_f32, float, GS, RULE)                \
    QUANT(PREFIX##_f16, __half, GS, RULE)               \
    QUANT(PREFIX##_bf16, __nv_bfloat16, GS, RULE)

AMAX(fp4_amax_f32, float)
AMAX(fp4_amax_f16, __half)
AMAX(fp4_amax_bf16, __nv_bfloat16)
QUANT_DTYPES(nvfp4_quantize_g8, 8, RULE_NVFP4)
QUANT_DTYPES(nvfp4_quantize_g16, 16, RULE_NVFP4)
QUANT_DTYPES(nvfp4_quantize_g32, 32, RULE_NVFP4)
QUANT_DTYPES(nvfp4_quantize_g64, 64, RULE_NVFP4)
QUANT_DTYPES(mxfp4_floor_quantize_g32, 32, RULE_MX_FLOOR)
QUANT_DTYPES(mxfp4_rceil_quantize_g32, 32, RULE_MX_RCEIL)
QUANT_DTYPES(mxfp4_round_quantize_g32, 32, RULE_MX_ROUND)
