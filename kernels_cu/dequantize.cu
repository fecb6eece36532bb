// dequantize.cu - FP4 decode: value = (e2m1(code) * scale) * g in float32, rounded (RNE) to the output type.
// One thread per block of GS codes; <fmt>_dequantize_g<GS>_<dtype>.
#include "common.cuh"

template <typename T, int GS, bool E8M0>
__device__ void dequantize_body(const u8* __restrict__ data, const u8* __restrict__ scales,
                                const float* g_ptr, T* __restrict__ out, i64 ngroups) {
    const i64 grp = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (grp >= ngroups) return;
    const float g = E8M0 ? 1.0f : *g_ptr;
    const u32 sb = scales[grp];
    const float s = E8M0 ? fp4_e8m0_decode(sb) : fp4_e4m3_decode(sb);
    u32 words[GS / 8];
    const u8* in = data + grp * (GS / 2);
    if (GS == 8) {
        words[0] = *reinterpret_cast<const u32*>(in);
    } else if (GS == 16) {
        uint2 u = *reinterpret_cast<const uint2*>(in);
        words[0] = u.x; words[1] = u.y;
    } else {
#pragma unroll
        for (int w = 0; w < GS / 8; w += 4) {
            uint4 u = reinterpret_cast<const uint4*>(in)[w / 4];
            words[w] = u.x; words[w + 1] = u.y; words[w + 2] = u.z; words[w + 3] = u.w;
        }
    }
    float v[GS];
#pragma unroll
    for (int i = 0; i < GS; ++i) {
        float p = __fmul_rn(fp4_e2m1_value(words[i / 8] >> (4 * (i % 8))), s);  // exact
        v[i] = E8M0 ? p : __fmul_rn(p, g);
    }
    store_floats<T, GS>(out + grp * GS, v);
}

#define DEQ(NAME, T, GS, E8M0)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) NAME(const u8* data, const u8* scales,             \
        const float* g_ptr, T* out, i64 ngroups) { dequantize_body<T, GS, E8M0>(data, scales, g_ptr, out, ngroups); }
#define DEQ_DTYPES(PREFIX, GS, E8M0)            \
    DEQ(PREFIX##_f32, float, GS, E8M0)          \
    DEQ(PREFIX##_f16, __half, GS, E8M0)         \
    DEQ(PREFIX##_bf16, __nv_bfloat16, GS, E8M0)

DEQ_DTYPES(nvfp4_dequantize_g8, 8, false)
DEQ_DTYPES(nvfp4_dequantize_g16, 16, false)
DEQ_DTYPES(nvfp4_dequantize_g32, 32, false)
DEQ_DTYPES(nvfp4_dequantize_g64, 64, false)
DEQ_DTYPES(mxfp4_dequantize_g32, 32, true)
