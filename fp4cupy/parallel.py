"""Tensor-parallel NVFP4 linear layers on ``torch.distributed`` (any backend: gloo on CPUs, NCCL on GPUs).

The weight is quantized once, whole (one global scale, the single-device recipe), and then split:

- column-parallel: rank r keeps output rows [r*N/P, (r+1)*N/P) and computes those outputs; with
  ``gather_output`` an all-gather rebuilds y. Each output is computed exactly as on one device.
- row-parallel: rank r keeps columns [r*K/P, (r+1)*K/P) of W (K/P a multiple of the group size, so
  no block is cut) and multiplies its slice of x; an all-reduce sums the partial products, then the
  bias is added once. Partial sums add in another order than on one device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .nn import NVFP4Linear
from .ops import quantize
from .tensor import FP4Tensor


def shard_rows(t: FP4Tensor, parts: int, index: int) -> FP4Tensor:
    """Rows [index*N/parts, (index+1)*N/parts) of an FP4Tensor [N, K], keeping its global scale."""
    n = t.shape[0]
    if n % parts:
        raise ValueError(f"cannot split {n} output rows of a {t.shape} weight into {parts} equal shards")
    lo, hi = index * n // parts, (index + 1) * n // parts
    return FP4Tensor(t.data[lo:hi], t.scales[lo:hi], t.global_scale_array, (hi - lo,) + t.shape[1:], t.fmt, t.group_size)


def shard_k(t: FP4Tensor, parts: int, index: int) -> FP4Tensor:
    """Columns [index*K/parts, (index+1)*K/parts) of an FP4Tensor [N, K]; K/parts must be a multiple
    of the group size (a shard never cuts a scale block)."""
    k, gs = t.shape[1], t.group_size
    if k % parts or (k // parts) % gs:
        raise ValueError(f"cannot split K={k} of a {t.shape} weight into {parts} shards: K per shard "
                         f"({k / parts:g}) must be a whole multiple of group_size={gs}")
    lo, hi = index * k // parts, (index + 1) * k // parts
    data = t.data[:, lo // 2: hi // 2].contiguous()
    scales = t.scales[:, lo // gs: hi // gs].contiguous()
    return FP4Tensor(data, scales, t.global_scale_array, (t.shape[0], hi - lo), t.fmt, t.group_size)


def _world(group):
    return dist.get_world_size(group), dist.get_rank(group)


class ColumnParallelNVFP4Linear(nn.Module):
    """y = x @ W^T + b with W's output rows split over the ranks of ``group``."""

    def __init__(self, local: NVFP4Linear, gather_output: bool = True, group=None):
        super().__init__()
        self.local, self.gather_output, self.group = local, gather_output, group

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 16, fmt: str = "nvfp4", gather_output: bool = True,
                   group=None) -> ColumnParallelNVFP4Linear:
        """Quantize ``linear`` whole (identical on every rank) and keep this rank's rows."""
        world, rank = _world(group)
        t = quantize(linear.weight.detach(), fmt, group_size)
        bias = None if linear.bias is None else linear.bias.detach().chunk(world)[rank]
        return cls(NVFP4Linear.from_fp4(shard_rows(t, world, rank), bias), gather_output, group)

    def forward(self, x):
        y = self.local(x)
        if not self.gather_output:
            return y
        world, _ = _world(self.group)
        parts = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class RowParallelNVFP4Linear(nn.Module):
    """y = x @ W^T + b with W's input columns (K) split over the ranks of ``group``."""

    def __init__(self, local: NVFP4Linear, bias: torch.Tensor | None, input_is_parallel: bool = False, group=None):
        super().__init__()
        self.local, self.input_is_parallel, self.group = local, input_is_parallel, group
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 16, fmt: str = "nvfp4", input_is_parallel: bool = False,
                   group=None) -> RowParallelNVFP4Linear:
        """Quantize ``linear`` whole (identical on every rank) and keep this rank's K slice."""
        world, rank = _world(group)
        t = quantize(linear.weight.detach(), fmt, group_size)
        return cls(NVFP4Linear.from_fp4(shard_k(t, world, rank)), linear.bias, input_is_parallel, group)

    def forward(self, x):
        world, rank = _world(self.group)
        if not self.input_is_parallel:
            k = x.shape[-1] // world
            x = x[..., rank * k: (rank + 1) * k].contiguous()
        y = self.local(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)
