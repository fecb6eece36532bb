"""The public operations, dispatched by where the input lives.

numpy / CPU torch inputs run the numpy reference (the spec); CuPy arrays and CUDA torch tensors
run the CUDA kernels (``cuda_ops``) on the caller's current stream. Results come back in the
input's library and device.
"""
from __future__ import annotations

import math

import numpy as np

from . import arrays, reference
from .formats import get_format
from .prepared import PreparedWeight, prepare
from .tensor import FP4Tensor

_NUMPY_DTYPES = arrays.NUMPY_DTYPES


def _cuda_ops():
    from . import cuda_ops

    return cuda_ops


_LAZY = {}


def _cuda_linear():
    mod = _LAZY.get("cuda_linear")
    if mod is None:
        from . import cuda_linear as mod

        _LAZY["cuda_linear"] = mod
    return mod


def output_dtype(dtype) -> str:
    """Normalize an output dtype (None, a name, a numpy/ml_dtypes or torch dtype) to
    'float32' / 'float16' / 'bfloat16'; ValueError for anything else."""
    if dtype is None:
        return "float32"
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:  # a torch dtype
        name = str(dtype).removeprefix("torch.")
    if name not in _NUMPY_DTYPES:
        raise ValueError(f"output dtype must be float32, float16 or bfloat16; got {dtype!r}")
    return name


def check_float_input(x, what="x", empty_ok=False):
    """Return ``x`` as an array; TypeError for non-float dtypes, ValueError for 0-d arrays and, unless
    ``empty_ok``, for empty ones."""
    x = arrays.as_array(x)
    name = arrays.dtype_name(x)
    if name not in arrays.FLOAT_DTYPES:
        raise TypeError(f"{what} must be float16, bfloat16, float32 or float64; got dtype {name}")
    if x.ndim == 0:
        raise ValueError(f"{what} must have at least one dimension (quantization runs along the last); got a 0-d array")
    if not empty_ok and math.prod(x.shape) == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); nothing to quantize")
    return x


# ----------------------------------------------------------------------------- quantize
def quantize(x, fmt="nvfp4", group_size=None, *, scale_mode=None, global_scale=None, pad=False,
             nonfinite="raise") -> FP4Tensor:
    """Quantize ``x`` [..., K] to FP4 in blocks of ``group_size`` along the last axis.

    fmt:          'nvfp4' (E4M3 scales, FP32 global scale; group 8/16/32/64, default 16) or
                  'mxfp4' (E8M0 scales, group 32; scale_mode 'floor' (OCP), 'rceil' (torchao) or 'round'
                  (compressed-tensors)).
    global_scale: NVFP4 decode scale to use instead of amax/(6*448) (e.g. a calibrated activation
                  scale); one pass, blocks past the E4M3 range saturate.
    pad:          if K is not a multiple of the group, pad with zeros and remember the true shape.
    nonfinite:    'raise' (default): NaN/Inf in ``x`` raise ValueError (on a GPU the host waits for
                  the pass that counts them, the amax pass when there is one, while the quantize
                  pass runs on; with a given global_scale that is the quantize pass itself, so a
                  hot loop with a calibrated scale should pass 'mark'). 'mark': never waits; a
                  block holding NaN/Inf gets a NaN scale and decodes to NaN (never to finite
                  values). Inside CUDA-graph capture 'mark' applies.
    Rounding is round-to-nearest-even everywhere (see reference).
    """
    if nonfinite not in ("raise", "mark"):
        raise ValueError(f"nonfinite must be 'raise' or 'mark'; got {nonfinite!r}")
    f = get_format(fmt)
    gs = f.check_group_size(group_size)
    mode = f.check_scale_mode(scale_mode)
    if global_scale is not None:
        if not f.global_scale:
            raise ValueError(f"{f.name} has no global scale; global_scale must be None")
        g = float(global_scale)
        if not (math.isfinite(g) and g > 0):
            raise ValueError(f"global_scale must be a positive finite number; got {global_scale!r}")
    if arrays.is_torch(x) and x.is_cuda and x.ndim and x.numel():  # the host-lean path, None if it declines
        t = _cuda_ops().quantize_torch(x, f, gs, mode, global_scale, nonfinite)
        if t is not None:
            return t
    x = check_float_input(x)
    shape = tuple(int(s) for s in x.shape)
    if shape[-1] % gs and not pad:
        raise ValueError(
            f"the last dimension ({shape[-1]}) must be a multiple of group_size={gs}; "
            f"pass pad=True to pad with zeros to {-(-shape[-1] // gs) * gs}"
        )
    if arrays.is_cuda(x):
        return _cuda_ops().quantize(x, f, gs, mode, global_scale, shape, nonfinite)
    xn = arrays.to_numpy(x)
    if shape[-1] % gs:
        xn = np.pad(xn, [(0, 0)] * (xn.ndim - 1) + [(0, -shape[-1] % gs)])
    data, scales, g = reference.quantize(xn, f, gs, mode, global_scale, nonfinite)
    lib = arrays.library_of(x)
    return FP4Tensor(arrays.numpy_to(data, lib), arrays.numpy_to(scales, lib), g, shape, f, gs)


# ----------------------------------------------------------------------------- dequantize
def dequantize(t, scales=None, global_scale=None, rows=None, cols=None, group_size=16, *, dtype=None, fmt="nvfp4"):
    """Decode an FP4Tensor: ``dequantize(t, dtype=None)`` -> array of ``t.shape`` in t's library/device.

    Also the seed's form ``dequantize(data, scales, global_scale, rows, cols, group_size=16)``.
    value = (e2m1(code) * scale) * global_scale in float32, then rounded (RNE) to ``dtype``.
    """
    if not isinstance(t, FP4Tensor):
        if scales is None or rows is None or cols is None:
            raise TypeError(
                "dequantize takes an FP4Tensor, or (data, scales, global_scale, rows, cols, group_size=16); "
                f"got {type(t).__name__} without scales/rows/cols"
            )
        t = FP4Tensor(t, scales, 1.0 if global_scale is None else global_scale, (int(rows), int(cols)), fmt, group_size)
    out = output_dtype(dtype)
    if arrays.is_cuda(t.data):
        return _cuda_ops().dequantize(t, out)
    g = t.global_scale
    d = reference.dequantize(arrays.to_numpy(t.data), arrays.to_numpy(t.scales), g, t.fmt, t.group_size,
                             _NUMPY_DTYPES[out])
    return arrays.numpy_to(_crop(d, t.shape), t.library)


def _crop(a, shape):
    return a if a.shape[-1] == shape[-1] else a[..., : shape[-1]]


# ----------------------------------------------------------------------------- gemm / linear
def gemm(*args, trans_b=False, group_size=16, out_dtype=None):
    """FP4 x FP4 matrix product in float32: ``gemm(A, B)`` = deq(A) @ deq(B).

    A is an FP4Tensor [M, K]; B an FP4Tensor [K, N] quantized along N (the seed's layout), or a
    weight [N, K] quantized along K with ``trans_b=True`` (then deq(A) @ deq(B).T).
    The seed's 9-argument form ``gemm(A_data, A_scales, A_g, B_data, B_scales, B_g, M, N, K,
    group_size=16)`` builds A [M, K] and B [K, N] from raw parts.
    """
    if len(args) == 9:
        ad, asc, ag, bd, bsc, bg, m, n, k = args
        a = FP4Tensor(ad, asc, ag, (int(m), int(k)), "nvfp4", group_size)
        b = FP4Tensor(bd, bsc, bg, (int(k), int(n)), "nvfp4", group_size)
    elif len(args) == 2:
        a, b = args
    else:
        raise TypeError(f"gemm takes (A, B) or the seed's 9 arguments; got {len(args)} positional arguments")
    for name, t in (("A", a), ("B", b)):
        if not isinstance(t, FP4Tensor) or len(t.shape) != 2:
            raise TypeError(f"gemm: {name} must be a 2-D FP4Tensor; got {_describe(t)}")
    k_b = b.shape[1] if trans_b else b.shape[0]
    if a.shape[1] != k_b:
        raise ValueError(
            f"gemm: inner dimensions differ: A is {a.shape}, B is {b.shape} "
            f"({'[N, K] with trans_b=True' if trans_b else '[K, N]'})"
        )
    if a.device != b.device:
        raise ValueError(f"gemm: A is on {a.device} and B on {b.device}; move one with .to()")
    out = output_dtype(out_dtype)
    if arrays.is_cuda(a.data):
        from . import cuda_gemm

        return cuda_gemm.gemm(a, b, trans_b, out)
    ad, bd = a.dequantize(), b.dequantize()
    an, bn = arrays.to_numpy(ad), arrays.to_numpy(bd)
    c = an @ (bn.T if trans_b else bn)
    return arrays.numpy_to(c.astype(_NUMPY_DTYPES[out]), a.library)


def linear(x, w, bias=None):
    """``x @ deq(W).T + bias``: x float [..., K] (fp16/bf16/fp32), W an FP4Tensor weight [N, K] or
    ``fp4cupy.prepare(W)``.

    Accumulates in float32 and returns x's dtype, library and device. On CUDA with fp16/bf16 x this
    is the W4A16 tensor-core kernel; pass ``prepare(W)`` (once) so each call skips the repack. On
    the CPU it is exact up to float32 accumulation order. x with no tokens (a leading dim of 0, as
    for an MoE expert no token chose) gives an empty y, as torch's F.linear does.
    """
    pw = w if isinstance(w, PreparedWeight) else None
    if pw is not None and pw.path == "mma" and arrays.is_torch(x) and arrays.is_torch(pw.codes):
        y = _cuda_linear().linear_torch(x, pw, bias)  # the host-lean path; None: checks and fallbacks below
        if y is not None:
            return y
    wt = pw.weight if pw is not None else w
    if not isinstance(wt, FP4Tensor) or len(wt.shape) != 2:
        raise TypeError(f"linear: w must be a 2-D FP4Tensor weight [N, K] or prepare(W); got {_describe(w)}")
    x = check_float_input(x, empty_ok=True)
    if x.shape[-1] != wt.shape[1]:
        raise ValueError(f"linear: x has K={x.shape[-1]} but w is {wt.shape} ([N, K])")
    if arrays.device_of(x) != wt.device:
        raise ValueError(f"linear: x is on {arrays.device_of(x)} but w on {wt.device}; move w with w.to(...)")
    if math.prod(x.shape) == 0:  # no tokens: no kernel runs
        empty = np.zeros(tuple(x.shape[:-1]) + (wt.shape[0],), arrays.to_numpy(x).dtype)
        return arrays.numpy_to(empty, arrays.library_of(x), arrays.device_of(x))
    if arrays.is_cuda(x):
        return _cuda_linear().linear(x, pw if pw is not None else prepare(wt), bias)
    xn = arrays.to_numpy(x)
    y = xn.astype(np.float32) @ arrays.to_numpy(wt.dequantize()).T
    if bias is not None:
        y = y + arrays.to_numpy(bias).astype(np.float32)
    return arrays.numpy_to(y.astype(xn.dtype), arrays.library_of(x))


def _describe(t) -> str:
    if isinstance(t, FP4Tensor):
        return repr(t)
    return f"{type(t).__name__} of shape {getattr(t, 'shape', '?')}"
