// hopper.cuh - the sm_90a primitives of w4a16_wgmma.cu as inline PTX: bulk copies
// (one CTA, or multicast to a cluster) completing on mbarriers, the cluster rank, and warpgroup MMA
// (wgmma.m64nNk16, A from registers, B from shared memory through a no-swizzle descriptor).
// Defined only where __CUDA_ARCH_FEAT_SM90_ALL is (sm_90a).
// (cp.async (sm_80), the cluster barrier and distributed-shared-memory loads are in common.cuh.)
#pragma once
#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ u32 cluster_rank() { u32 r; asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r)); return r; }
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_arrive(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n\t.reg .pred P;\nWAIT:\n\tmbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n\t@!P bra WAIT;\n}"
                 ::"r"(bar), "r"(parity) : "memory");
}
// arrive on the mbarrier at the same offset in the shared memory of cluster CTA ``rank``; no
// .release.cluster: that compiles to MEMBAR.ALL.GPU, which waits for the thread's weight copies in
// flight (the wgmmas that read the slot are complete, which is all the release has to follow)
__device__ __forceinline__ void mbar_arrive_remote(u32 bar, u32 rank) {
    asm volatile("{\n\t.reg .b32 ra;\n\tmapa.shared::cluster.u32 ra, %0, %1;\n\t"
                 "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}" ::"r"(bar), "r"(rank) : "memory");
}
// bytes from global memory into the same shared-memory offset of every CTA in ``mask``, each
// completing ``bytes`` of transaction count on its own mbarrier at offset ``bar``
__device__ __forceinline__ void bulk_multicast(u32 dst, const void* src, u32 bytes, u32 bar, unsigned short mask) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], %4;"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "h"(mask) : "memory");
}

// shared-memory matrix descriptor, no swizzle: start, LBO (next core matrix along K), SBO (along N)
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}

#define WG_D12 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11"
#define WG_D16 WG_D12 ", %12, %13, %14, %15"
#define WG_D24 WG_D16 ", %16, %17, %18, %19, %20, %21, %22, %23"
#define WG_D32 WG_D24 ", %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_D40 WG_D32 ", %32, %33, %34, %35, %36, %37, %38, %39"
#define WG_D48 WG_D40 ", %40, %41, %42, %43, %44, %45, %46, %47"
#define WG_D56 WG_D48 ", %48, %49, %50, %51, %52, %53, %54, %55"
#define WG_D64 WG_D56 ", %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define WG_F8(i) WG_F4(i), WG_F4(i + 4)
#define WG_F12 WG_F8(0), WG_F4(8)
#define WG_F16 WG_F8(0), WG_F8(8)
#define WG_F24 WG_F16, WG_F8(16)
#define WG_F32 WG_F24, WG_F8(24)
#define WG_F40 WG_F32, WG_F8(32)
#define WG_F48 WG_F40, WG_F8(40)
#define WG_F56 WG_F48, WG_F8(48)
#define WG_F64 WG_F56, WG_F8(56)
#define WG_MMA(N, TY, DL, A0, DESC, ONE)                                                              \
    "{.reg .pred p; setp.ne.b32 p, " ONE ", 0; wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY \
    " {" DL "}, {" A0 "}, " DESC ", p, 1, 1, 0;}"

// d (+)= A (64 x 16, registers) * B (16 x NT, shared memory via desc), one specialization a
// (type, NT): the accumulator operand list (NT / 2 floats a thread) is spelled out per NT
template <bool BF16, int NT> __device__ __forceinline__ void wgmma(float (&d)[NT / 2], const u32 (&a)[4], u64 desc);
#define WG_MMA_FN(BF16, NT, TY, DL, A0, DESC, ONE, ...)                                                    \
    template <> __device__ __forceinline__ void wgmma<BF16, NT>(float (&d)[NT / 2], const u32 (&a)[4], u64 desc) { \
        asm volatile(WG_MMA(NT, TY, DL, A0, DESC, ONE)                                                       \
                     : __VA_ARGS__ : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));         \
    }
#define WG_MMA_FNS(NT, DL, A0, DESC, ONE, ...) \
    WG_MMA_FN(false, NT, "f16", DL, A0, DESC, ONE, __VA_ARGS__) WG_MMA_FN(true, NT, "bf16", DL, A0, DESC, ONE, __VA_ARGS__)
WG_MMA_FNS(24, WG_D12, "%12, %13, %14, %15", "%16", "%17", WG_F12)
WG_MMA_FNS(32, WG_D16, "%16, %17, %18, %19", "%20", "%21", WG_F16)
WG_MMA_FNS(48, WG_D24, "%24, %25, %26, %27", "%28", "%29", WG_F24)
WG_MMA_FNS(64, WG_D32, "%32, %33, %34, %35", "%36", "%37", WG_F32)
WG_MMA_FNS(80, WG_D40, "%40, %41, %42, %43", "%44", "%45", WG_F40)
WG_MMA_FNS(96, WG_D48, "%48, %49, %50, %51", "%52", "%53", WG_F48)
WG_MMA_FNS(112, WG_D56, "%56, %57, %58, %59", "%60", "%61", WG_F56)
WG_MMA_FNS(128, WG_D64, "%64, %65, %66, %67", "%68", "%69", WG_F64)
#endif
