"""GPU implementations behind ``ops``: allocate in the caller's library, launch on its current stream.

Kernels get raw pointers (no per-call ``cupy.from_dlpack``); torch tensors run on
``torch.cuda.current_stream()``, CuPy arrays on CuPy's current stream, so launches join CUDA
graph capture. The NaN/Inf check reads a 32-byte status buffer back (one sync) except while a
graph is being captured; then a bad block carries a NaN scale, so NaN never decodes finite.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

from . import arrays, runtime
from .formats import Format
from .tensor import FP4Tensor

THREADS = 256
_DTYPE_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


# ----------------------------------------------------------------------------- library glue
class _Lib:
    """Allocation, pointers and streams for one array library (torch or CuPy)."""

    def __init__(self, like):
        self.torch = arrays.is_torch(like)
        self.device = like.device.index if self.torch else like.device.id
        if self.torch:
            import torch

            self.mod = torch
        else:
            import cupy

            self.mod = cupy

    def empty(self, shape, dtype):
        if self.torch:
            return self.mod.empty(shape, dtype=getattr(self.mod, dtype), device=f"cuda:{self.device}")
        return self.mod.empty(shape, dtype=arrays.NUMPY_DTYPES.get(dtype, np.dtype(dtype)))

    def zeros(self, shape, dtype):
        if self.torch:
            return self.mod.zeros(shape, dtype=getattr(self.mod, dtype), device=f"cuda:{self.device}")
        return self.mod.zeros(shape, dtype=arrays.NUMPY_DTYPES.get(dtype, np.dtype(dtype)))

    def scalar(self, value: float):
        if self.torch:  # a fill kernel, not a host copy: allowed inside graph capture
            return self.mod.full((), float(np.float32(value)), dtype=self.mod.float32, device=f"cuda:{self.device}")
        return self.mod.full((), np.float32(value), dtype=np.float32)

    @staticmethod
    def ptr(a) -> int:
        return a.data_ptr() if arrays.is_torch(a) else a.data.ptr

    def stream(self):
        if self.torch:
            return _external_stream(self.mod.cuda.current_stream(self.device).cuda_stream)
        return self.mod.cuda.get_current_stream()

    def capturing(self) -> bool:
        if self.torch:
            return self.mod.cuda.is_current_stream_capturing()
        return self.mod.cuda.get_current_stream().is_capturing()

    def cast(self, a, dtype: str):
        return a.to(getattr(self.mod, dtype)) if self.torch else a.astype(arrays.NUMPY_DTYPES[dtype])

    def launch(self, filename, name, grid, args):
        import cupy

        fn = runtime.kernel(filename, name, self.device)
        # switch devices only when the caller's current one differs (a context switch costs)
        switch = cupy.cuda.Device(self.device) if cupy.cuda.runtime.getDevice() != self.device else contextlib.nullcontext()
        with switch:
            fn((int(grid),), (THREADS,), args, stream=self.stream())


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int):
    import cupy

    return cupy.cuda.ExternalStream(ptr)


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    import cupy

    return cupy.cuda.Device(device).attributes["MultiProcessorCount"]


def _prepare_input(x, lib: _Lib, k_padded: int):
    """Contiguous, 16-byte aligned float32/float16/bfloat16 input with the last axis padded to k_padded."""
    if arrays.dtype_name(x) == "float64":
        x = x.float() if lib.torch else x.astype(np.float32)
    k = x.shape[-1]
    if k != k_padded:
        if lib.torch:
            x = lib.mod.nn.functional.pad(x, (0, k_padded - k))
        else:
            x = lib.mod.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k_padded - k)])
    if lib.torch:
        x = x.contiguous()
    else:
        x = lib.mod.ascontiguousarray(x)
    if lib.ptr(x) % 16:
        x = x.clone() if lib.torch else x.copy()
    return x


# ----------------------------------------------------------------------------- quantize / dequantize
def quantize(x, f: Format, gs: int, mode: str, global_scale, shape, nonfinite="raise") -> FP4Tensor:
    lib = _Lib(x)
    kp = -(-shape[-1] // gs) * gs
    x = _prepare_input(x, lib, kp)
    suffix = _DTYPE_SUFFIX[arrays.dtype_name(x)]
    n = int(np.prod(x.shape))
    ngroups = n // gs
    lead = tuple(shape[:-1])
    data = lib.empty(lead + (kp // 2,), "uint8")
    scales = lib.empty(lead + (kp // gs,), "uint8")
    status = lib.zeros((4,), "int64")
    g_given = g_out = None
    if f.global_scale:
        if global_scale is not None:
            g_given = lib.scalar(global_scale)
        else:
            g_out = lib.empty((), "float32")
            per = 16 // x.element_size() if lib.torch else 16 // x.itemsize
            grid = max(1, min(-(-n // (per * THREADS)), _sm_count(lib.device) * 8))
            lib.launch("quantize.cu", f"fp4_amax_{suffix}", grid, (lib.ptr(x), n, lib.ptr(status)))
    name = f"{f.name}_quantize_g{gs}_{suffix}" if f.name == "nvfp4" else f"{f.name}_{mode}_quantize_g{gs}_{suffix}"
    ptr = lambda a: 0 if a is None else lib.ptr(a)  # noqa: E731
    lib.launch("quantize.cu", name, -(-ngroups // THREADS),
               (lib.ptr(x), lib.ptr(data), lib.ptr(scales), ptr(g_given), lib.ptr(status), ptr(g_out),
                ngroups, np.int32(g_given is not None or not f.global_scale)))
    if nonfinite == "raise" and not lib.capturing():
        _raise_if_nonfinite(arrays.to_numpy(status), x, shape)
    g = g_given if g_given is not None else g_out if g_out is not None else np.float32(1.0)
    return FP4Tensor(data, scales, g, shape, f, gs)


def _raise_if_nonfinite(status: np.ndarray, x, shape):
    bad = int(status[0])
    if bad:
        flat = ~int(status[1])  # the kernel stores ~index
        row, col = divmod(flat, x.shape[-1])
        first = tuple(int(i) for i in np.unravel_index(row, shape[:-1])) + (col,) if len(shape) > 1 else (col,)
        value = float(arrays.to_numpy(x.reshape(-1)[flat : flat + 1])[0])
        raise ValueError(
            f"input has {bad} NaN/Inf value(s), the first at index {first} (value {value}); "
            "FP4 has no encoding for them"
        )


def dequantize(t: FP4Tensor, out_dtype: str):
    lib = _Lib(t.data)
    padded = t.padded_shape
    out = lib.empty(padded, out_dtype)
    ngroups = int(np.prod(padded)) // t.group_size
    g = t.global_scale_array
    g_ptr = lib.ptr(g) if t.format.global_scale else 0
    name = f"{t.fmt}_dequantize_g{t.group_size}_{_DTYPE_SUFFIX[out_dtype]}"
    lib.launch("dequantize.cu", name, -(-ngroups // THREADS),
               (lib.ptr(t.data), lib.ptr(t.scales), g_ptr, lib.ptr(out), ngroups))
    return out if padded == t.shape else out[..., : t.shape[-1]]


# ----------------------------------------------------------------------------- gemm / linear
def gemm(a: FP4Tensor, b: FP4Tensor, trans_b: bool, out_dtype: str):
    """deq(A) @ op(deq(B)) with float32 operands (products of decoded values are exact)."""
    ad, bd = dequantize(a, "float32"), dequantize(b, "float32")
    c = ad @ (bd.T if trans_b else bd)
    return c if out_dtype == "float32" else _Lib(c).cast(c, out_dtype)


def linear(x, w: FP4Tensor, bias=None):
    """x @ deq(w).T (+ bias), in x's dtype. Dequantizes w once per call; the fused W4A16 kernel replaces this."""
    lib = _Lib(x)
    if lib.torch != arrays.is_torch(w.data):
        raise TypeError(f"linear: x ({arrays.library_of(x)}) and w ({w.library}) must come from one array library")
    wd = dequantize(w, arrays.dtype_name(x) if arrays.dtype_name(x) != "float64" else "float32")
    if lib.torch:
        return lib.mod.nn.functional.linear(x, wd.to(x.dtype), bias)
    y = x @ wd.astype(x.dtype).T
    return y if bias is None else y + bias
