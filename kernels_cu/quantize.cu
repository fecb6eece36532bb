// quantize.cu - FP4 quantization kernels, bit-exact with fp4cupy/reference.py.
//
// fp4_amax_<dtype>:                 max|x| over finite x and the NaN/Inf count, into status[].
// <fmt>_quantize_g<GS>_<dtype>:     one thread per block of GS elements along the flat input
//                                   (K is a multiple of GS, so blocks never straddle rows).
// NVFP4 takes its global scale g from g_given when > 0 (one pass) or from status' amax (g = amax/2688, 1 if 0),
// and writes g to g_out. A block holding NaN/Inf gets a NaN scale and zero codes, and is counted
// when count_bad is set, so a graph-captured launch never emits finite codes for NaN.
// Either kernel given a host pointer publishes status[0..2] there when it is done (publish_status).
#include "common.cuh"

enum { RULE_NVFP4 = 0, RULE_MX_FLOOR = 1, RULE_MX_RCEIL = 2 };

template <typename T>
__device__ void amax_body(const T* __restrict__ x, i64 n, u64* status) {
    constexpr int PER = 16 / sizeof(T);
    const i64 nvec = n / PER;
    float m = 0.0f;
    u32 bad = 0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < nvec; i += (i64)gridDim.x * blockDim.x) {
        float v[PER];
        load_floats<T, PER>(x + i * PER, v);
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const float a = fabsf(v[j]);
            if (a <= 3.402823466e38f) m = fmaxf(m, a);
            else { ++bad; report_nonfinite(status, 0, (u64)(i * PER + j)); }
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

template <typename T> struct is_bf16 { static constexpr bool value = false; };
template <> struct is_bf16<__nv_bfloat16> { static constexpr bool value = true; };

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
    // bits of element i as a float (16-bit types: their bits in the high half, the low half junk
    // for the sign only — value() gives the exact float)
    __device__ __forceinline__ u32 sign_word(int i) const {
        return sizeof(T) == 4 ? w[i] : (i & 1 ? w[i / 2] : w[i / 2] << 16);
    }
    __device__ __forceinline__ float value(int i) const {
        if (sizeof(T) == 4) return __uint_as_float(w[i]);
        const u32 h = w[i / 2];
        if (is_bf16<T>::value) return __uint_as_float(i & 1 ? h & 0xFFFF0000u : h << 16);
        return __half2float(__ushort_as_half((unsigned short)(i & 1 ? h >> 16 : h & 0xFFFFu)));
    }
    // max|x| as a float, and whether the block holds NaN/Inf (bit patterns of non-negative values
    // order like the values; NaN/Inf lie above every finite one)
    __device__ __forceinline__ float absmax(bool& nonfinite) const {
        u32 m = 0;
        if (sizeof(T) == 4) {
#pragma unroll
            for (int i = 0; i < WORDS; ++i) m = max(m, w[i] & 0x7FFFFFFFu);
            nonfinite = m >= 0x7F800000u;
            return __uint_as_float(m);
        }
#pragma unroll
        for (int i = 0; i < WORDS; ++i) m = __vmaxu2(m, w[i] & 0x7FFF7FFFu);  // two 16-bit maxima at once
        m = max(m & 0xFFFFu, m >> 16);
        if (is_bf16<T>::value) {
            nonfinite = m >= 0x7F80u;
            return __uint_as_float(m << 16);
        }
        nonfinite = m >= 0x7C00u;
        return __half2float(__ushort_as_half((unsigned short)m));
    }
};

// E2M1 code of r with the sign of x_bits, in the low 4 bits of the result (the bits above are junk).
// Same FMA rounding as fp4_e2m1_index, with m = 2^(1-k) and the offset 2^23 + 2k + 8*sign made
// from the exponent of a = min(|r|, 6) (k = 0, 1, 2 for a < 2, < 4, <= 6) by integer ops.
__device__ __forceinline__ u32 e2m1_code_low_bits(float r, u32 x_bits) {
    const float a = fminf(fabsf(r), 6.0f);
    const u32 e = max(__float_as_uint(a) >> 23, 127u);  // 127 + k
    const float m = __uint_as_float((255u - e) << 23);
    const float c = __uint_as_float(0x4B000000u - 254u + 2u * e + ((x_bits >> 28) & 8u));
    return __float_as_uint(__fmaf_rn(a, m, c));
}

// 8 codes (low nibbles of f[0..7]) packed into one word, element 0 in the lowest nibble.
__device__ __forceinline__ u32 pack8(const u32 (&f)[8]) {
    const u32 p0 = f[0] + (f[1] << 4), p1 = f[2] + (f[3] << 4), p2 = f[4] + (f[5] << 4), p3 = f[6] + (f[7] << 4);
    return __byte_perm(__byte_perm(p0, p1, 0x0040), __byte_perm(p2, p3, 0x0040), 0x5410);
}

// The block's codes packed into words, element i encoded from scaled(x_i) (x_i over the block scale).
template <typename T, int GS, typename Scaled>
__device__ __forceinline__ void encode_block(const RawBlock<T, GS>& blk, u32 (&words)[GS / 8], Scaled scaled) {
#pragma unroll
    for (int w = 0; w < GS / 8; ++w) {
        u32 f[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = e2m1_code_low_bits(scaled(blk.value(w * 8 + j)), blk.sign_word(w * 8 + j));
        words[w] = pack8(f);
    }
}

template <typename T, int GS, int RULE>
__device__ void quantize_groups(const T* __restrict__ x, u8* __restrict__ data, u8* __restrict__ scales,
                                float g_given, u64* status, float* g_out, i64 ngroups, int count_bad) {
    const i64 grp = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    float g = 1.0f;
    if (RULE == RULE_NVFP4) {
        if (g_given > 0.0f) {
            g = g_given;
        } else {
            g = __fdiv_rn(__uint_as_float((u32)status[STATUS_AMAX]), 2688.0f);
            if (g == 0.0f) g = 1.0f;
        }
        if (grp == 0 && g_out) *g_out = g;
    }
    if (grp >= ngroups) return;

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
        const u32 sb = fp4_e4m3_encode(__fdiv_rn(bam, __fmul_rn(6.0f, g)));
        const float d = __fmul_rn(fp4_e4m3_decode(sb), g);
        scales[grp] = (u8)sb;
        // x / d by Markstein's correction with the correctly rounded 1/d: exact where no
        // intermediate leaves the normal range, which d in [2^-60, 2^60] guarantees for every
        // quotient that can reach the E2M1 thresholds, and finite while bam / d < 2^100;
        // elsewhere IEEE division. The choice is made once per block.
        const float rcp = __frcp_rn(d);
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
        const int e = RULE == RULE_MX_FLOOR ? fp4_e8m0_floor_exponent(bam) : fp4_e8m0_rceil_exponent(bam);
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
        amax_body<T>(x, n, status);                                                                     \
        if (host) publish_status(status, host);                                                         \
    }
#define QUANT(NAME, T, GS, RULE)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* x, u8* data, u8* scales,            \
        float g_given, u64* status, float* g_out, i64 ngroups, int count_bad, u64* host) {               \
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
