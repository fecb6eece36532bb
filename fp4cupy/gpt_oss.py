"""gpt-oss checkpoints: MoE experts in OpenAI's MXFP4 layout, read into NVFP4Experts and written from
them, bit for bit.

gpt-oss ships its experts (and only them) as MXFP4 (``quantization_config.quant_method = "mxfp4"``,
read by transformers' Mxfp4 quantizer and vLLM's mxfp4 method); every other tensor is bf16. Per
MoE block ``P`` (``model.layers.N.mlp.experts``) and projection ``p`` (``gate_up_proj``, ``down_proj``):

    P.p_blocks  uint8 [E, rows, K/32, 16]  E2M1 codes, two a byte, element 2i in the low nibble
    P.p_scales  uint8 [E, rows, K/32]      E8M0 exponents (2^(s - 127)), one a block of 32
    P.p_bias    bf16  [E, rows]

with rows the output features (gate_up_proj's interleaved gate and up) and K the input features:
expert e's weight is exactly the FP4Tensor (blocks[e] as [rows, K/2], scales[e], global scale 1)
of fp4cupy's MXFP4 format, so import and export copy bytes and decode nothing.
"""
from __future__ import annotations

import torch
from torch import nn

PROJECTIONS = {"gate_up_proj": "up", "down_proj": "down"}
# what gpt-oss's own config.json leaves in bf16
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def is_gpt_oss(keys) -> bool:
    """Whether checkpoint tensor names ``keys`` hold experts in OpenAI's MXFP4 layout."""
    return any(k.endswith(("gate_up_proj_blocks", "down_proj_blocks")) for k in keys)


def import_gpt_oss(model: nn.Module, tensors, strict: bool = True) -> nn.Module:
    """Load a gpt-oss checkpoint, ``tensors`` (name, tensor) pairs, into ``model`` (a transformers
    gpt-oss model): its experts modules become NVFP4Experts (MXFP4, group 32) holding the stored
    codes and exponents; other tensors load as they are."""
    from .experts import prepare_to_load

    state, blocks = {}, {}  # blocks: (experts module, projection) -> {"blocks" / "scales" / "bias": tensor}
    for key, t in tensors:
        prefix, _, leaf = key.rpartition(".")
        proj, _, part = leaf.rpartition("_")
        if proj in PROJECTIONS and part in ("blocks", "scales", "bias"):
            blocks.setdefault((prefix, proj), {})[part] = t
        else:
            state[key] = t
    for name in sorted({prefix for prefix, _ in blocks}):
        prepare_to_load(model, name, "mxfp4", 32)
    for (name, proj), parts in blocks.items():
        if "blocks" not in parts or "scales" not in parts:
            raise ValueError(f"{name}.{proj}: the checkpoint has {sorted(parts)}, not both blocks and scales")
        codes, scales = parts["blocks"], parts["scales"]
        experts, rows = scales.shape[:2]
        for e in range(experts):
            layer = f"{name}.{PROJECTIONS[proj]}.{e}"
            state[f"{layer}.weight"] = codes[e].reshape(rows, -1).view(torch.uint8)
            state[f"{layer}.weight_scale"] = scales[e].view(torch.uint8)
            state[f"{layer}.weight_global_scale"] = torch.tensor(1.0)
            if "bias" in parts:
                state[f"{layer}.bias"] = parts["bias"][e]
    model.load_state_dict(state, strict=strict)
    return model


def export_tensors(model: nn.Module):
    """(the tensors to write, dict a group, and the quantization_config) of a gpt-oss ``model`` whose
    experts are MXFP4 (group 32) NVFP4Experts and whose other layers are left float (quantize with
    ``skip=("self_attn", "lm_head", "embed")``); ValueError otherwise."""
    from .experts import NVFP4Experts
    from .nn import NVFP4Linear

    if getattr(getattr(model, "config", None), "model_type", None) != "gpt_oss":
        raise ValueError("the gpt-oss layout holds gpt-oss models (config.model_type 'gpt_oss')")
    experts = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Experts)}
    inside = tuple(n + "." for n in experts)
    dense = [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear) and not n.startswith(inside)]
    kinds = {(m.up[0].fmt, m.up[0].group_size) for m in experts.values()}
    if not experts or kinds != {("mxfp4", 32)} or dense:
        raise ValueError("the gpt-oss layout holds MXFP4 (group 32) experts and float other layers; this model has "
                         f"experts {sorted(kinds)} and {len(dense)} quantized Linear layers: quantize with "
                         "quantize_model(model, 'mxfp4', 32, skip=('self_attn', 'lm_head', 'embed'))")

    def tensors():
        for name, m in experts.items():
            for proj, layers in (("gate_up_proj", m.up), ("down_proj", m.down)):
                ws = [layer.fp4_weight() for layer in layers]
                rows, k = ws[0].shape
                codes = torch.stack([w.data.cpu() for w in ws])
                out = {f"{name}.{proj}_blocks": codes.reshape(len(ws), rows, k // 32, 16),
                       f"{name}.{proj}_scales": torch.stack([w.scales.cpu() for w in ws])}
                if layers[0].bias is not None:
                    out[f"{name}.{proj}_bias"] = torch.stack([layer.bias.detach().cpu() for layer in layers])
                yield out
        for key, value in model.state_dict().items():
            if not key.startswith(inside):
                yield {key: value.detach().cpu().contiguous().clone()}

    return tensors(), {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}

