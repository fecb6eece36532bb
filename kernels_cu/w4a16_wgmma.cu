// w4a16_wgmma.cu - y[M, N] = x[M, K] @ W^T * g (+ bias) for 17..128 tokens on sm_90a: the kernels
// of w4a16_wgmma.cuh (which says how they work) for one weight, and the reorder of x they read.
#include "w4a16_wgmma.cuh"

// x [m, k] -> xp (wg_xprep_unit), one thread a 16-byte unit; also the first ws_words words of the
// workspace ws (the stream-K flags or split-K counters; none when 0) zeroed.
extern "C" __global__ void w4a16_wg_xprep(const u32* __restrict__ x, uint4* __restrict__ xp, float* __restrict__ ws,
                                          i64 ws_words, int m, int k, int nt) {
    launch_dependents();  // the main kernel's blocks may start (and copy weights) as these end
    const i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    for (i64 j = i; j < ws_words; j += (i64)gridDim.x * blockDim.x) ws[j] = 0.0f;
    wg_xprep_unit(x, xp, i, m, k, nt);
}

// w4a16_wg{,sk,k2}_nt{NT}_{f16,bf16}: sk = stream-K, k2 = K split in two over a cluster
#define W4A16_WG(NAME, NT, SK, K2)                                                                                 \
    extern "C" __global__ void __launch_bounds__(512, 1) WG_CLUSTER_DIMS_##K2 NAME##_nt##NT##_f16(                 \
        const uint4* wq, const unsigned short* sq, const uint4* xp, __half* y, float* ws, const __half* bias,      \
        const float* g, int m, int n, int k, int cps) {                                                            \
        w4a16_wg_body<false, NT, SK, K2>(wq, sq, xp, y, ws, bias, g, m, n, k, cps);                                \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(512, 1) WG_CLUSTER_DIMS_##K2 NAME##_nt##NT##_bf16(                \
        const uint4* wq, const unsigned short* sq, const uint4* xp, __nv_bfloat16* y, float* ws,                  \
        const __nv_bfloat16* bias, const float* g, int m, int n, int k, int cps) {                                 \
        w4a16_wg_body<true, NT, SK, K2>(wq, sq, xp, y, ws, bias, g, m, n, k, cps);                                 \
    }

// NT: keep in step with cuda_wgmma.WG_TOKEN_TILES (and hopper.cuh's wgmma specializations)
#define W4A16_WG_NT(NT) W4A16_WG(w4a16_wg, NT, false, 0) W4A16_WG(w4a16_wgsk, NT, true, 0) W4A16_WG(w4a16_wgk2, NT, false, 1)
W4A16_WG_NT(24)
W4A16_WG_NT(32)
W4A16_WG_NT(48)
W4A16_WG_NT(64)
W4A16_WG_NT(80)
W4A16_WG_NT(96)
W4A16_WG_NT(112)
W4A16_WG_NT(128)
