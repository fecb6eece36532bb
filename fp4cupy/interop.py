"""Export and import quantized checkpoints in the layouts other tools read, shard by shard.

    fp4cupy.export(model, "out/", format="modelopt" | "compressed-tensors" | "nvfp4" | "gpt-oss")
    fp4cupy.import_checkpoint(model, "out/")      # NVFP4Linear layers filled bit-exactly

Tensors are named as the model's checkpoint names them (transformers' save_pretrained names,
checkpoint_names.py): a MoE block's NVFP4Experts is written as one layer an expert and projection
(``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``block_sparse_moe.experts.{e}.w1`` /
``w3`` / ``w2``), gate and up with the same global scale, and read back from them.

Per quantized linear layer ``p`` (N x K, group 16; W = weight, g = fp4cupy's decode global scale):

| format | packed E2M1 codes | block scales | global scale |
|---|---|---|---|
| nvfp4 (fp4cupy) | p.weight uint8 [N, K/2] | p.weight_scale uint8 | p.weight_global_scale f32 [] = g |
| modelopt (vLLM modelopt_fp4) | p.weight uint8 | p.weight_scale float8_e4m3fn | p.weight_scale_2 f32 [] = g |
| compressed-tensors nvfp4-pack-quantized | p.weight_packed uint8 | p.weight_scale float8_e4m3fn | p.weight_global_scale f32 [1] = 1/g |
| compressed-tensors mxfp4-pack-quantized (MXFP4, group 32) | p.weight_packed uint8 | p.weight_scale uint8 E8M0 [N, K/32] | none |

A model quantized to MXFP4 (group 32) exports as compressed-tensors' mxfp4-pack-quantized (the
layout "compressed-tensors-mxfp4"), or as fp4cupy's own. Codes are two a byte, element 2i in the
low nibble, in all of them. compressed-tensors divides by its global scale; the exported 1/g is a
float32 whose reciprocal rounds back to g where such a float32 exists (most g), else the nearest:
then g comes back 1 ulp (2^-24 relative) off. Codes and block scales always round-trip bit for
bit. Other tensors (embeddings, norms, skipped layers) are written as they are.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint_names import checkpoint_name, checkpoint_tensors
from .experts import FloatExperts, NVFP4Experts, checkpoint_layers, experts_view, prepare_to_load
from .gpt_oss import export_tensors as gpt_oss_tensors
from .gpt_oss import import_gpt_oss, is_gpt_oss
from .nn import NVFP4Linear, replace_module
from .tensor import FP4Tensor

FORMATS = ("nvfp4", "modelopt", "compressed-tensors")  # a layer at a time; export also writes "gpt-oss"
# Per layout: the tensor names of the codes, the block scales, the global scale and the static
# activation scale (W4A4); whether block scales are stored as float8_e4m3fn (else uint8 bits); and
# whether global scales are stored inverted (1/g, as a one-element vector: compressed-tensors).
LAYOUTS = {
    "nvfp4": dict(codes="weight", scales="weight_scale", g="weight_global_scale", act="input_scale",
                  fp8_scales=False, inverse=False),
    "modelopt": dict(codes="weight", scales="weight_scale", g="weight_scale_2", act="input_scale",
                     fp8_scales=True, inverse=False),
    "compressed-tensors": dict(codes="weight_packed", scales="weight_scale", g="weight_global_scale",
                               act="input_global_scale", fp8_scales=True, inverse=True),
    "compressed-tensors-mxfp4": dict(codes="weight_packed", scales="weight_scale", g=None, act=None,
                                     fp8_scales=False, inverse=False),
}
SHARD_BYTES = 2 * 2**30
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "vocab.txt", "merges.txt", "vocab.json")


def inverse_global_scale(g: float) -> float:
    """A float32 c near 1/g whose float32 reciprocal is g again (when one exists; else RN(1/g))."""
    c = np.float32(1.0) / np.float32(g)
    for cand in (c, np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(0))):
        if np.float32(1.0) / cand == np.float32(g):
            return float(cand)
    return float(c)


def calibrate(model: nn.Module, batches, progress: bool = True) -> dict:
    """Per-layer max |input| of every NVFP4Linear / nn.Linear over ``batches`` (each a tensor of
    input ids, or a dict of model kwargs): the activation amax a W4A4 export needs."""
    amax, hooks = {}, []

    def hook(name):
        def record(module, args):
            a = float(args[0].detach().abs().max())
            amax[name] = max(amax.get(name, 0.0), a)
        return record

    for name, m in model.named_modules():
        if isinstance(m, (NVFP4Linear, nn.Linear)):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        items = batches
        if progress:
            try:
                from tqdm.auto import tqdm

                items = tqdm(batches, desc="calibrating", unit="batch")
            except ImportError:
                pass
        with torch.no_grad():
            for b in items:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in hooks:
            h.remove()
    return amax


def _layout(format: str, layers: dict) -> str:
    """The LAYOUTS key that ``format`` writes these layers in; ValueError if it cannot hold them."""
    kinds = {(m.fmt, m.group_size) for m in layers.values()}
    if format == "nvfp4" or kinds == {("nvfp4", 16)}:
        return format
    if format == "compressed-tensors" and kinds == {("mxfp4", 32)}:
        return "compressed-tensors-mxfp4"
    raise ValueError(f"{format} checkpoints hold NVFP4 with group 16 in every layer"
                     f"{' (or MXFP4 with group 32 in every layer)' if format == 'compressed-tensors' else ''}; "
                     f"this model has {sorted(f'{f} group {g}' for f, g in kinds)}")


def _layer_tensors(name: str, w: FP4Tensor, bias, layout_key: str, input_amax: float | None = None) -> dict:
    """The checkpoint tensors of layer ``name``: weight ``w`` [N, K] and ``bias`` (or None)."""
    layout = LAYOUTS[layout_key]
    data, scales = w.data.detach().cpu(), w.scales.detach().cpu()

    def global_scale(g: float) -> torch.Tensor:
        if layout["inverse"]:
            return torch.tensor([inverse_global_scale(g)], dtype=torch.float32)
        return torch.tensor(g, dtype=torch.float32)

    out = {layout["codes"]: data, layout["scales"]: scales.view(torch.float8_e4m3fn) if layout["fp8_scales"] else scales}
    if layout["g"]:
        out[layout["g"]] = global_scale(float(w.global_scale))
    if input_amax is not None and layout_key != "nvfp4":  # W4A4: the activation's decode global scale (amax / 2688)
        out[layout["act"]] = global_scale(float(np.float32(max(input_amax, 1e-30)) / np.float32(2688.0)))
    if bias is not None:
        out["bias"] = bias.detach().cpu()
    return {f"{name}.{k}": v.contiguous() for k, v in out.items()}


def _quant_config(layout_key: str, group_size: int, ignore: list, w4a4: bool = False) -> dict:
    if layout_key == "nvfp4":
        return {"quant_method": "nvfp4", "group_size": group_size, "ignore": ignore, "producer": {"name": "fp4cupy", "version": __version__}}
    if layout_key == "modelopt":
        # weight-only NVFP4; vLLM's ModelOpt loader reads quant_algo (W4A4 checkpoints say "NVFP4")
        return {"quant_method": "modelopt", "quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "group_size": group_size,
                "exclude_modules": ignore, "ignore": ignore}
    scheme = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": group_size,
              "symmetric": True, "dynamic": False}
    packed = "nvfp4-pack-quantized"
    if layout_key == "compressed-tensors-mxfp4":  # E8M0 scales as uint8, no global scale
        scheme, packed = dict(scheme, strategy="group", scale_dtype="torch.uint8"), "mxfp4-pack-quantized"
    return {"quant_method": "compressed-tensors", "format": packed, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme,
                                          "input_activations": dict(scheme, dynamic="local") if w4a4 else None,
                                          "output_activations": None, "format": packed}},
            "ignore": ignore}


def export(model: nn.Module, out_dir, format: str = "nvfp4", source_dir=None, shard_bytes: int = SHARD_BYTES,
           input_amax: dict | None = None) -> Path:
    """Write ``model`` (with NVFP4Linear layers, NVFP4Experts) to ``out_dir`` as sharded safetensors in ``format``,
    plus config.json with its quantization_config (and hf_quant_config.json for modelopt). Tensors
    are converted and written one shard at a time. Tokenizer files are copied from ``source_dir``.
    ``input_amax`` (from ``calibrate``) makes a W4A4 modelopt / compressed-tensors checkpoint with
    static activation global scales (input_scale / input_global_scale). A model whose layers are all
    MXFP4 with group 32 writes compressed-tensors' mxfp4-pack-quantized (weight-only). "gpt-oss":
    a gpt-oss model with MXFP4 experts only, in OpenAI's layout (gpt_oss.py), as gpt-oss ships."""
    from safetensors.torch import save_file

    if format not in (*FORMATS, "gpt-oss"):
        raise ValueError(f"format must be one of {(*FORMATS, 'gpt-oss')}; got {format!r}")
    if format == "gpt-oss":
        if input_amax:
            raise ValueError("the gpt-oss layout is weight-only: no input_amax")
        tensors, qcfg = gpt_oss_tensors(model)
    else:
        tensors, qcfg = _layer_tensors_to_write(model, format, input_amax)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pending, shards, size = {}, [], 0

    def flush():
        nonlocal pending, size
        if pending:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(pending, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(pending)))
            pending, size = {}, 0

    for group in tensors:
        for k, v in group.items():
            pending[k] = v
            size += v.numel() * v.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    weight_map = {k: name for name, keys in shards for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    if format == "modelopt":
        hf = {"producer": {"name": "fp4cupy", "version": __version__},
              "quantization": {k: qcfg[k] for k in ("quant_algo", "group_size", "exclude_modules")} | {"kv_cache_quant_algo": None}}
        (out / "hf_quant_config.json").write_text(json.dumps(hf, indent=2))
    for f in SIDE_FILES:
        if source_dir is not None and (Path(source_dir) / f).is_file():
            shutil.copy2(Path(source_dir) / f, out / f)
    return out


def _float_matmul(module: nn.Module) -> bool:
    """Whether ``module`` multiplies by a float weight matrix of its own that a reader could take for
    a linear layer to quantize: nn.Linear, or a MoE router (transformers 5's TopKRouter holds a bare
    2-D ``weight``; vLLM builds a linear layer for it). Its name goes in the ignore list."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (
        not isinstance(module, (nn.Embedding, NVFP4Linear)) and isinstance(weight, nn.Parameter) and weight.dim() == 2
        and weight.is_floating_point())


def _float_experts(model: nn.Module) -> list:
    """The checkpoint names of ``model``'s experts modules left in float (``experts.{e}.*`` layers
    under them): a reader's MoE layer of that name is not quantized."""
    out = []
    for name, module in model.named_modules():
        if experts_view(module) is not None:
            try:
                layers = checkpoint_layers(model, name, module)
            except NotImplementedError:  # kept as 3-D weights under the module's own name
                out.append(name)
                continue
            out += sorted({key.rsplit(f".{e}.", 1)[0] for key, (_, e, _, _) in layers.items()})
    return out


def _layer_tensors_to_write(model: nn.Module, format: str, input_amax: dict | None):
    """(the tensors to write, dict a group, and the quantization_config) of ``model`` in ``format``
    (not gpt-oss); the checks run before the first tensor is made."""
    experts = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Experts)}
    expert_layers = {n: checkpoint_layers(model, n, m) for n, m in experts.items()}  # before any file is written
    if experts and input_amax:
        raise NotImplementedError("W4A4 export (input_amax) of MoE experts is not supported: export weight-only")
    inside = tuple(n + "." for n in experts)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear) and not n.startswith(inside)}
    if not layers and not experts:
        raise ValueError("the model has no NVFP4Linear layers: quantize it first (fp4cupy.quantize_model)")
    layout = _layout(format, {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)})
    if input_amax and not LAYOUTS[layout]["act"]:
        raise ValueError(f"input_amax makes W4A4 NVFP4 checkpoints; {layout} has no static activation scale")
    ignore = sorted(checkpoint_name(model, n + ".weight").removesuffix(".weight") for n, m in model.named_modules()
                    if _float_matmul(m)) + _float_experts(model)
    some = next(m for m in model.modules() if isinstance(m, NVFP4Linear))
    qcfg = _quant_config(layout, some.group_size, ignore, w4a4=bool(input_amax) and format != "nvfp4")

    def tensors():
        # FP4 layers: weight, weight_scale, weight_global_scale, bias written together, converted;
        # other tensors as they are. All under the checkpoint's names (checkpoint_names.py).
        for name, m in layers.items():
            yield _layer_tensors(checkpoint_name(model, name + ".weight").removesuffix(".weight"), m.fp4_weight(),
                                 m.bias, layout, (input_amax or {}).get(name))
        for name, m in experts.items():
            for ckpt, (proj, e, r0, rows) in expert_layers[name].items():
                layer = getattr(m, proj)[e]
                w = layer.fp4_weight()
                part = FP4Tensor(w.data[r0:r0 + rows], w.scales[r0:r0 + rows], w.global_scale, (rows, w.shape[1]),
                                 w.fmt, w.group_size)
                yield _layer_tensors(ckpt, part, None if layer.bias is None else layer.bias[r0:r0 + rows], layout)
        fp4 = tuple(n + "." for n in (*layers, *experts))
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith(fp4)}
        for key, value in checkpoint_tensors(model, rest).items():
            yield {key: value.detach().cpu().contiguous().clone()}

    return tensors(), qcfg


def detect_format(keys) -> str:
    """The LAYOUTS key of a checkpoint, from its tensor names."""
    keys = list(keys)
    if any(k.endswith(".weight_packed") for k in keys):
        mx = not any(k.endswith(".weight_global_scale") for k in keys)
        return "compressed-tensors-mxfp4" if mx else "compressed-tensors"
    if any(k.endswith(".weight_scale_2") for k in keys):
        return "modelopt"
    if any(k.endswith(".weight_global_scale") for k in keys):
        return "nvfp4"
    raise ValueError("no NVFP4 layers found in the checkpoint (expected weight_packed, weight_scale_2 or "
                     "weight_global_scale tensors)")


def import_checkpoint(model: nn.Module, src_dir, strict: bool = True) -> nn.Module:
    """Load a checkpoint written in any of FORMATS into ``model``: the Linear layers it quantized become
    NVFP4Linear, and experts modules whose per-expert layers it quantized NVFP4Experts, with the
    stored codes and scales, read one shard at a time; per-expert layers it keeps in float are
    stacked back into the model's 3-D experts. A gpt-oss checkpoint (OpenAI's MXFP4 experts,
    gpt_oss.py) loads into a transformers gpt-oss model, its experts as MXFP4 NVFP4Experts."""
    from safetensors import safe_open

    src = Path(src_dir)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {src}")
    keys = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            keys.update({k: f for k in h.keys()})
    if is_gpt_oss(keys):  # OpenAI's MXFP4 experts (gpt_oss.py)
        return import_gpt_oss(model, _tensors(files), strict)
    layout = LAYOUTS[detect_format(keys)]
    codes_key, scale2 = layout["codes"], layout["g"]
    fmt, group = ("nvfp4", 16) if scale2 else ("mxfp4", 32)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Experts) or experts_view(m) is not None}
    inside = tuple(n + "." for n in experts)
    # the model's tensor name of each checkpoint name (they differ where transformers renames)
    names = {checkpoint_name(model, k, v): k for k, v in model.state_dict().items() if not k.startswith(inside)}
    quantized = {k.rsplit(".", 1)[0] for k in keys if k.endswith("." + (scale2 or codes_key))}
    per_expert, why = {}, []  # checkpoint layer -> (experts module, "up" or "down", expert, first row, rows)
    for name, m in experts.items():
        try:
            per_expert.update({c: (name, *spec) for c, spec in checkpoint_layers(model, name, m).items()})
        except NotImplementedError as e:
            why.append(str(e))
    for name in {per_expert[q][0] for q in quantized if q in per_expert}:
        prepare_to_load(model, name, fmt, group)
    float_experts = FloatExperts(model)  # experts the checkpoint keeps in float, per-expert layers
    layer_names = {q: names.get(q + ".weight", q + ".weight").removesuffix(".weight") for q in sorted(quantized)
                   if q not in per_expert}  # checkpoint layer -> the model's NVFP4Linear
    for name in layer_names.values():
        try:
            cur = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint's layer {name} is not in the model" + (f" ({why[0]})" if why else ""))
        if isinstance(cur, NVFP4Linear) and (cur.fmt, cur.group_size) != (fmt, group):
            raise ValueError(f"{name} is {cur.fmt} group {cur.group_size} but the checkpoint holds {fmt} group "
                             f"{group}: import into a float model")
        if not isinstance(cur, NVFP4Linear):
            layer = NVFP4Linear(cur.in_features, cur.out_features, group, cur.bias is not None, fmt,
                                device=cur.weight.device, dtype=cur.weight.dtype)
            replace_module(model, name, layer)
    state, pieces = {}, {}  # pieces: (layer, leaf) -> [(first row, tensor)] of the FP4 layers
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                layer, _, leaf = k.rpartition(".")
                if layer in per_expert and layer not in quantized:  # float rows of an expert
                    float_experts.add(*per_expert[layer], leaf, h.get_tensor(k))
                elif layer in per_expert:  # FP4 rows of an expert's layer
                    name, proj, e, r0, _ = per_expert[layer]
                    pieces.setdefault((f"{name}.{proj}.{e}", leaf), []).append((r0, h.get_tensor(k)))
                elif layer in layer_names:
                    pieces.setdefault((layer_names[layer], leaf), []).append((0, h.get_tensor(k)))
                else:
                    state[names.get(k, k)] = h.get_tensor(k)
    state.update(_fp4_state(pieces, layout))
    state.update(float_experts.state(strict))
    model.load_state_dict(state, strict=strict)
    return model


def _tensors(files):
    """(name, tensor) of every tensor in ``files``, a file open at a time."""
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                yield k, h.get_tensor(k)


def stored_global_scale(stored, layout: dict, what: str) -> float:
    """The decode global scale g of rows whose checkpoint global scales are ``stored`` (floats, as
    ``layout`` stores them: 1/g in float32 where it is ``inverse``); ValueError where they differ:
    ``what``'s gate and up rows run as one matrix with one scale."""
    values = sorted(set(stored))
    if len(values) > 1:
        raise ValueError(f"{what}: its gate and up rows hold global scales {values}; fp4cupy runs them as one "
                         "matrix with one scale (quantize them with a shared one, as modelopt, llm-compressor and "
                         "fp4cupy.quantize_model do)")
    return float(np.float32(1.0) / np.float32(values[0])) if layout["inverse"] else values[0]


def _fp4_state(pieces: dict, layout: dict) -> dict:
    """The state entries of NVFP4Linear layers from the tensors a checkpoint holds for them, in rows
    (an expert's gate and up are rows of one layer): {(layer, leaf): [(first row, tensor)]} ->
    weight, weight_scale, weight_global_scale and bias of each layer. Its rows must share one
    global scale; input_scale and other calibration tensors are not used by weight-only layers."""
    state = {}
    for (layer, leaf), parts in pieces.items():
        parts = [t for _, t in sorted(parts, key=lambda p: p[0])]
        if leaf == layout["codes"]:
            state[f"{layer}.weight"] = torch.cat(parts).view(torch.uint8)
            if not layout["g"]:
                state[f"{layer}.weight_global_scale"] = torch.tensor(1.0)
        elif leaf == layout["scales"]:
            state[f"{layer}.weight_scale"] = torch.cat(parts).view(torch.uint8)
        elif leaf == layout["g"]:
            g = stored_global_scale([float(t.reshape(-1)[0]) for t in parts], layout, layer)
            state[f"{layer}.weight_global_scale"] = torch.tensor(g, dtype=torch.float32)
        elif leaf == "bias":
            state[f"{layer}.bias"] = torch.cat(parts)
    return state
