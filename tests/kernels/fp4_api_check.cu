// Exercises every function of fp4.cuh, the way a user's RawKernel would (#include <fp4.cuh>).
#include <fp4.cuh>

// For each float x[i] (NaN-free): E2M1 code, decoded value, E4M3 bits of |x|, its decoded value,
// E8M0 floor / rceil / round exponents of |x|.
extern "C" __global__ void fp4_api_scalar(const float* x, unsigned char* code, float* back, unsigned char* e4m3,
                                          float* e4m3_back, int* e8_floor, int* e8_rceil, int* e8_round, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    cuda_fp4_t c = __float2fp4(x[i]);
    code[i] = c.__x;
    back[i] = __fp42float(c);
    unsigned e = fp4_e4m3_encode(fabsf(x[i]));
    e4m3[i] = (unsigned char)e;
    e4m3_back[i] = fp4_e4m3_decode(e);
    e8_floor[i] = fp4_e8m0_floor_exponent(fabsf(x[i]));
    e8_rceil[i] = fp4_e8m0_rceil_exponent(fabsf(x[i]));
    e8_round[i] = fp4_e8m0_round_exponent(fabsf(x[i]));
}

// For each pair (x[2i], x[2i+1]): packed byte, and its decode as float2, half2 and bfloat162;
// for each code pair byte b in 0..255: __fp4_add / __fp4_mul of its nibbles and __fp4_fma(lo, hi, 0.25).
extern "C" __global__ void fp4_api_pairs(const float* x, unsigned char* packed, float* as_float, float* as_half,
                                         float* as_bf16, long long npairs) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= npairs) return;
    cuda_fp4x2_t p = __floats2fp4x2(x[2 * i], x[2 * i + 1]);
    packed[i] = p.__x;
    float2 f = __fp4x22float2(p);
    __half2 h = __fp4x22half2(p);
    __nv_bfloat162 b = __fp4x22bfloat162(p);
    as_float[2 * i] = f.x; as_float[2 * i + 1] = f.y;
    as_half[2 * i] = __low2float(h); as_half[2 * i + 1] = __high2float(h);
    as_bf16[2 * i] = __low2float(b); as_bf16[2 * i + 1] = __high2float(b);
}

extern "C" __global__ void fp4_api_arith(unsigned char* add, unsigned char* mul, float* fma) {
    int b = threadIdx.x + blockIdx.x * blockDim.x;
    if (b >= 256) return;
    cuda_fp4x2_t p; p.__x = (unsigned char)b;
    cuda_fp4_t lo = __fp4x2_low(p), hi = __fp4x2_high(p);
    add[b] = __fp4_add(lo, hi).__x;
    mul[b] = __fp4_mul(lo, hi).__x;
    fma[b] = __fp4_fma(lo, hi, 0.25f);
}

extern "C" __global__ void fp4_api_nan(unsigned char* code, float* back) {
    cuda_fp4_t c = __float2fp4(__int_as_float(0x7fc00000));
    code[0] = c.__x;
    back[0] = __fp42float(__fp4_add(c, __float2fp4(1.0f)));
}

extern "C" __global__ void fp4_api_pack_nan(unsigned char* out) {
    out[0] = __floats2fp4x2(__int_as_float(0x7fc00000), 1.0f).__x;  // must trap
}
