"""The FP4 x FP4 ``gemm`` on the GPU: both NVFP4 operands decoded to e2m1 * s in fp16 (exact: at
most 6 significant bits, in [2^-10, 2688]), one cuBLAS fp16 GEMM with FP32 accumulation and FP32
output, and alpha = gA * gB read from device memory: the NVFP4 product up to FP32 summation order.
Other formats are dequantized to float32 and multiplied there.
"""
from __future__ import annotations

from . import arrays
from .cuda_ops import _Lib, dequantize
from .tensor import FP4Tensor


def gemm(a: FP4Tensor, b: FP4Tensor, trans_b: bool, out_dtype: str):
    """deq(A) @ op(deq(B)): NVFP4 operands through fp16 tensor cores, others in float32."""
    lib = _Lib(a.data)
    if a.fmt != "nvfp4" or b.fmt != "nvfp4":
        ad, bd = dequantize(a, "float32"), dequantize(b, "float32")
        c = ad @ (bd.T if trans_b else bd)
        return c if out_dtype == "float32" else lib.cast(c, out_dtype)
    from cupy.cuda import cublas, device as cdev, runtime as crt

    one = _device_one(lib)
    ad = _dequantize_unscaled(a, one)
    bd = _dequantize_unscaled(b, one)
    m, kk = a.shape
    nn = b.shape[0] if trans_b else b.shape[1]
    c = lib.empty((m, nn), "float32")
    alpha = a.global_scale_array * b.global_scale_array  # on the device: no host sync
    beta = lib.zeros((), "float32")
    import cupy

    with cupy.cuda.Device(lib.device):
        handle = cdev.get_cublas_handle()
        cublas.setStream(handle, lib.stream.ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_DEVICE)
        try:
            # row-major C = A @ op(B) is column-major C^T = op(B)^T A^T
            cublas.gemmEx(handle, cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N,
                          nn, m, kk, lib.ptr(alpha), lib.ptr(bd), crt.CUDA_R_16F, kk if trans_b else nn,
                          lib.ptr(ad), crt.CUDA_R_16F, kk, lib.ptr(beta), lib.ptr(c), crt.CUDA_R_32F, nn,
                          cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
        finally:
            cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    return c if out_dtype == "float32" else lib.cast(c, out_dtype)


def _device_one(lib: _Lib):
    a = lib.empty((), "float32")
    if lib.torch:
        a.fill_(1.0)
    else:
        a.fill(1.0)
    return a


def _dequantize_unscaled(t: FP4Tensor, one) -> object:
    """e2m1 * s as fp16 (exact), i.e. the decode with g = 1, contiguous."""
    d = dequantize(FP4Tensor._from_kernel(t.data, t.scales, one, 1.0, t.shape, t.fmt, t.group_size), "float16")
    if t.padded_shape == t.shape:
        return d
    return d.contiguous() if arrays.is_torch(d) else d.copy()
