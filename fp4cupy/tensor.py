"""FP4Tensor: packed FP4 codes, their block scales and the global scale, as one immutable value."""
from __future__ import annotations

import numpy as np

from . import arrays
from .formats import Format, get_format


class FP4Tensor:
    """A quantized tensor of logical shape ``shape`` [..., K].

    data:         uint8 [..., Kp/2], two E2M1 codes a byte, element 2i in the low nibble.
    scales:       uint8 [..., Kp/group_size], E4M3 (NVFP4) or E8M0 (MXFP4) bits, row-major.
    global_scale: the FP32 decode scale g (1.0 for MXFP4); value = e2m1 * scale * g.
    Kp is K rounded up to the group size (it differs from K only for ``quantize(..., pad=True)``).

    ``data`` and ``scales`` live in one array library (numpy, torch or CuPy) on one device.
    On a GPU the global scale stays on the device (``global_scale_array``) so kernels never wait
    for the host; reading ``global_scale`` copies it to a Python float once.
    """

    __slots__ = ("data", "scales", "shape", "fmt", "group_size", "_g", "_g_host")

    def __init__(self, data, scales, global_scale=1.0, shape=None, fmt="nvfp4", group_size=None):
        f: Format = get_format(fmt)
        gs = f.check_group_size(group_size)
        _check_packed("data", data)
        _check_packed("scales", scales)
        if arrays.device_of(data) != arrays.device_of(scales) or arrays.library_of(data) != arrays.library_of(scales):
            raise ValueError(
                f"data and scales must be arrays of one library on one device; got "
                f"{arrays.library_of(data)} on {arrays.device_of(data)} and "
                f"{arrays.library_of(scales)} on {arrays.device_of(scales)}"
            )
        dshape, sshape = tuple(data.shape), tuple(scales.shape)
        if len(dshape) < 1 or dshape[:-1] != sshape[:-1] or dshape[-1] * 2 != sshape[-1] * gs:
            raise ValueError(
                f"inconsistent FP4 shapes: data {dshape} and scales {sshape} with group_size={gs} "
                f"(expected data [..., K/2] and scales [..., K/{gs}])"
            )
        kp = dshape[-1] * 2
        shape = tuple(int(s) for s in (shape if shape is not None else dshape[:-1] + (kp,)))
        if shape[:-1] != dshape[:-1] or not (kp - gs < shape[-1] <= kp):
            raise ValueError(f"shape {shape} does not fit data {dshape} (last dim {kp} packed, group {gs})")
        g_host = None
        if not f.global_scale:
            global_scale, g_host = np.float32(1.0), 1.0
        elif isinstance(global_scale, (int, float, np.floating)):
            g_host = float(np.float32(global_scale))
            if not (np.isfinite(g_host) and g_host > 0):
                raise ValueError(f"global_scale must be a positive finite float; got {global_scale!r}")
            global_scale = np.float32(global_scale)
        elif arrays.library_of(global_scale) == "numpy":
            global_scale = np.float32(np.asarray(global_scale).reshape(()))
            g_host = float(global_scale)
        if arrays.is_cuda(data) and not arrays.is_cuda(global_scale):
            # kernels read g from device memory: keep it where the data lives
            global_scale = arrays.numpy_to(np.asarray(global_scale, np.float32).reshape(()),
                                           arrays.library_of(data), arrays.device_of(data))
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "fmt", f.name)
        object.__setattr__(self, "group_size", gs)
        object.__setattr__(self, "_g", global_scale)
        object.__setattr__(self, "_g_host", g_host)

    @classmethod
    def _from_kernel(cls, data, scales, g_array, g_host, shape, fmt: str, group_size: int) -> FP4Tensor:
        """Wrap parts a kernel of this package has just written (already consistent): no checks, no copies."""
        t = object.__new__(cls)
        for name, value in (("data", data), ("scales", scales), ("shape", shape), ("fmt", fmt),
                            ("group_size", group_size), ("_g", g_array), ("_g_host", g_host)):
            object.__setattr__(t, name, value)
        return t

    def __setattr__(self, name, value):
        raise AttributeError(f"FP4Tensor is immutable; cannot set {name!r}")

    # ------------------------------------------------------------------ properties
    @property
    def global_scale(self) -> float:
        """The decode global scale as a Python float (copied from the device once)."""
        if self._g_host is None:
            object.__setattr__(self, "_g_host", float(arrays.to_numpy(self._g).reshape(())))
        return self._g_host

    @property
    def global_scale_array(self):
        """The global scale where the data lives: np.float32 on the CPU, a 0-d float32 array on a GPU."""
        return self._g

    @property
    def format(self) -> Format:
        return get_format(self.fmt)

    @property
    def padded_shape(self) -> tuple:
        return self.shape[:-1] + (int(self.data.shape[-1]) * 2,)

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes + scales (+ 4 for the FP32 global scale)."""
        return _nbytes(self.data) + _nbytes(self.scales) + (4 if self.format.global_scale else 0)

    @property
    def device(self) -> str:
        return arrays.device_of(self.data)

    @property
    def library(self) -> str:
        return arrays.library_of(self.data)

    # ------------------------------------------------------------------ conversions
    def dequantize(self, dtype=None):
        """Decoded values, shape ``self.shape``, in this tensor's library and device (float32 by default)."""
        from .ops import dequantize

        return dequantize(self, dtype=dtype)

    def swizzled_scales(self):
        """Scales in the 128x4-tile layout taken by CUTLASS / vLLM / torch._scaled_mm, flattened,
        rows padded to 128 and scale columns to 4 with zeros (leading dims fold into rows)."""
        from .reference import swizzle_scales

        out = swizzle_scales(arrays.to_numpy(self.scales))
        return arrays.numpy_to(out, self.library, self.device)

    def to(self, device) -> FP4Tensor:
        """The same tensor on ``device`` ('cpu', 'cuda', 'cuda:N'); numpy <-> CuPy, torch stays torch."""
        device = arrays.normalize_device(device)
        if device == self.device:
            return self
        data, scales = arrays.move(self.data, device), arrays.move(self.scales, device)
        g = np.float32(self.global_scale)
        if device != "cpu":
            g = arrays.numpy_to(np.asarray(g).reshape(()), arrays.library_of(data), device)
        return FP4Tensor(data, scales, g, self.shape, self.fmt, self.group_size)

    def to_torch(self) -> dict:
        """Zero-copy torch views (CPU or CUDA, wherever the data is): ``data`` uint8, ``data_fp4``
        as torch.float4_e2m1fn_x2 (None if this torch lacks it), ``scales`` as torch.float8_e4m3fn
        (NVFP4) / torch.float8_e8m0fnu (MXFP4), and ``global_scale`` float32 []."""
        import torch

        data = self.data if arrays.is_torch(self.data) else torch.from_dlpack(self.data)
        scales = self.scales if arrays.is_torch(self.scales) else torch.from_dlpack(self.scales)
        fp4 = getattr(torch, "float4_e2m1fn_x2", None)
        fp8 = getattr(torch, "float8_e4m3fn" if self.fmt == "nvfp4" else "float8_e8m0fnu", None)
        g = self._g if arrays.is_torch(self._g) else torch.tensor(self.global_scale, dtype=torch.float32, device=data.device)
        return dict(data=data, data_fp4=data.view(fp4) if fp4 is not None else None,
                    scales=scales.view(fp8) if fp8 is not None else scales, global_scale=g)

    def __iter__(self):
        """``data, scales, global_scale = t`` (the seed's tuple form)."""
        return iter((self.data, self.scales, self.global_scale))

    def __len__(self):
        return 3

    def __dlpack__(self, **kwargs):
        """Export the packed uint8 codes zero-copy (torch.from_dlpack(t) views ``t.data``)."""
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    def __repr__(self) -> str:
        n = int(np.prod(self.shape))
        fp16 = 2 * n
        return (
            f"FP4Tensor(shape={self.shape}, fmt={self.fmt}, group_size={self.group_size}, "
            f"device={self.device}, {_human(self.nbytes)} vs {_human(fp16)} in fp16: "
            f"{fp16 / max(self.nbytes, 1):.2f}x smaller)"
        )


def _check_packed(name, a):
    if not (isinstance(a, np.ndarray) or arrays.is_torch(a) or arrays.is_cupy(a)):
        raise TypeError(f"{name} must be a numpy, CuPy or torch array; got {type(a).__name__}")
    if arrays.dtype_name(a) != "uint8":
        raise TypeError(f"{name} must be uint8 (raw FP4 / scale bits); got {arrays.dtype_name(a)}")


def _nbytes(a) -> int:
    return int(a.numel() * a.element_size()) if arrays.is_torch(a) else int(a.nbytes)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
