// common.cuh - loads, stores and reductions shared by fp4cupy's kernels (not part of the user API).
#pragma once
#include <fp4.cuh>

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N consecutive elements (N * sizeof(T) a multiple of 16, pointer 16-byte aligned) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&v)[N]) {
    constexpr int PER = 16 / sizeof(T);
    static_assert(N % PER == 0, "load_floats: N must fill whole 16-byte vectors");
    uint4 u[N / PER];
#pragma unroll
    for (int i = 0; i < N / PER; ++i) u[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
#pragma unroll
    for (int i = 0; i < N / PER; ++i) {
        const T* t = reinterpret_cast<const T*>(&u[i]);
#pragma unroll
        for (int j = 0; j < PER; ++j) v[i * PER + j] = to_float(t[j]);
    }
}

// N floats rounded (RNE) to T and stored with 16-byte stores.
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* __restrict__ p, const float (&v)[N]) {
    constexpr int PER = 16 / sizeof(T);
    static_assert(N % PER == 0, "store_floats: N must fill whole 16-byte vectors");
#pragma unroll
    for (int i = 0; i < N / PER; ++i) {
        uint4 u;
        T* t = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int j = 0; j < PER; ++j) t[j] = from_float<T>(v[i * PER + j]);
        reinterpret_cast<uint4*>(p)[i] = u;
    }
}

// cp.async (sm_80+): 4 or 16 bytes global -> shared, bypassing registers; bytes past ``src_bytes``
// are written as zeros. Groups are committed and waited for by count (at most N still in flight).
// Before sm_80 there is none: commit and wait do nothing there (a kernel that runs on sm_75 copies
// through registers itself, w4a16_tiled.cu), and the copies trap.
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
#else
__device__ __forceinline__ void cp_async4(u32, const void*, int) { __trap(); }
__device__ __forceinline__ void cp_async16(u32, const void*) { __trap(); }
__device__ __forceinline__ void cp_async16(u32, const void*, int) { __trap(); }
__device__ __forceinline__ void cp_async_commit() {}
template <int N> __device__ __forceinline__ void cp_async_wait() {}
#endif

// Programmatic dependent launch (sm_90+; runtime.Launcher.after): a kernel so launched may start
// while the kernel before it in the stream finishes. grid_dependency_wait() returns once that
// kernel has completed and its writes are visible (at once for a plain launch), so it must come
// before the first access to what that kernel writes; launch_dependents() lets the next kernel's
// blocks be scheduled before this one ends.
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Thread block clusters (sm_90+): the barrier of all blocks of the cluster, and loads from cluster
// block ``rank``'s shared memory at the offset of ``p`` (a shared-memory address ``addr``) in this
// block's (distributed shared memory).
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ float cluster_load(const float* p, int rank) {
    float v = 0.0f;
#if __CUDA_ARCH__ >= 900
    asm volatile("{\n\t.reg .b32 ra;\n\tmapa.shared::cluster.u32 ra, %1, %2;\n\tld.shared::cluster.f32 %0, [ra];\n}"
                 : "=f"(v) : "r"((u32)__cvta_generic_to_shared(p)), "r"(rank) : "memory");
#endif
    return v;
}
__device__ __forceinline__ float4 cluster_load4(u32 addr, u32 rank) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#if __CUDA_ARCH__ >= 900
    asm volatile("{\n\t.reg .b32 ra;\n\tmapa.shared::cluster.u32 ra, %4, %5;\n\t"
                 "ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [ra];\n}"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr), "r"(rank) : "memory");
#endif
    return v;
}

// Status words shared with the host (zeroed before a launch):
//   [0] count of NaN/Inf inputs, [1] ~(flat index of the first one), [2] float bits of max|x| over
//   finite x, [3] blocks that have published (see publish_status).
enum { STATUS_BAD = 0, STATUS_FIRST = 1, STATUS_AMAX = 2, STATUS_TICKETS = 3, STATUS_WORDS = 4 };

// Called by every thread of every block after its atomics on status: the grid's last block copies
// status[0..2] into host (pinned, mapped) memory, so the host reads them once this kernel is done,
// with no device-to-host copy queued behind it on the stream.
__device__ __forceinline__ void publish_status(u64* status, volatile u64* host) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&status[STATUS_TICKETS], 1ull) == (u64)gridDim.x * gridDim.y - 1;
    __syncthreads();
    if (last && threadIdx.x < STATUS_TICKETS) host[threadIdx.x] = atomicAdd(&status[threadIdx.x], 0ull);
}

__device__ __forceinline__ void report_nonfinite(u64* status, u64 count, u64 first_index) {
    atomicAdd(&status[STATUS_BAD], count);
    atomicMax(&status[STATUS_FIRST], ~first_index);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ u32 warp_sum(u32 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
