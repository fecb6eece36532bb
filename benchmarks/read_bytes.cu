// read_bytes.cu - benchmarks only: read two buffers once with 16-byte loads (four in flight a
// thread, grid-stride, no math), the achievable time to stream a prepared weight's codes and scale
// codes on this card. The XOR of the words is stored only if it hits an unlikely value, so the
// loads cannot be dropped.
typedef unsigned int u32;

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

extern "C" __global__ void read_bytes(const uint4* __restrict__ a, long long na, const uint4* __restrict__ b, long long nb,
                                      u32* __restrict__ sink) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    u32 acc = 0;
    for (; i + 3 * stride < na; i += 4 * stride) {
        const uint4 v0 = load_stream(a + i), v1 = load_stream(a + i + stride);
        const uint4 v2 = load_stream(a + i + 2 * stride), v3 = load_stream(a + i + 3 * stride);
        acc ^= v0.x ^ v0.y ^ v0.z ^ v0.w ^ v1.x ^ v1.y ^ v1.z ^ v1.w ^ v2.x ^ v2.y ^ v2.z ^ v2.w ^ v3.x ^ v3.y ^ v3.z ^ v3.w;
    }
    for (; i < na; i += stride) {
        const uint4 v = load_stream(a + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    for (i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < nb; i += stride) {
        const uint4 v = load_stream(b + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;
}
