"""Save and load quantized torch models as safetensors (no pickle), with the format as metadata.

    fp4cupy.save(model_or_state_dict, "model.safetensors")
    state = fp4cupy.load("model.safetensors")                 # a state dict
    fp4cupy.load("model.safetensors", model)                  # into a model: its nn.Linear layers that
                                                              # were quantized become NVFP4Linear first
Metadata: "fp4cupy.version" and "fp4cupy.layers", a JSON object {layer name: {fmt, group_size,
in_features, out_features, bias}} for every NVFP4Linear in the saved model, and "fp4cupy.experts",
{module name: {fmt, group_size}} for every NVFP4Experts (a MoE block's experts, experts.py).
"""
from __future__ import annotations

import json

import torch
from torch import nn

from . import __version__
from .nn import NVFP4Linear, replace_module

META_LAYERS = "fp4cupy.layers"
META_EXPERTS = "fp4cupy.experts"


def _layers(model: nn.Module) -> dict:
    return {name: dict(fmt=m.fmt, group_size=m.group_size, in_features=m.in_features,
                       out_features=m.out_features, bias=m.bias is not None)
            for name, m in model.named_modules() if isinstance(m, NVFP4Linear)}


def _experts(model: nn.Module) -> dict:
    from .experts import NVFP4Experts

    return {name: dict(fmt=m.up[0].fmt, group_size=m.up[0].group_size)
            for name, m in model.named_modules() if isinstance(m, NVFP4Experts)}


def save(model_or_state, path, metadata: dict | None = None) -> None:
    """Write a model's (or a state dict's) tensors to ``path`` in safetensors, contiguous, on the CPU."""
    from safetensors.torch import save_file

    if isinstance(model_or_state, nn.Module):
        state, layers, experts = model_or_state.state_dict(), _layers(model_or_state), _experts(model_or_state)
    else:
        state, layers, experts = dict(model_or_state), {}, {}
    # tied tensors are stored once per name (safetensors refuses shared storage)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {"fp4cupy.version": __version__, META_LAYERS: json.dumps(layers), META_EXPERTS: json.dumps(experts)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    save_file(tensors, str(path), metadata=meta)


def load(path, model: nn.Module | None = None, device="cpu", strict: bool = True):
    """The state dict stored at ``path`` (on ``device``); with ``model``, load it into the model after
    turning the layers saved as NVFP4Linear (and the experts saved as NVFP4Experts) into those, and
    return the model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    if model is None:
        return state
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    layers, experts = (json.loads(meta.get(key, "{}")) for key in (META_LAYERS, META_EXPERTS))
    if experts:
        from .experts import prepare_to_load

        for name, spec in experts.items():
            prepare_to_load(model, name, spec["fmt"], spec["group_size"])
    for name, spec in layers.items():
        current = model.get_submodule(name)
        if isinstance(current, NVFP4Linear):
            continue
        ref = next(iter(current.parameters()), None)
        layer = NVFP4Linear(spec["in_features"], spec["out_features"], spec["group_size"], spec["bias"], spec["fmt"],
                            device=ref.device if ref is not None else None,
                            dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.bfloat16)
        replace_module(model, name, layer)
    model.load_state_dict(state, strict=strict)
    return model
