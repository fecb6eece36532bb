"""GPU implementations behind ``ops``: allocate in the caller's library, launch on its current stream.

Kernels get raw pointers (no per-call ``cupy.from_dlpack``); torch tensors run on
``torch.cuda.current_stream()``, CuPy arrays on CuPy's current stream, so launches join CUDA
graph capture. The NaN/Inf check waits for the kernel that counts them (the amax pass, else the
quantize pass), whose last block writes the count into pinned host memory, except while a graph
is being captured; then a bad block carries a NaN scale, so NaN never decodes finite.
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np

from . import arrays, runtime
from .formats import Format
from .tensor import FP4Tensor

THREADS = 256
_DTYPE_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


# ----------------------------------------------------------------------------- library glue
class _Lib:
    """Allocation, pointers and the current stream of one array library (torch or CuPy), for one call."""

    def __init__(self, like):
        torch = arrays._torch()
        self.torch = torch is not None and isinstance(like, torch.Tensor)
        if self.torch:
            self.mod = torch
            self.device = like.device.index
            self.stream = _external_stream(_torch_stream_ptr(torch, self.device))
        else:
            import cupy

            self.mod = cupy
            self.device = like.device.id
            self.stream = cupy.cuda.get_current_stream()

    def empty(self, shape, dtype):
        if self.torch:
            return self.mod.empty(shape, dtype=getattr(self.mod, dtype), device=self.device)
        return self.mod.empty(shape, dtype=arrays.NUMPY_DTYPES.get(dtype, np.dtype(dtype)))

    def zeros(self, shape, dtype):
        """Zero-filled by an async memset on the call's stream (no fill kernel)."""
        a = self.empty(shape, dtype)
        nbytes = a.numel() * a.element_size() if self.torch else a.nbytes
        arrays._cupy().cuda.runtime.memsetAsync(self.ptr(a), 0, nbytes, self.stream.ptr)
        return a

    def ptr(self, a) -> int:
        return a.data_ptr() if self.torch else a.data.ptr

    def scratch(self, nbytes: int):
        """(a uint8 device buffer of ``nbytes``, its pointer)."""
        a = self.empty((nbytes,), "uint8")
        return a, self.ptr(a)

    def contiguous_aligned(self, a):
        """``a`` itself when it is contiguous with a 16-byte aligned start, else a copy that is."""
        a = a.contiguous() if self.torch else self.mod.ascontiguousarray(a)
        if self.ptr(a) % 16:
            a = a.clone() if self.torch else a.copy()
        return a

    def capturing(self) -> bool:
        return self.stream.is_capturing()

    def cast(self, a, dtype: str):
        return a.to(getattr(self.mod, dtype)) if self.torch else a.astype(arrays.NUMPY_DTYPES[dtype])

    def launch(self, filename, name, grid, args):
        """Launch ``name`` with THREADS threads a block on the call's stream. ``args``: Python ints
        (pointers, int64), np.int32 and np.float32 values, in the kernel's parameter order."""
        _launch_raw(self.device, self.stream.ptr, filename, name, grid, args)


class _HostStatus:
    """Pinned host words that a kernel's last block fills with status[0..2] (``publish_status`` in
    common.cuh), and an event recorded after that kernel: ``result()`` waits for the event only,
    so work queued after the kernel keeps running. One per thread and device."""

    _local = threading.local()

    @classmethod
    def for_device(cls, device: int) -> "_HostStatus":
        cache = cls._local.__dict__.setdefault("per_device", {})
        hs = cache.get(device)
        if hs is None:
            hs = cache[device] = cls(device)
        return hs

    def __init__(self, device: int):
        import cupy

        with cupy.cuda.Device(device):
            self._memory = cupy.cuda.alloc_pinned_memory(64)  # under UVA a kernel may write it directly
            self.event = cupy.cuda.Event(block=False, disable_timing=True)
        self.words = np.frombuffer(self._memory, np.int64, 3)

    def arm(self) -> int:
        """Clear the words (the last call's kernel is done: its result was read) and return their address."""
        self.words[:] = 0
        return self.words.ctypes.data

    def record(self, stream: int) -> None:
        self.event.record(_external_stream(stream))

    def result(self) -> np.ndarray:
        self.event.synchronize()
        return self.words.copy()


def _torch_stream_ptr(torch, device: int) -> int:
    """torch's current stream on ``device`` as a raw pointer (the private call is ~20x cheaper)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


_LAUNCHERS: dict = {}  # (file, kernel, device) -> runtime.Launcher, its signature read off the first call


class _RawStream:
    """A raw cudaStream_t under the CUDA stream protocol (what CuPy 14's Stream.from_external takes)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return 0, self.ptr


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int):
    """A CuPy stream object over someone else's stream (torch's): Stream.from_external on CuPy 14+,
    where ExternalStream is deprecated, ExternalStream before."""
    import cupy

    stream = cupy.cuda.Stream
    return stream.from_external(_RawStream(ptr)) if hasattr(stream, "from_external") else cupy.cuda.ExternalStream(ptr)


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
    return lib.contiguous_aligned(x)


# ----------------------------------------------------------------------------- quantize / dequantize
def quantize(x, f: Format, gs: int, mode: str, global_scale, shape, nonfinite="raise") -> FP4Tensor:
    lib = _Lib(x)
    kp = -(-shape[-1] // gs) * gs
    x = _prepare_input(x, lib, kp)
    suffix = _DTYPE_SUFFIX[arrays.dtype_name(x)]
    n = math.prod(x.shape)
    lead = tuple(shape[:-1])
    data = lib.empty(lead + (kp // 2,), "uint8")
    scales = lib.empty(lead + (kp // gs,), "uint8")
    status = lib.zeros((4,), "int64")
    check = nonfinite == "raise" and not lib.capturing()
    g_out = lib.empty((), "float32") if f.global_scale else None
    words = _run_passes(lib.device, lib.stream.ptr, f, gs, mode, suffix, lib.ptr(x), n,
                        x.element_size() if lib.torch else x.itemsize, lib.ptr(data), lib.ptr(scales), lib.ptr(status),
                        0 if g_out is None else lib.ptr(g_out), global_scale, check)
    if words is not None:
        _raise_if_nonfinite(words, x, shape)
    return _result(data, scales, g_out, global_scale, shape, f, gs)


def quantize_kernel_name(f: Format, gs: int, mode: str, suffix: str) -> str:
    """The kernel of quantize.cu for a format, group size, MXFP4 scale mode and input dtype suffix."""
    return f"{f.name}_quantize_g{gs}_{suffix}" if f.name == "nvfp4" else f"{f.name}_{mode}_quantize_g{gs}_{suffix}"


def amax_grid(nbytes: int, sms: int) -> int:
    """Blocks of the grid-stride amax pass over ``nbytes`` of input: one 16-byte load a thread per
    step, at most 8 blocks a SM."""
    return max(1, min(-(-nbytes // (16 * THREADS)), sms * 8))


def _run_passes(device: int, stream: int, f: Format, gs: int, mode: str, suffix: str, x: int, n: int, itemsize: int,
                data: int, scales: int, status: int, g_out: int, global_scale, check: bool):
    """Queue the amax pass (when g is not given) and the quantize pass over the ``n`` elements at
    ``x``. With ``check``, wait for the pass that counts NaN/Inf (the amax pass when there is one:
    the quantize pass keeps running) and return its status words; else None, without waiting."""
    amax_pass = f.global_scale and global_scale is None
    hs = _HostStatus.for_device(device) if check else None
    host = hs.arm() if check else 0
    if amax_pass:
        _launch_amax(device, stream, suffix, x, n, itemsize, status, host)
        if check:
            hs.record(stream)
    _launch_quantize(device, stream, f, gs, mode, suffix, x, data, scales, status, g_out, n // gs, global_scale,
                     amax_pass, 0 if amax_pass else host)
    if not check:
        return None
    if not amax_pass:
        hs.record(stream)
    return hs.result()


GROUPS_PER_THREAD = 4  # quantize.cu is grid-stride: g and 1/(6 g) are made once for this many blocks


def quantize_grid(ngroups: int) -> int:
    """Blocks of the grid-stride quantize pass: about GROUPS_PER_THREAD groups a thread."""
    return max(1, -(-ngroups // (THREADS * GROUPS_PER_THREAD)))


def _launch_amax(device: int, stream: int, suffix: str, x: int, n: int, itemsize: int, status: int,
                 host: int) -> None:
    """max|x| and the NaN/Inf count into status; published to ``host`` (pinned) unless it is 0."""
    grid = amax_grid(n * itemsize, _sm_count(device))
    _launch_raw(device, stream, "quantize.cu", f"fp4_amax_{suffix}", grid, (x, n, status, host))


def _launch_quantize(device: int, stream: int, f: Format, gs: int, mode: str, suffix: str, x: int, data: int,
                     scales: int, status: int, g_out: int, ngroups: int, global_scale, amax_pass: bool,
                     host: int) -> None:
    """Grid-stride over the blocks of ``gs`` (``quantize_grid``), launched after the amax pass as its
    programmatic dependent when there is one; g from ``global_scale`` when given, else from the amax in status.
    NaN/Inf blocks are counted into status only when no amax pass did it already; status is
    published to ``host`` (pinned) unless it is 0."""
    _launch_raw(device, stream, "quantize.cu", quantize_kernel_name(f, gs, mode, suffix), quantize_grid(ngroups),
                (x, data, scales, np.float32(_given(global_scale)), status, g_out, ngroups, np.int32(not amax_pass),
                 host), after=amax_pass)


def _given(global_scale) -> float:
    """The kernel's g_given: the float32 value of a given global scale, 0 for none (then amax decides)."""
    return float(np.float32(global_scale)) if global_scale is not None else 0.0


def _result(data, scales, g_out, global_scale, shape, f: Format, gs: int) -> FP4Tensor:
    """The FP4Tensor of a quantize launch; its global scale known on the host when it was given."""
    if g_out is None:
        return FP4Tensor._from_kernel(data, scales, np.float32(1.0), 1.0, shape, f.name, gs)
    return FP4Tensor._from_kernel(data, scales, g_out, _given(global_scale) or None, shape, f.name, gs)


_TORCH_NAMES: dict = {}  # filled on the first torch call


def _torch_names() -> dict:
    """torch and the dtypes the host-lean torch paths compare against (imported once, on first use):
    torch, suffix (dtype -> kernel suffix), half (float16, bfloat16), u8, i64, f32."""
    if not _TORCH_NAMES:
        import torch

        _TORCH_NAMES.update(torch=torch, suffix={torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"},
                            half=(torch.float16, torch.bfloat16), u8=torch.uint8, i64=torch.int64, f32=torch.float32)
    return _TORCH_NAMES


_SCRATCH: dict = {}  # device -> a status buffer that nobody reads (one-pass 'mark' calls)


def quantize_torch(x, f: Format, gs: int, mode: str, global_scale, nonfinite: str):
    """The host-lean path of ``quantize`` for a contiguous, 16-byte aligned CUDA torch tensor whose
    last axis is a multiple of ``gs``: the same kernels with fewer allocations (no status buffer
    at all for a one-pass 'mark' call) and no generic dispatch. None when a precondition fails."""
    t = _torch_names()
    torch = t["torch"]
    suffix = t["suffix"].get(x.dtype)
    shape = x.shape
    kk = shape[-1]
    if suffix is None or kk % gs or not x.is_contiguous() or x.data_ptr() & 15:
        return None
    dev = x.get_device()
    stream = _torch_stream_ptr(torch, dev)
    n = x.numel()
    lead = shape[:-1]
    data = x.new_empty(lead + (kk // 2,), dtype=t["u8"])
    scales = x.new_empty(lead + (kk // gs,), dtype=t["u8"])
    amax_pass = f.global_scale and global_scale is None
    check = nonfinite == "raise" and not torch.cuda.is_current_stream_capturing()
    if amax_pass or check:
        status = x.new_empty(4, dtype=t["i64"])
        _cupy_runtime().memsetAsync(status.data_ptr(), 0, 32, stream)
        status_ptr = status.data_ptr()
    else:
        status_ptr = _scratch(torch, dev)
    g_out = x.new_empty((), dtype=t["f32"]) if f.global_scale else None
    words = _run_passes(dev, stream, f, gs, mode, suffix, x.data_ptr(), n, x.element_size(), data.data_ptr(),
                        scales.data_ptr(), status_ptr, 0 if g_out is None else g_out.data_ptr(), global_scale, check)
    if words is not None:
        _raise_if_nonfinite(words, x, tuple(shape))
    return _result(data, scales, g_out, global_scale, tuple(shape), f, gs)


def _cupy_runtime():
    import cupy

    return cupy.cuda.runtime


def _scratch(torch, device: int) -> int:
    buf = _SCRATCH.get(device)
    if buf is None:
        buf = _SCRATCH[device] = torch.zeros(4, dtype=torch.int64, device=f"cuda:{device}")
    return buf.data_ptr()


def _launch_raw(device: int, stream: int, filename: str, name: str, grid: int, args, after: bool = False):
    """Launch with THREADS threads a block; ``after``: as a programmatic dependent of the kernel
    before it in the stream (runtime.Launcher.after)."""
    key = (filename, name, device)
    launch = _LAUNCHERS.get(key)
    if launch is None:
        signature = "".join("i" if isinstance(a, np.int32) else "f" if isinstance(a, np.float32) else "q" for a in args)
        launch = _LAUNCHERS[key] = runtime.launcher(filename, name, device, signature)
    (launch.after if after else launch)(int(grid), THREADS, 0, stream, *args)


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
    ngroups = math.prod(padded) // t.group_size
    g = t.global_scale_array
    g_ptr = lib.ptr(g) if t.format.global_scale else 0
    name = f"{t.fmt}_dequantize_g{t.group_size}_{_DTYPE_SUFFIX[out_dtype]}"
    lib.launch("dequantize.cu", name, -(-ngroups // THREADS),
               (lib.ptr(t.data), lib.ptr(t.scales), g_ptr, lib.ptr(out), ngroups))
    return out if padded == t.shape else out[..., : t.shape[-1]]
