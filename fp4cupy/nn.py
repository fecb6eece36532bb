"""torch modules: ``NVFP4Linear`` (the seed's ``NVFP4LinearLayer``) and whole-model quantization.

``state_dict`` carries the canonical quantized weight, so a checkpoint reloads bit for bit:

    weight        uint8   [N, K/2]    two E2M1 codes a byte, element 2i in the low nibble
    weight_scale  uint8   [N, K/gs]   E4M3 (NVFP4) or E8M0 (MXFP4) bits
    weight_global_scale float32 []    decode scale g (1 for MXFP4)
    bias          (optional) in the original dtype

On the CPU those are the layer's buffers. On CUDA, for weights the W4A16 kernel takes, the layer
holds only the kernel's repack (``codes``, ``scale_codes``: the same 4.5 bits a weight) and decodes
the canonical bytes when they are asked for (``state_dict``, ``fp4_weight()``, moving to the CPU).

forward(x) = x @ deq(W).T + bias with FP32 accumulation, through the ``fp4cupy::linear`` custom op:
exact reference on the CPU, the W4A16 tensor-core kernel on CUDA.
"""
from __future__ import annotations

import fnmatch
import functools

import torch
from torch import nn

from . import torch_ops  # noqa: F401  (registers the custom ops)
from .formats import get_format
from .fused import FUSED_SIBLINGS, fused_groups, shared_global_scale
from .ops import quantize
from .prepared import mxfp4_scales_from_nvfp4, prepare
from .tensor import FP4Tensor


class _class_or_instance_method:
    """Calls ``f(cls, instance_or_None, ...)``: one name for a constructor and an in-place filler."""

    def __init__(self, f):
        self.f = f
        self.__doc__ = f.__doc__

    def __get__(self, obj, cls):
        return functools.partial(self.f, cls, obj)


class NVFP4Linear(nn.Module):
    """A linear layer with an FP4 weight [out_features, in_features] (NVFP4 by default, or MXFP4).

    ``NVFP4Linear(in_features, out_features, group_size=16, bias=True)`` makes an empty (zero)
    layer to fill from a state dict; ``NVFP4Linear.from_float(linear)`` quantizes an ``nn.Linear``.
    """

    # counts every repack, materialize and move of any layer: who keeps raw pointers to layers'
    # buffers (NVFP4Experts' grouped launch table) rebuilds them when it changed
    buffers_generation = 0

    def __init__(self, in_features: int, out_features: int, group_size: int = 16, bias: bool = True,
                 fmt: str = "nvfp4", device=None, dtype=None):
        super().__init__()
        f = get_format(fmt)
        gs = f.check_group_size(group_size)
        if in_features % gs:
            raise ValueError(f"in_features={in_features} must be a multiple of group_size={gs}")
        self.in_features, self.out_features, self.group_size, self.fmt = in_features, out_features, gs, f.name
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // gs, dtype=torch.uint8, device=device))
        self.register_buffer("weight_global_scale", torch.ones((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        # the W4A16 repack of the weight (CUDA only; not saved): rebuilt by from_float, .to()/.cuda()
        # and load_state_dict, so forward only reads buffers (traceable by torch.compile)
        self.register_buffer("codes", None, persistent=False)
        self.register_buffer("scale_codes", None, persistent=False)
        # an MXFP4 weight runs as the NVFP4 tensor of the same values: the repack's global scale 2^r
        self.register_buffer("kernel_global_scale", None, persistent=False)
        self.no_repack_on = None  # the device where prepare() last declined the weight (see refresh_repack)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_repack())

    @_class_or_instance_method
    def from_float(cls, self, linear: nn.Linear, group_size: int | None = None, fmt: str | None = None,
                   global_scale: float | None = None, scale_mode: str | None = None) -> NVFP4Linear:
        """Quantize ``linear.weight`` (recipe of DESIGN.md section 1).

        ``NVFP4Linear.from_float(linear)`` makes a new layer on linear's device;
        ``NVFP4LinearLayer(in, out, group_size).from_float(linear)`` (the seed's form) fills that
        layer (its group size and format) and returns it. ``global_scale`` (NVFP4): the decode
        scale to use instead of the weight's amax / (6 * 448), e.g. one shared with fused siblings.
        ``scale_mode`` (MXFP4): "floor" (OCP, the default), "rceil" (torchao) or "round"
        (compressed-tensors / llm-compressor, bit for bit)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float takes an nn.Linear; got {type(linear).__name__}")
        w = linear.weight.detach()
        if self is None:
            layer = cls(linear.in_features, linear.out_features, group_size or 16, linear.bias is not None,
                        fmt or "nvfp4", device=w.device, dtype=linear.bias.dtype if linear.bias is not None else w.dtype)
        else:
            layer = self
            if (linear.in_features, linear.out_features) != (layer.in_features, layer.out_features):
                raise ValueError(f"from_float: the layer is {layer.in_features} -> {layer.out_features} but the "
                                 f"nn.Linear is {linear.in_features} -> {linear.out_features}")
            layer.to(w.device)
            layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        t = quantize(w, layer.fmt, layer.group_size, global_scale=global_scale, scale_mode=scale_mode)
        layer.weight, layer.weight_scale = t.data, t.scales  # fresh buffers (a repacked layer has none)
        g = t.global_scale_array
        layer.weight_global_scale.copy_(g if isinstance(g, torch.Tensor) else torch.tensor(float(g)))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        layer.refresh_repack()
        return layer

    @classmethod
    def from_fp4(cls, weight: FP4Tensor, bias: torch.Tensor | None = None) -> NVFP4Linear:
        """A layer around an already quantized torch FP4Tensor weight [N, K] (e.g. one shard of a
        tensor-parallel weight); ``bias`` [N] is copied."""
        if not isinstance(weight, FP4Tensor) or len(weight.shape) != 2 or weight.library != "torch":
            raise TypeError(f"from_fp4 takes a 2-D FP4Tensor of torch tensors; got {weight!r}")
        n, k = weight.shape
        layer = cls(k, n, weight.group_size, bias is not None, weight.fmt, device=weight.data.device,
                    dtype=bias.dtype if bias is not None else None)
        layer.weight, layer.weight_scale = weight.data, weight.scales
        g = weight.global_scale_array
        layer.weight_global_scale.copy_(g if isinstance(g, torch.Tensor) else torch.tensor(float(g)))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        layer.refresh_repack()
        return layer

    def fp4_weight(self) -> FP4Tensor:
        """The canonical weight as an FP4Tensor: views of the buffers, or decoded from the repack
        when that is the only copy (on CUDA)."""
        data, scales = self.weight, self.weight_scale
        if data is None:
            from . import cuda_linear

            data, scales = cuda_linear.unrepack(self.codes, self.scale_codes, self.out_features, self.in_features,
                                                self.group_size)
            if self.kernel_global_scale is not None:
                scales = mxfp4_scales_from_nvfp4(scales, self.kernel_global_scale)
        g = self.weight_global_scale if data.is_cuda else float(self.weight_global_scale)
        return FP4Tensor(data, scales, g, (self.out_features, self.in_features), self.fmt, self.group_size)

    def refresh_repack(self) -> None:
        """Repack the weight buffers for the W4A16 kernel (on CUDA, for weights it takes) and drop the
        canonical buffers: the repack is then the only copy on the GPU (4.5 bits a weight), and
        ``state_dict`` / ``fp4_weight`` decode the canonical form from it. Call it after changing the
        canonical buffers by hand."""
        if self.weight is None:
            return
        codes = scale_codes = kernel_g = None
        self.no_repack_on = None
        if self.weight.is_cuda:
            pw = prepare(self.fp4_weight())  # MXFP4: the NVFP4 twin, or the dequantize path (and why)
            if pw.path == "mma":
                codes, scale_codes = pw.codes, pw.scale_codes
                kernel_g = pw.global_scale if self.fmt == "mxfp4" else None
                self.weight, self.weight_scale = None, None
            else:  # moves to the same device need not ask again
                self.no_repack_on = self.weight.device
        self.codes, self.scale_codes, self.kernel_global_scale = codes, scale_codes, kernel_g
        NVFP4Linear.buffers_generation += 1

    def _materialize(self) -> None:
        """Canonical buffers back from the repack (before loading into them, or on leaving the GPU)."""
        if self.weight is None:
            if self.codes.is_cuda:
                t = self.fp4_weight()
                self.weight, self.weight_scale = t.data, t.scales
            else:
                from .prepared import unpack_codes, unpack_scales

                n, k = self.out_features, self.in_features
                self.weight = torch.from_numpy(unpack_codes(self.codes.numpy(), n, k))
                scales = torch.from_numpy(unpack_scales(self.scale_codes.numpy(), n, k, self.group_size))
                g = self.kernel_global_scale
                self.weight_scale = scales if g is None else mxfp4_scales_from_nvfp4(scales, g)
            self.codes = self.scale_codes = self.kernel_global_scale = None
            NVFP4Linear.buffers_generation += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.with_bias(x, self.bias)

    def with_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T + bias`` with ``bias`` in place of the layer's own (vLLM's linear layers hold
        theirs). The W4A16 kernels add it in FP32 before rounding the output once."""
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)}: this layer takes [{self.out_features}] "
                             "(out_features) or None")
        bias = None if bias is None else bias.to(x.dtype)
        g, fmt = self.weight_global_scale, self.fmt
        if self.kernel_global_scale is not None:  # the repack of an MXFP4 weight's NVFP4 twin
            g, fmt = self.kernel_global_scale, "nvfp4"
        if (self.codes is not None and x.is_cuda and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
            # no gradient to track and not traced: the op's own first step, without its dispatch
            from . import cuda_linear

            y = cuda_linear.linear_repacked(x, self.codes, self.scale_codes, g, self.out_features, bias)
            if y is not None:
                return y
        return torch.ops.fp4cupy.linear(x, self.weight, self.weight_scale, g, self.codes, self.scale_codes, bias,
                                        fmt, self.group_size, self.out_features)

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) cast floating buffers: the global scales stay float32 (rounded, every
        # weight would decode off the recipe), only their device follows
        scales = {k: self._buffers[k] for k in ("weight_global_scale", "kernel_global_scale")
                  if self._buffers.get(k) is not None}
        self._buffers.update(dict.fromkeys(scales))
        out = super()._apply(fn, recurse)
        for k, t in scales.items():
            moved = fn(t)
            self._buffers[k] = moved if moved.dtype == torch.float32 else t.to(moved.device)
        if self.weight is None and not self.codes.is_cuda:
            self._materialize()  # the repack left the GPU: the CPU keeps the canonical form
        elif (self.weight is not None and self.weight.is_cuda and self.no_repack_on != self.weight.device
              and (self.codes is None or self.codes.device != self.weight.device)):
            self.refresh_repack()
        NVFP4Linear.buffers_generation += 1
        return out

    def __setstate__(self, state):  # copy.deepcopy, pickle: new buffers
        super().__setstate__(state)
        NVFP4Linear.buffers_generation += 1

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:  # held only as the repack: export the canonical bytes
            t = self.fp4_weight()
            destination[prefix + "weight"], destination[prefix + "weight_scale"] = t.data, t.scales

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._materialize()  # the canonical buffers receive the checkpoint; the post hook repacks
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_nbytes(self) -> int:
        """Bytes this layer's weight holds on its device (canonical buffers or the repack, + 4 for g)."""
        held = (self.weight, self.weight_scale) if self.weight is not None else (self.codes, self.scale_codes)
        return sum(t.numel() * t.element_size() for t in held) + 4

    def extra_repr(self) -> str:
        nbytes = self.weight_nbytes()
        dense = 2 * self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"weight={nbytes / 2**20:.2f} MiB ({dense / nbytes:.2f}x smaller than bf16)")


NVFP4LinearLayer = NVFP4Linear


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen, tied = {}, set()
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    for pid, count in seen.items():
        if count > 1:
            tied.add(pid)
    return tied


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model.get_submodule(name)`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class QuantizationReport(list):
    """One dict per nn.Linear met, and per MoE experts' weight stack (shape [E, out, in], experts.py):
    name, shape, bytes_before, bytes_after, rel_error (Frobenius error of the dequantized weight),
    'global_scale_shared_with' (the fused siblings, see fused.py) and, where left alone, 'skipped'
    with the reason. ``.model`` is the quantized model."""

    def __init__(self, entries, model):
        super().__init__(entries)
        self.model = model

    def __str__(self) -> str:
        done = [e for e in self if "skipped" not in e]
        before, after = sum(e["bytes_before"] for e in self), sum(e["bytes_after"] for e in self)
        worst = max((e["rel_error"] for e in done), default=0.0)
        shared = sum("global_scale_shared_with" in e for e in done)
        layers, stacks = ([e for e in self if len(e["shape"]) == d] for d in (2, 3))
        what = f"{sum('skipped' not in e for e in layers)} of {len(layers)} Linear layers"
        if stacks:
            what += f" and {sum('skipped' not in e for e in stacks)} of {len(stacks)} MoE expert weight stacks"
        return (f"{what} quantized; linear weights {before / 2**20:.1f} MiB -> "
                f"{after / 2**20:.1f} MiB; worst relative weight error {worst:.4f}"
                + (f"; {shared} layers share a global scale with their fused siblings" if shared else ""))


def quantize_model(model: nn.Module, fmt: str = "nvfp4", group_size: int = 16, replace_linear: bool = True,
                   skip=("lm_head", "embed"), inplace: bool = True, progress: bool = True,
                   fused=FUSED_SIBLINGS, scale_mode: str | None = None, device=None) -> QuantizationReport:
    """Replace every ``nn.Linear`` of ``model`` by an ``NVFP4Linear``, and every transformers MoE
    experts module of 3-D weights by an ``NVFP4Experts`` (in place, or in a deep copy with
    ``inplace=False``; the result is ``report.model``) and return the per-layer report.

    skip:  names or glob patterns: a plain name matches any layer whose qualified name contains it
           ("lm_head"), a pattern is matched against the qualified name ("*.mlp.down_proj").
           Layers with tied weights, whose in_features is not a multiple of the group, or with fewer
           than 16 outputs (routers and gates: GATE_MAX_OUT) are left alone.
    replace_linear=False only measures (the report) and leaves the model as it is.
    fused: sibling names whose layers vLLM runs as one matrix (q/k/v, gate/up, ...: fused.py); in
           NVFP4 each such group shares one global scale, amax of the group / (6 * 448), as
           modelopt and llm-compressor do and vLLM's own NVFP4 kernels need. ``()``: one a layer.
    scale_mode: MXFP4's block-scale rule (see NVFP4Linear.from_float): "floor", "rceil" or "round".
    device: quantize on this device (e.g. "cuda"), each layer's float weight (an expert's, for
           experts) copied there alone, then move the model there: a float model held in CPU memory
           becomes an FP4 model on the GPU with at most one float weight on it at a time. The layers
           are those quantize_model makes on that device, bit for bit. (With ``replace_linear=False``
           the model stays where it is.)
    """
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    tied = _tied(model)
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    bar = _progress(linears, progress, f"quantizing to {fmt}", "layer")
    skipped = {name: _skip_reason(name, lin, skip, tied, group_size) for name, lin in linears}
    shared = {}  # name -> (global scale, the group's names)
    if get_format(fmt).global_scale:
        modules = dict(linears)
        for group in fused_groups([name for name, _ in linears if not skipped[name]], fused):
            g = shared_global_scale([modules[name].weight for name in group])
            if g is not None:
                shared.update((name, (g, group)) for name in group)
    entries = []
    for name, lin in bar:
        entry = dict(name=name, shape=tuple(lin.weight.shape), bytes_before=lin.weight.numel() * lin.weight.element_size())
        why = skipped[name]
        if why:
            entry.update(skipped=why, bytes_after=entry["bytes_before"], rel_error=0.0)
            entries.append(entry)
            continue
        g, group = shared.get(name, (None, ()))
        if group:
            entry["global_scale_shared_with"] = tuple(other for other in group if other != name)
        lin = _copy_to(lin, device)
        layer = NVFP4Linear.from_float(lin, group_size, fmt, global_scale=g, scale_mode=scale_mode)
        w = lin.weight.detach().float()
        err = torch.linalg.norm(layer.fp4_weight().dequantize().float().sub_(w)) / torch.linalg.norm(w).clamp_min(1e-30)
        entry.update(bytes_after=layer.weight_nbytes(), rel_error=float(err))
        entries.append(entry)
        if replace_linear:
            replace_module(model, name, layer)
    entries += _quantize_experts(model, fmt, group_size, replace_linear, skip, scale_mode, progress, device)
    if device is not None and replace_linear:
        model.to(device)
    return QuantizationReport(entries, model)


def _copy_to(lin: nn.Linear, device) -> nn.Linear:
    """``lin``, or where ``device`` is given a copy of it there (``lin`` stays where it is)."""
    if device is None:
        return lin
    copy = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    copy.weight = nn.Parameter(lin.weight.detach().to(device), requires_grad=False)
    if lin.bias is not None:
        copy.bias = nn.Parameter(lin.bias.detach().to(device), requires_grad=False)
    return copy


def _progress(items, on: bool, desc: str, unit: str):
    """``items``, with a tqdm bar when ``on`` and tqdm is installed."""
    if on and items:
        try:
            from tqdm.auto import tqdm

            return tqdm(items, desc=desc, unit=unit)
        except ImportError:
            pass
    return items


def _quantize_experts(model, fmt, group_size, replace, skip, scale_mode, progress, device=None) -> list[dict]:
    """quantize_model's part for transformers' MoE experts of 3-D weights (experts.py): an entry a
    projection (shape [E, out, in]), quantized on ``device`` (None: where the weights are)."""
    from .experts import NVFP4Experts, expert_weights, experts_view, install_experts, quantized_experts, weight_names

    entries = []
    blocks = [(n, view) for n, m in model.named_modules() if (view := experts_view(m)) is not None]
    for name, mod in _progress(blocks, progress, f"quantizing experts to {fmt}", "block"):
        weights = {w: expert_weights(mod, w) for w in weight_names(mod)}
        base = [dict(name=f"{name}.{w}", shape=tuple(t.shape), bytes_before=t.numel() * t.element_size())
                for w, t in weights.items()]
        why = _skip_reason(name, None, skip, (), group_size) or next(
            (f"in_features={t.shape[2]} is not a multiple of group_size={group_size}" for t in weights.values()
             if t.shape[2] % group_size), None)
        if why:
            entries += [dict(e, skipped=why, bytes_after=e["bytes_before"], rel_error=0.0) for e in base]
            continue
        up, down = quantized_experts(mod, fmt, group_size, scale_mode, device)
        for e, w, layers in zip(base, weights.values(), (up, down)):
            diff = norm = 0.0
            for i, layer in enumerate(layers):  # an expert at a time: no float copy of w
                back = layer.fp4_weight().dequantize().float()
                wi = w[i].to(back.device).float()
                diff, norm = diff + float(torch.linalg.norm(back - wi)) ** 2, norm + float(torch.linalg.norm(wi)) ** 2
            err = (diff / max(norm, 1e-60)) ** 0.5
            entries.append(dict(e, bytes_after=sum(layer.weight_nbytes() for layer in layers), rel_error=err))
        if replace:
            install_experts(model, name, NVFP4Experts.around(mod, up, down))
    return entries


# nn.Linear layers with fewer outputs are routers and gates (a MoE router of few experts, Qwen2-MoE's
# shared_expert_gate of 1): vLLM builds them unquantized, and their bytes are nothing to save
GATE_MAX_OUT = 16


def _skip_reason(name, lin, skip, tied, group_size):
    for pat in (skip,) if isinstance(skip, str) else skip or ():
        wild = any(c in pat for c in "*?[")
        if (fnmatch.fnmatch(name, pat) if wild else pat in name):
            return f"matches skip {pat!r}"
    if lin is None:
        return None
    if id(lin.weight) in tied:
        return "tied weight"
    if lin.in_features % group_size:
        return f"in_features={lin.in_features} is not a multiple of group_size={group_size}"
    if lin.out_features < GATE_MAX_OUT:
        return f"out_features={lin.out_features}: a router or gate, kept in float (as vLLM and llm-compressor keep them)"
    return None


def quantize_model_to_nvfp4(model: nn.Module, group_size: int = 16, replace_linear: bool = True,
                            skip=("lm_head", "embed"), **kwargs) -> QuantizationReport:
    """The seed's name: ``quantize_model(model, fmt='nvfp4', ...)``."""
    return quantize_model(model, "nvfp4", group_size, replace_linear, skip, **kwargs)
