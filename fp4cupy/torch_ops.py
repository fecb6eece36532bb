"""torch.library custom ops, so ``torch.compile(fullgraph=True)`` and CUDA graphs see fp4cupy as
single opaque ops with known output shapes (fake implementations below).

    fp4cupy::quantize(x, fmt, group_size) -> (data uint8 [..., K/2], scales uint8 [..., K/gs], global_scale f32 [])
    fp4cupy::dequantize(data, scales, global_scale, fmt, group_size, dtype) -> [..., K]
    fp4cupy::linear(x, data?, scales?, global_scale, codes?, scale_codes?, bias?, fmt, group_size, N) -> [..., N]
    fp4cupy::unrepack(codes, scale_codes, N, K, group_size) -> (data, scales)

``linear`` takes the canonical weight (data/scales/global_scale), its prepared repack
(codes/scale_codes from ``fp4cupy.prepare``), or both; with the repack, CUDA fp16/bf16 inputs run
the W4A16 kernel, and other inputs decode the canonical form from it when it is the only copy.
Importing this module registers the ops (``fp4cupy.nn`` does).

The ops are defined with ``torch.library.Library`` (schema, kernel, fake, autograd) rather than
``torch.library.custom_op``, whose Python wrappers cost host time on every call: on an H200's host
(torch 2.11), ``fp4cupy::linear`` on a tiny shape took 46.6 us a call as a custom_op and 22-27 us
defined here (torch's F.linear: 12-16).
"""
from __future__ import annotations

import torch

from . import ops
from .prepared import PreparedWeight
from .tensor import FP4Tensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LIB = torch.library.Library("fp4cupy", "FRAGMENT")


def define_op(schema: str):
    """Decorator: define ``fp4cupy::<schema>`` with the function as its kernel on every device.
    The function must return fresh tensors (no output aliases an input). Returns the op."""
    name = schema.split("(", 1)[0]

    def register(fn):
        _LIB.define(schema)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return getattr(torch.ops.fp4cupy, name)
    return register


def register_fake(op):
    """Decorator: the op's fake (meta) implementation, for torch.compile's tracing."""
    return lambda fn: torch.library.register_fake(op.default, fn, lib=_LIB)


def _tensor(data, scales, global_scale, shape, fmt, group_size) -> FP4Tensor:
    g = global_scale if global_scale.is_cuda else float(global_scale)
    return FP4Tensor(data, scales, g, shape, fmt, group_size)


@define_op("quantize(Tensor x, str fmt, int group_size) -> (Tensor, Tensor, Tensor)")
def quantize(x: torch.Tensor, fmt: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = ops.quantize(x, fmt, group_size, nonfinite="mark")
    g = t.global_scale_array
    g = g.reshape(()).clone() if isinstance(g, torch.Tensor) else torch.tensor(float(g), dtype=torch.float32)
    return t.data, t.scales, g.to(x.device)


@register_fake(quantize)
def _(x, fmt, group_size):
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    return (x.new_empty(lead + (k // 2,), dtype=torch.uint8), x.new_empty(lead + (k // group_size,), dtype=torch.uint8),
            x.new_empty((), dtype=torch.float32))


@define_op("dequantize(Tensor data, Tensor scales, Tensor global_scale, str fmt, int group_size, str dtype)"
           " -> Tensor")
def dequantize(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, fmt: str, group_size: int,
               dtype: str) -> torch.Tensor:
    shape = tuple(data.shape[:-1]) + (data.shape[-1] * 2,)
    return ops.dequantize(_tensor(data, scales, global_scale, shape, fmt, group_size), dtype=dtype)


@register_fake(dequantize)
def _(data, scales, global_scale, fmt, group_size, dtype):
    return data.new_empty(tuple(data.shape[:-1]) + (data.shape[-1] * 2,), dtype=_DTYPES[dtype])


@define_op("linear(Tensor x, Tensor? data, Tensor? scales, Tensor global_scale, Tensor? codes, "
           "Tensor? scale_codes, Tensor? bias, str fmt, int group_size, int out_features) -> Tensor")
def linear(x: torch.Tensor, data: torch.Tensor | None, scales: torch.Tensor | None, global_scale: torch.Tensor,
           codes: torch.Tensor | None, scale_codes: torch.Tensor | None, bias: torch.Tensor | None, fmt: str,
           group_size: int, out_features: int) -> torch.Tensor:
    if codes is not None and x.is_cuda:
        from . import cuda_linear

        y = cuda_linear.linear_repacked(x, codes, scale_codes, global_scale, out_features, bias)
        if y is not None:
            return y
        if data is None:  # the repack is the only copy: decode the canonical form for the other paths
            data, scales = cuda_linear.unrepack(codes, scale_codes, out_features, x.shape[-1], group_size)
    w = _tensor(data, scales, global_scale, (out_features, data.shape[1] * 2), fmt, group_size)
    return ops.linear(x, PreparedWeight(w, None, None, "dequantize", "no repack"), bias)


@register_fake(linear)
def _(x, data, scales, global_scale, codes, scale_codes, bias, fmt, group_size, out_features):
    return x.new_empty(tuple(x.shape[:-1]) + (out_features,))


@define_op("unrepack(Tensor codes, Tensor scale_codes, int n, int k, int group_size) -> (Tensor, Tensor)")
def unrepack(codes: torch.Tensor, scale_codes: torch.Tensor, n: int, k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical (data, scales) of a weight held as the W4A16 repack (CUDA)."""
    from . import cuda_linear

    return cuda_linear.unrepack(codes, scale_codes, n, k, group_size)


@register_fake(unrepack)
def _(codes, scale_codes, n, k, group_size):
    return codes.new_empty((n, k // 2)), codes.new_empty((n, k // group_size))


def _linear_setup(ctx, inputs, output):
    x, data, scales, global_scale, codes, scale_codes, bias, fmt, group_size, out_features = inputs
    ctx.save_for_backward(data, scales, global_scale, codes, scale_codes)
    ctx.fmt, ctx.group_size, ctx.has_bias, ctx.n, ctx.k = fmt, group_size, bias is not None, out_features, x.shape[-1]


def _linear_backward(ctx, grad):
    """d/dx = grad @ deq(W); d/dbias = grad summed over the leading dims; the weight is frozen."""
    data, scales, global_scale, codes, scale_codes = ctx.saved_tensors
    if data is None:
        data, scales = torch.ops.fp4cupy.unrepack(codes, scale_codes, ctx.n, ctx.k, ctx.group_size)
    dtype = str(grad.dtype).removeprefix("torch.")
    w = torch.ops.fp4cupy.dequantize(data, scales, global_scale, ctx.fmt, ctx.group_size,
                                     dtype if dtype in _DTYPES else "float32")
    grad_x = grad @ w.to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd(linear.default, _linear_backward, setup_context=_linear_setup, lib=_LIB)
