// moe_route.cu - the bookkeeping around a MoE block's grouped W4A16 launches (fp4cupy/experts.py,
// cuda_grouped.py): the (token, slot) pairs as rows sorted by expert, and each token's weighted sum
// of its experts' rows. Nothing goes back to the host.
#include "common.cuh"

// v[0 .. n) -> its exclusive prefix sums, by the whole block (part: a word a thread): each thread
// sums a run of v, the runs' sums are scanned (Hillis-Steele), then each run. Ends synced.
__device__ void exclusive_scan(int* v, int n, int* part) {
    const int threads = blockDim.x, tid = threadIdx.x;
    const int per = (n + threads - 1) / threads, lo = min(n, tid * per), hi = min(n, lo + per);
    int sum = 0;
    for (int e = lo; e < hi; ++e) sum += v[e];
    part[tid] = sum;
    __syncthreads();
    for (int step = 1; step < threads; step <<= 1) {  // inclusive
        const int add = tid >= step ? part[tid - step] : 0;
        __syncthreads();
        part[tid] += add;
        __syncthreads();
    }
    int start = part[tid] - sum;
    for (int e = lo; e < hi; ++e) {
        const int c = v[e];
        v[e] = start;
        start += c;
    }
    __syncthreads();
}

// One block (any number of slots; 1024 threads). index [slots]: slot s holds token s / k's
// (s % k)-th expert; values >= experts (another rank's experts) count as ``experts``. Writes
// offsets [experts + 1] (expert e's first row; offsets[experts]: the rows of the experts here),
// each slot's row and each row's expert and token. Within an expert the rows come in no set order
// (atomics): each row's product is computed alone, so no result depends on it.
extern "C" __global__ void __launch_bounds__(1024) moe_route(const i64* __restrict__ index, int slots, int k, int experts,
                                                             i64* __restrict__ expert_of_row, i64* __restrict__ token_of_row,
                                                             int* __restrict__ offsets, int* __restrict__ row_of_slot) {
    extern __shared__ int count[];  // experts + 1 counters, then a partial sum a thread
    const int bins = experts + 1, threads = blockDim.x, tid = threadIdx.x;
    int* part = count + bins;
    for (int e = tid; e < bins; e += threads) count[e] = 0;
    __syncthreads();
    for (int s = tid; s < slots; s += threads) atomicAdd(&count[(int)min((i64)experts, index[s])], 1);
    __syncthreads();
    exclusive_scan(count, bins, part);
    for (int e = tid; e < bins; e += threads) offsets[e] = count[e];  // count[e]: the next free row of expert e
    __syncthreads();
    for (int s = tid; s < slots; s += threads) {
        const int e = (int)min((i64)experts, index[s]), row = atomicAdd(&count[e], 1);
        expert_of_row[row] = e;
        token_of_row[row] = s / k;
        row_of_slot[s] = row;
    }
}

// One block (1024 threads): the tiles of at most nt rows of each expert's rows (offsets [experts +
// 1], from moe_route), expert by expert: tiles[t] = (first row, rows), (0, 0) past the last up to
// ``capacity`` (the host's bound, rows / nt + experts). The grouped warpgroup kernels
// (w4a16_wgmma_grouped.cu) take a tile a grid row, so the host needs no count.
extern "C" __global__ void __launch_bounds__(1024) moe_tiles(const int* __restrict__ offsets, int experts, int nt,
                                                             int capacity, int2* __restrict__ tiles) {
    extern __shared__ int first[];  // experts + 1: expert e's first tile (first[experts]: all), then a word a thread
    const int tid = threadIdx.x;
    for (int e = tid; e <= experts; e += blockDim.x)
        first[e] = e < experts ? (offsets[e + 1] - offsets[e] + nt - 1) / nt : 0;
    __syncthreads();
    exclusive_scan(first, experts + 1, first + experts + 1);
    for (int t = tid; t < capacity; t += blockDim.x) {
        int lo = 0, hi = experts;  // the last expert whose first tile is <= t
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (first[mid] <= t) lo = mid; else hi = mid - 1;
        }
        int2 tile = make_int2(0, 0);
        if (t < first[experts]) {
            const int r0 = offsets[lo] + (t - first[lo]) * nt;
            tile = make_int2(r0, min(nt, offsets[lo + 1] - r0));
        }
        tiles[t] = tile;
    }
}

// out[t][c] = round(sum over j < k, in slot order, of float(round(h[row_of_slot[tk + j]][c] *
// w[tk + j]))), slots of experts >= experts skipped: each expert's contribution rounded to T as
// transformers' experts round it, the sum in float32, rounded once.
template <typename T, typename W>
__device__ void moe_combine(const T* __restrict__ h, const int* __restrict__ row_of_slot, const i64* __restrict__ index,
                            const W* __restrict__ w, T* __restrict__ out, int tokens, int k, int hidden, int experts) {
    const i64 total = (i64)tokens * hidden;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const int t = (int)(i / hidden), c = (int)(i % hidden);
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            const int s = t * k + j;
            if (index[s] >= experts) continue;
            acc += to_float(from_float<T>(to_float(h[(i64)row_of_slot[s] * hidden + c]) * to_float(w[s])));
        }
        out[i] = from_float<T>(acc);
    }
}
#define MOE_COMBINE(NAME, T, W)                                                                                  \
    extern "C" __global__ void NAME(const T* h, const int* row_of_slot, const i64* index, const W* w, T* out,   \
                                    int tokens, int k, int hidden, int experts) {                               \
        moe_combine<T, W>(h, row_of_slot, index, w, out, tokens, k, hidden, experts);                           \
    }
MOE_COMBINE(moe_combine_f16_f32, __half, float)
MOE_COMBINE(moe_combine_f16_f16, __half, __half)
MOE_COMBINE(moe_combine_bf16_f32, __nv_bfloat16, float)
MOE_COMBINE(moe_combine_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
