// fp4.cuh - the FP4 E2M1 device API of fp4cupy, for its own kernels and for users' RawKernels.
//
//   #include <fp4.cuh>      // options=("-I" + fp4cupy.include_dir(),)
//
// Numerics (identical to fp4cupy/reference.py, bit for bit):
//   E2M1 code = sign<<3 | magnitude index, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}.
//   float -> E2M1 rounds to nearest, ties to the even code (0.25->0, 0.75->1, 1.25->1, 1.75->2,
//   2.5->2, 3.5->4, 5->4) and saturates at +-6; the sign bit is x's (so -0.1 -> code 8, "-0").
//   Packed pairs: element 2i in the low nibble, 2i+1 in the high nibble.
//   E4M3 scales: RNE, saturating at 448. E8M0 scales: 2^(b-127), 0xFF = NaN.
// NaN: E2M1 has no NaN, and fp4cupy never turns NaN into a finite code. The scalar type carries a
// NaN state (__x == FP4_NAN, decodes back to NaN); __floats2fp4x2 traps on NaN (the launch fails
// instead of storing a finite code); fp4cupy's quantize kernels mark a NaN block by a NaN scale.
// Software conversion is used on sm_75..sm_90 (a few integer ops); arch-specific Blackwell
// targets (sm_100a, sm_103a, sm_120a, sm_121a) use the hardware cvt for pairs.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#if defined(__CUDA_ARCH_FEAT_SM100_ALL) || defined(__CUDA_ARCH_FEAT_SM103_ALL) || \
    defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL)
#define FP4_HW_CVT 1
#else
#define FP4_HW_CVT 0
#endif

#define FP4_NAN 0xFF

struct cuda_fp4_t { unsigned char __x; };    // one E2M1 code in the low nibble (or FP4_NAN)
struct cuda_fp4x2_t { unsigned char __x; };  // two codes: element 0 low nibble, element 1 high

// ---------------------------------------------------------------------------- E2M1 <-> float
// Magnitude index of |r| for finite or infinite r (saturating at 6): RNE, ties to the even index.
// The E2M1 grid has steps 0.5 below 2, 1 below 4 and 2 above, so index = rint(a*m) + offset with
// m = 2, 1, 1/2. One FMA adds 2^23 + offset: the float's rounding is then exactly RNE to an integer
// (offsets are even, so ties still go to the even index) and its low 3 bits are the index
// (a is clamped to 6 first, so the index never passes 7).
__device__ __forceinline__ unsigned fp4_e2m1_index(float r) {
    const float a = fminf(fabsf(r), 6.0f);
    const float m = a < 2.0f ? 2.0f : (a < 4.0f ? 1.0f : 0.5f);
    const float c = a < 2.0f ? 8388608.0f : (a < 4.0f ? 8388610.0f : 8388612.0f);
    return __float_as_uint(__fmaf_rn(a, m, c)) & 7u;
}

// Code (0..15) of a non-NaN float.
__device__ __forceinline__ unsigned fp4_e2m1_code(float r) {
    return ((__float_as_uint(r) >> 28) & 8u) | fp4_e2m1_index(r);
}

// Exact float value of a code: the 3 magnitude bits placed at float bit 22 give 2^-126 * value
// (m = 1 lands on the subnormal 2^-127), so one exact multiply by 2^126 decodes. Needs no -ftz.
__device__ __forceinline__ float fp4_e2m1_value(unsigned code) {
    float v = __uint_as_float((code & 7u) << 22) * 8.507059173023462e+37f;  // 2^126
    return (code & 8u) ? -v : v;
}

__device__ __forceinline__ cuda_fp4_t __float2fp4(float x) {
    cuda_fp4_t r;
    r.__x = isnan(x) ? (unsigned char)FP4_NAN : (unsigned char)fp4_e2m1_code(x);
    return r;
}

__device__ __forceinline__ float __fp42float(cuda_fp4_t a) {
    return a.__x == FP4_NAN ? __int_as_float(0x7fffffff) : fp4_e2m1_value(a.__x);
}

__device__ __forceinline__ bool __fp4_isnan(cuda_fp4_t a) { return a.__x == FP4_NAN; }

__device__ __forceinline__ cuda_fp4x2_t __floats2fp4x2(float lo, float hi) {
    if (isnan(lo) || isnan(hi)) __trap();  // no finite code may stand for NaN
    cuda_fp4x2_t r;
#if FP4_HW_CVT
    unsigned short p;
    asm("{ .reg .b8 t; cvt.rn.satfinite.e2m1x2.f32 t, %2, %1; cvt.u16.u8 %0, t; }" : "=h"(p) : "f"(lo), "f"(hi));
    r.__x = (unsigned char)p;
#else
    r.__x = (unsigned char)(fp4_e2m1_code(lo) | (fp4_e2m1_code(hi) << 4));
#endif
    return r;
}

__device__ __forceinline__ cuda_fp4_t __fp4x2_low(cuda_fp4x2_t p) { cuda_fp4_t r; r.__x = p.__x & 15u; return r; }
__device__ __forceinline__ cuda_fp4_t __fp4x2_high(cuda_fp4x2_t p) { cuda_fp4_t r; r.__x = p.__x >> 4; return r; }

__device__ __forceinline__ float2 __fp4x22float2(cuda_fp4x2_t p) {
    return make_float2(fp4_e2m1_value(p.__x & 15u), fp4_e2m1_value(p.__x >> 4));
}

// Arithmetic in float32, rounded back to E2M1 (RNE, saturating); NaN propagates.
__device__ __forceinline__ cuda_fp4_t __fp4_add(cuda_fp4_t a, cuda_fp4_t b) { return __float2fp4(__fp42float(a) + __fp42float(b)); }
__device__ __forceinline__ cuda_fp4_t __fp4_mul(cuda_fp4_t a, cuda_fp4_t b) { return __float2fp4(__fp42float(a) * __fp42float(b)); }
// a * b + c with one rounding, in float32 (a * b is exact).
__device__ __forceinline__ float __fp4_fma(cuda_fp4_t a, cuda_fp4_t b, float c) { return fmaf(__fp42float(a), __fp42float(b), c); }

// ---------------------------------------------------------------------------- fast pair decode
// Two codes -> half2 / bfloat162, exact (every E2M1 value is representable in both).
__device__ __forceinline__ __half2 __fp4x22half2(cuda_fp4x2_t p) {
    // magnitude bits at half bit 9 give value * 2^-14 (m = 1 is the half subnormal 2^-15)
    unsigned b = p.__x;
    unsigned h = ((b & 7u) << 9) | ((b & 8u) << 12) | ((b & 0x70u) << 21) | ((b & 0x80u) << 24);
    __half2 v = *reinterpret_cast<__half2*>(&h);
    return __hmul2(v, __float2half2_rn(16384.0f));
}

__device__ __forceinline__ __nv_bfloat162 __fp4x22bfloat162(cuda_fp4x2_t p) {
    float2 f = __fp4x22float2(p);
    return __floats2bfloat162_rn(f.x, f.y);
}

// ---------------------------------------------------------------------------- block scales
// E4M3 bits of a non-negative float: RNE, saturating at 448; NaN -> 0x7F (E4M3 NaN). From sm_89
// on the hardware cvt (satfinite: the same saturation, NaN stays NaN); before, integer ops.
__device__ __forceinline__ unsigned fp4_e4m3_encode(float v) {
#if __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(v));
    return r;
#else
    if (isnan(v)) return 0x7Fu;
    v = fminf(v, 448.0f);
    if (v < 0.015625f) return (unsigned)__float2int_rn(v * 512.0f);  // subnormal step 2^-9, exact scaling
    unsigned b = __float_as_uint(v);
    b += 0x7FFFFu + ((b >> 20) & 1u);                                  // RNE to 3 mantissa bits
    return ((((b >> 23) & 0xFFu) - 120u) << 3) | ((b >> 20) & 7u);
#endif
}

__device__ __forceinline__ float fp4_e4m3_decode(unsigned bits) {
    unsigned e = (bits >> 3) & 15u, m = bits & 7u;
    if ((bits & 0x7Fu) == 0x7Fu) return __int_as_float(0x7fffffff);
    float mag = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;  // 2^-9
    return (bits & 0x80u) ? -mag : mag;
}

// 2^n as float for integer n in [-149, 127], exact.
__device__ __forceinline__ float fp4_exp2i(int n) {
    return n >= -126 ? __uint_as_float((unsigned)(n + 127) << 23) : __uint_as_float(1u << (n + 149));
}

__device__ __forceinline__ float fp4_e8m0_decode(unsigned bits) {
    return bits == 0xFFu ? __int_as_float(0x7fffffff) : fp4_exp2i((int)bits - 127);
}

// floor(log2(v)) of a positive finite float, subnormals included.
__device__ __forceinline__ int fp4_floor_log2(float v) {
    unsigned b = __float_as_uint(v), e = b >> 23;
    return e ? (int)e - 127 : (31 - __clz(b)) - 149;
}

// OCP MXFP4 shared exponent: floor(log2(blockamax)) - 2, clamped to [-127, 127]; 0 -> -127.
__device__ __forceinline__ int fp4_e8m0_floor_exponent(float blockamax) {
    return blockamax > 0.0f ? max(fp4_floor_log2(blockamax) - 2, -127) : -127;
}

// torchao RCEIL: ceil(log2(blockamax / 6)), clamped to [-127, 127]; 0 -> -127.
__device__ __forceinline__ int fp4_e8m0_rceil_exponent(float blockamax) {
    float d = __fdiv_rn(blockamax, 6.0f);
    if (!(d > 0.0f)) return -127;
    int f = fp4_floor_log2(d);
    unsigned b = __float_as_uint(d);
    bool pow2 = (b >> 23) ? (b & 0x7FFFFFu) == 0u : (b & (b - 1u)) == 0u;
    return min(max(f + (pow2 ? 0 : 1), -127), 127);
}

// compressed-tensors' MXFP4 exponent: blockamax rounded to one mantissa bit, half up (a significand
// of 1.75 or more carries into the exponent field), then floor(log2) - 2; clamped to [-127, 127].
__device__ __forceinline__ int fp4_e8m0_round_exponent(float blockamax) {
    return min(max((int)((__float_as_uint(blockamax) + 0x200000u) >> 23) - 129, -127), 127);
}
