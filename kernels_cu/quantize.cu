// quantize.cu - FP4 quantization kernels, bit-exact with fp4cupy/reference.py.
//
// <fmt>_amax_<dtype>:               max|x| over finite x and the NaN/Inf count, into status[].
// <fmt>_quantize_g<GS>_<dtype>:     one thread per block of GS elements along the flat input
//                                   (K is a multiple of GS, so blocks never straddle rows).
// NVFP4 takes its global scale g from g_given (one pass) or from status' amax (g = amax/2688, 1 if 0),
// and writes g to g_out. A block holding NaN/Inf gets a NaN scale and zero codes, and is counted
// when count_bad is set, so a graph-captured launch never emits finite codes for NaN.
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

template <typename T, int GS, int RULE>
__device__ void quantize_body(const T* __restrict__ x, u8* __restrict__ data, u8* __restrict__ scales,
                              const float* g_given, u64* status, float* g_out, i64 ngroups, int count_bad) {
    const i64 grp = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    float g = 1.0f;
    if (RULE == RULE_NVFP4) {
        if (g_given) {
            g = *g_given;
        } else {
            g = __fdiv_rn(__uint_as_float((u32)status[STATUS_AMAX]), 2688.0f);
            if (g == 0.0f) g = 1.0f;
        }
        if (grp == 0 && g_out) *g_out = g;
    }
    if (grp >= ngroups) return;

    float v[GS];
    load_floats<T, GS>(x + grp * GS, v);
    // max |x| as bits: non-negative floats order like their bits, and NaN/Inf lie above every finite value
    u32 mx = 0;
#pragma unroll
    for (int i = 0; i < GS; ++i) mx = max(mx, __float_as_uint(v[i]) & 0x7FFFFFFFu);
    u32 words[GS / 8];
    if (mx >= 0x7F800000u) {
        if (count_bad) {
            u32 bad = 0, first = GS;
#pragma unroll
            for (int i = 0; i < GS; ++i) {
                const bool nf = (__float_as_uint(v[i]) & 0x7FFFFFFFu) >= 0x7F800000u;
                bad += nf;
                first = nf && first == GS ? i : first;
            }
            report_nonfinite(status, bad, (u64)(grp * GS + first));
        }
        scales[grp] = RULE == RULE_NVFP4 ? 0x7Fu : 0xFFu;  // NaN scale: the block decodes to NaN
#pragma unroll
        for (int w = 0; w < GS / 8; ++w) words[w] = 0u;
    } else {
        const float bam = __uint_as_float(mx);
        u32 sb;
        float d = 0.0f, rcp = 0.0f, mult = 1.0f;
        bool fast = true;
        if (RULE == RULE_NVFP4) {
            sb = fp4_e4m3_encode(__fdiv_rn(bam, __fmul_rn(6.0f, g)));
            d = __fmul_rn(fp4_e4m3_decode(sb), g);
            // x / d by Markstein's correction with the correctly rounded 1/d: exact where no
            // intermediate leaves the normal range, which d in [2^-60, 2^60] guarantees for every
            // quotient that can reach the E2M1 thresholds, and finite while bam / d < 2^100;
            // elsewhere IEEE division.
            rcp = __frcp_rn(d);
            fast = d >= 8.673617379884035e-19f && d <= 1.152921504606847e18f && __fmul_rn(bam, rcp) < 1.2676506e30f;
        } else {
            const int e = RULE == RULE_MX_FLOOR ? fp4_e8m0_floor_exponent(bam) : fp4_e8m0_rceil_exponent(bam);
            sb = (u32)(e + 127);
            mult = fp4_exp2i(-e);
        }
        scales[grp] = (u8)sb;
#pragma unroll
        for (int w = 0; w < GS / 8; ++w) {
            u32 word = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float x = v[w * 8 + j];
                float r;
                if (RULE != RULE_NVFP4) {
                    r = __fmul_rn(x, mult);  // exact power-of-two scaling
                } else if (fast) {
                    const float q0 = __fmul_rn(x, rcp);
                    r = __fmaf_rn(__fmaf_rn(-q0, d, x), rcp, q0);
                } else {
                    r = __fdiv_rn(x, d);
                }
                // the sign comes from x itself (r of -0 may come out +0 on the fast path)
                word |= (((__float_as_uint(x) >> 28) & 8u) | fp4_e2m1_index(r)) << (4 * j);
            }
            words[w] = (RULE == RULE_NVFP4 && d == 0.0f) ? 0u : word;
        }
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

#define AMAX(NAME, T) \
    extern "C" __global__ void NAME(const T* x, i64 n, u64* status) { amax_body<T>(x, n, status); }
#define QUANT(NAME, T, GS, RULE)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* x, u8* data, u8* scales,            \
        const float* g_given, u64* status, float* g_out, i64 ngroups, int count_bad) {                   \
        quantize_body<T, GS, RULE>(x, data, scales, g_given, status, g_out, ngroups, count_bad);        \
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
