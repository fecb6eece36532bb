"""vLLM's fused MoE layers through fp4cupy: the ``nvfp4`` / ``fp4cupy`` plugin's experts method.

vLLM loads a MoE layer's per-expert checkpoint matrices (``experts.{e}.gate_proj`` / ``w1`` ...) into
stacked parameters with its own weight loader: ``w13_<codes>`` uint8 [E, 2I, H/2] (each expert's
w1 rows, then its w3 rows), ``w13_<scales>`` [E, 2I, H/group], ``w13_<global scale>`` float32
[E, 2] (w1's, w3's), and ``w2_*`` [E, H, I/2], [E, H, I/group], [E], under the layout's tensor
names (interop.LAYOUTS: modelopt, compressed-tensors NVFP4 or MXFP4, fp4cupy's own). After loading,
``experts_from_stacked`` makes them an ``NVFP4Experts`` of one NVFP4Linear an expert and projection
(gate and up as one matrix, as vLLM fuses them: exact only where they share a global scale, as
modelopt, llm-compressor and fp4cupy write them; else a ValueError, as vLLM's own NVFP4 MoE methods
refuse them). The method's ``apply`` is NVFP4Experts' forward with vLLM's routing (``topk_ids``,
``topk_weights``: on the experts' outputs, or on their inputs where the layer says
``apply_router_weight_on_input``, as Llama 4's) and vLLM's activation kernel: on CUDA two grouped
W4A16 launches and fp4cupy's route and combine kernels (no host sync, CUDA graphs hold it); on the
CPU the exact reference.
Where vLLM traces the layer (its torch.compile on the CPU), ``apply`` is one opaque op,
``fp4cupy::vllm_moe``. Importing this module needs no vLLM; ``FP4CupyMoEMethod`` exists where vLLM does.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .experts import NVFP4Experts
from .interop import LAYOUTS, stored_global_scale
from .nn import NVFP4Linear
from .tensor import FP4Tensor
from .torch_ops import define_op, register_fake


class Gating(nn.Module):
    """NVFP4Experts' ``source`` for a vLLM layer: its activation ``act(out, h)`` (vLLM's kernel, which
    writes out) on [rows, 2I] gate-then-up rows (``gated``) or on [rows, I] rows; with
    ``router_weight_on_input`` (Llama 4) the router's weights scale the experts' inputs."""

    has_bias = is_transposed = False

    def __init__(self, act, gated: bool, router_weight_on_input: bool = False):
        super().__init__()
        self.act, self.has_gate, self.router_weight_on_input = act, gated, router_weight_on_input

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        out = h.new_empty(h.shape[0], h.shape[1] // 2)
        self.act(out, h)
        return out

    def act_fn(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(h)
        self.act(out, h)
        return out


def experts_from_stacked(w13: tuple, w2: tuple, layout: str, group_size: int, gating: nn.Module,
                         name: str = "experts") -> NVFP4Experts:
    """An NVFP4Experts of the stacked tensors vLLM loaded: ``w13`` = (codes uint8 [E, R, H/2], block
    scales [E, R, H/group] (E4M3 or E8M0 bits, any 1-byte dtype), global scales [E, 2] or [E], or
    None for MXFP4), R = 2I gate-then-up rows or I; ``w2`` = the same for [E, H, I]. Global scales
    as the layout stores them (compressed-tensors: 1/g). ValueError where an expert's gate and up
    hold different global scales (they run as one matrix with one scale)."""
    names = LAYOUTS[layout]
    fmt = "nvfp4" if names["g"] else "mxfp4"

    def layers(codes, scales, g):
        codes, scales = codes.view(torch.uint8), scales.view(torch.uint8)
        experts, rows, k = codes.shape[0], codes.shape[1], codes.shape[2] * 2
        out = []
        for e in range(experts):
            scale = 1.0 if g is None else stored_global_scale(g[e].reshape(-1).tolist(), names, f"{name}: expert {e}")
            if codes.is_cuda:
                scale = torch.tensor(scale, dtype=torch.float32, device=codes.device)
            t = FP4Tensor(codes[e].contiguous(), scales[e].contiguous(), scale, (rows, k), fmt, group_size)
            out.append(NVFP4Linear.from_fp4(t))
        return out

    return NVFP4Experts(gating, layers(*w13), layers(*w2))


def local_expert_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, experts: int) -> torch.Tensor:
    """vLLM's global expert ids as this rank's (expert parallelism: ``expert_map`` [global] holds
    the local id or -1); ids of other ranks' experts become ``experts`` ("not here": skipped)."""
    if expert_map is None:
        return topk_ids
    local = expert_map[topk_ids.long()]
    return torch.where(local < 0, torch.full_like(local, experts), local)


try:  # the class exists only where vLLM is installed (module level, so vLLM can pickle it)
    from vllm.model_executor.layers.fused_moe.activation import apply_moe_activation
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
    from vllm.model_executor.utils import set_weight_attrs
except ImportError:  # fp4cupy never requires vLLM
    FusedMoEMethodBase = None

if FusedMoEMethodBase is not None:
    class FP4CupyMoEMethod(FusedMoEMethodBase):
        """fp4cupy's method for vLLM's fused MoE layers (RoutedExperts): see the module docstring."""

        def __init__(self, config, moe):
            super().__init__(moe)
            self.config, self.names = config, LAYOUTS[config.layout]

        def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                           **extra_weight_attrs):
            gs, moe = self.config.group_size, self.moe
            for what, size in (("hidden size", hidden_size), ("intermediate size a shard", intermediate_size_per_partition)):
                if size % gs:
                    raise ValueError(f"fp4cupy: {layer.layer_name}'s {what} {size} is not a multiple of group_size={gs}")
            if moe.has_bias:
                raise NotImplementedError(f"fp4cupy: {layer.layer_name}'s experts have biases, which the plugin does "
                                          "not load")
            gated = moe.is_act_and_mul
            scale_dtype = torch.float8_e4m3fn if LAYOUTS[self.config.layout]["fp8_scales"] else torch.uint8
            loader = {"weight_loader": extra_weight_attrs["weight_loader"]}
            group, tensor = FusedMoeWeightScaleSupported.GROUP.value, FusedMoeWeightScaleSupported.TENSOR.value
            for stem, rows, k in (("w13", (2 if gated else 1) * intermediate_size_per_partition, hidden_size),
                                  ("w2", hidden_size, intermediate_size_per_partition)):
                per_tensor = (num_experts, 2) if stem == "w13" and gated else (num_experts,)
                params = [("codes", torch.empty(num_experts, rows, k // 2, dtype=torch.uint8), None),
                          ("scales", torch.empty(num_experts, rows, k // gs, dtype=scale_dtype), group),
                          ("g", torch.ones(per_tensor, dtype=torch.float32), tensor)]
                if self.config.w4a4:  # static activation scales of W4A4 checkpoints: loaded, unused (weight-only)
                    params.append(("act", torch.ones(per_tensor, dtype=torch.float32), tensor))
                for key, data, method in params:
                    if self.names[key]:
                        param = nn.Parameter(data, requires_grad=False)
                        layer.register_parameter(f"{stem}_{self.names[key]}", param)
                        set_weight_attrs(param, loader if method is None else {**loader, "quant_method": method})

        def process_weights_after_loading(self, layer) -> None:
            stacked = {stem: tuple(getattr(layer, f"{stem}_{self.names[key]}").data if self.names[key] else None
                                   for key in ("codes", "scales", "g")) for stem in ("w13", "w2")}
            activation = self.moe.activation
            gating = Gating(lambda out, h: apply_moe_activation(activation, out, h), activation.is_gated,
                            layer.apply_router_weight_on_input)
            self.experts = experts_from_stacked(stacked["w13"], stacked["w2"], self.config.layout,
                                                self.config.group_size, gating, layer.layer_name)
            for stem in ("w13", "w2"):  # the experts hold the weights now (on CUDA: the W4A16 repack alone)
                for key in ("codes", "scales", "g", "act"):
                    if self.names[key] and hasattr(layer, f"{stem}_{self.names[key]}"):
                        delattr(layer, f"{stem}_{self.names[key]}")
            if stacked["w13"][0].is_cuda:  # the grouped launches' tables, before vLLM captures CUDA graphs
                self.experts.grouped_tables(self.moe.in_dtype)
            _LAYERS[layer.layer_name] = weakref.ref(layer)

        def get_fused_moe_quant_config(self, layer):
            return None  # no vLLM modular kernel: apply runs fp4cupy's

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            if torch.compiler.is_compiling():  # vLLM on the CPU traces into the MoE layer: one opaque op
                return torch.ops.fp4cupy.vllm_moe(x, topk_weights, topk_ids, layer.layer_name)
            return self.run(layer, x, topk_weights, topk_ids)

        def run(self, layer, x, topk_weights, topk_ids):
            ids = local_expert_ids(topk_ids, layer.expert_map, len(self.experts.down))
            return self.experts(x, ids, topk_weights)

    # {layer name: weak reference to the loaded MoE layer}, for the op that stands for it in a traced
    # graph (the loop over the experts hit reads counts back: not traceable)
    _LAYERS = {}

    @define_op("vllm_moe(Tensor x, Tensor topk_weights, Tensor topk_ids, str layer_name) -> Tensor")
    def _vllm_moe(x, topk_weights, topk_ids, layer_name):
        layer = _LAYERS[layer_name]()
        return layer.quant_method.run(layer, x, topk_weights, topk_ids)

    @register_fake(_vllm_moe)
    def _(x, topk_weights, topk_ids, layer_name):
        return torch.empty_like(x)
