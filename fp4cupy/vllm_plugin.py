"""vLLM plugin (entry point ``vllm.general_plugins``): quantization methods ``nvfp4`` and ``fp4cupy``.

    LLM(model=checkpoint_dir, quantization="nvfp4")

Reads fp4cupy's own checkpoints (``quantization_config = {"quant_method": "nvfp4", "group_size": 16}``)
and, when asked for ``nvfp4`` (or ``fp4cupy``), modelopt and compressed-tensors NVFP4 checkpoints and
compressed-tensors MXFP4 ones (mxfp4-pack-quantized; see interop.py for the layouts).

Linear layers: vLLM's own weight loaders (weight-loader v2) fill the checkpoint's tensors as the
layer's parameters; ``process_weights_after_loading`` makes them the layer's NVFP4Linear shards
(``shard_tensors``): one for a fused QKV or gate-up layer whose shards share a global scale
(fused.py), else one per logical shard with its own scale, so it stays exact. The parameters are
then dropped: on CUDA a shard holds the W4A16 repack alone (4.5 bits a weight). ``apply`` runs
each shard (the ``fp4cupy::linear`` op, which torch.compile and CUDA graphs take whole): the
tensor-core kernel on a GPU, the exact reference on the CPU.

MoE layers (vLLM's fused experts): ``vllm_moe.FP4CupyMoEMethod``. Importing this module needs no vLLM.
"""
from __future__ import annotations

import fnmatch

from .interop import LAYOUTS, stored_global_scale  # the tensor names of each checkpoint layout

NAMES = ("nvfp4", "fp4cupy")


def layout_of(cfg: dict | None) -> str | None:
    """Which checkpoint layout a quantization_config (or hf_quant_config.json) describes."""
    if not cfg:
        return None
    if cfg.get("quant_method") in NAMES:
        return "nvfp4"
    packed = str(cfg.get("format", "")).lower()
    if "nvfp4" in packed:
        return "compressed-tensors"
    if "mxfp4" in packed:
        return "compressed-tensors-mxfp4"
    algo = str(cfg.get("quant_algo") or (cfg.get("quantization") or {}).get("quant_algo") or "")
    return "modelopt" if "NVFP4" in algo.upper() else None


def _group_size(cfg: dict) -> int:
    for group in (cfg.get("config_groups") or {}).values():
        if (group.get("weights") or {}).get("group_size"):
            return int(group["weights"]["group_size"])
    return int(cfg.get("group_size") or (cfg.get("quantization") or {}).get("group_size") or 16)


def _w4a4(cfg: dict) -> bool:
    """Whether the checkpoint carries static activation scales (W4A4)."""
    algo = str(cfg.get("quant_algo") or (cfg.get("quantization") or {}).get("quant_algo") or "")
    acts = [g.get("input_activations") for g in (cfg.get("config_groups") or {}).values()]
    return algo.upper() == "NVFP4" or any(a and not a.get("dynamic") is True for a in acts)


def _ignored(cfg: dict) -> list:
    q = cfg.get("quantization") or {}
    return list(cfg.get("ignore") or cfg.get("exclude_modules") or q.get("exclude_modules") or [])


def shard_tensors(codes, scales, global_scales, partitions, group_size: int, fmt: str = "nvfp4") -> list:
    """The FP4Tensors a (fused) layer runs: one over all its rows where every logical shard has the
    same global scale (as modelopt, llm-compressor and fp4cupy.quantize_model write q/k/v and
    gate/up: one launch, no concatenation), else one a shard, each with its own scale (exact).

    codes uint8 [N, K/2] and scales uint8 [N, K/group] (torch, any device) hold the shards' rows in
    order; global_scales: one float (the decode scale g; 1 for MXFP4) a shard; partitions: rows a shard."""
    import torch

    from .tensor import FP4Tensor

    k = codes.shape[1] * 2

    def tensor(lo, rows, g):
        g = torch.tensor(g, dtype=torch.float32, device=codes.device) if codes.is_cuda else g
        return FP4Tensor(codes[lo:lo + rows].contiguous(), scales[lo:lo + rows].contiguous(), g, (rows, k), fmt,
                         group_size)

    if len(set(global_scales)) == 1:
        return [tensor(0, sum(partitions), global_scales[0])]
    starts = [sum(partitions[:i]) for i in range(len(partitions))]
    return [tensor(lo, rows, g) for lo, rows, g in zip(starts, partitions, global_scales)]


def tensors_a_layer(model) -> dict:
    """{layer name: how many FP4Tensors it runs} for the fp4cupy layers of a vLLM model; 1 for a
    fused layer means one launch. In vLLM: ``LLM(...).apply_model(tensors_a_layer)``."""
    return {name: len(m.fp4_shards) for name, m in model.named_modules() if hasattr(m, "fp4_shards")}


def moe_methods_a_layer(model) -> dict:
    """{MoE layer name: the class of the method that runs its experts} for a vLLM model. In vLLM:
    ``LLM(...).apply_model(moe_methods_a_layer)``."""
    return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
            if hasattr(m, "moe_config") and hasattr(m, "quant_method")}


try:  # the classes exist only where vLLM is installed (module level, so vLLM can pickle them)
    import torch
    from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, UnquantizedLinearMethod,
                                                   register_weight_loader_v2_supported_method)
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.parameter import GroupQuantScaleParameter, ModelWeightParameter, PerTensorScaleParameter
except ImportError:  # fp4cupy never requires vLLM
    QuantizationConfig = None

if QuantizationConfig is not None:
    from .nn import NVFP4Linear

    @register_weight_loader_v2_supported_method
    class FP4CupyLinearMethod(LinearMethodBase):
        def __init__(self, config):
            self.config = config
            self.names = LAYOUTS[config.layout]

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                           params_dtype, **extra_weight_attrs):
            gs, k, n = self.config.group_size, input_size_per_partition, sum(output_partition_sizes)
            if k % gs:
                raise ValueError(f"fp4cupy: layer {getattr(layer, 'prefix', '?')!r} has {input_size} inputs split "
                                 f"{input_size // k} ways: {k} per shard, not a multiple of group_size={gs}")
            loader = extra_weight_attrs["weight_loader"]
            scale_dtype = torch.float8_e4m3fn if self.names["fp8_scales"] else torch.uint8
            layer.register_parameter(self.names["codes"], ModelWeightParameter(
                data=torch.empty(n, k // 2, dtype=torch.uint8), input_dim=1, output_dim=0, weight_loader=loader))
            layer.register_parameter(self.names["scales"], GroupQuantScaleParameter(
                data=torch.empty(n, k // gs, dtype=scale_dtype), input_dim=1, output_dim=0, weight_loader=loader))
            if self.names["g"]:  # NVFP4's global scale a shard (MXFP4 has none)
                layer.register_parameter(self.names["g"], PerTensorScaleParameter(
                    data=torch.ones(len(output_partition_sizes), dtype=torch.float32), weight_loader=loader))
            # static activation scales of W4A4 NVFP4 checkpoints: loaded, unused (weight-only)
            if self.config.w4a4 and self.names["act"]:
                layer.register_parameter(self.names["act"], PerTensorScaleParameter(
                    data=torch.ones(len(output_partition_sizes), dtype=torch.float32), weight_loader=loader))
            layer.fp4_partitions = list(output_partition_sizes)

        def process_weights_after_loading(self, layer) -> None:
            codes = getattr(layer, self.names["codes"]).data.view(torch.uint8)
            scales = getattr(layer, self.names["scales"]).data.view(torch.uint8)
            fmt, g = "mxfp4", [1.0] * len(layer.fp4_partitions)
            if self.names["g"]:
                stored = getattr(layer, self.names["g"]).data.float().cpu().tolist()  # one a shard
                fmt, g = "nvfp4", [stored_global_scale([v], self.names, "a shard") for v in stored]
            shards = shard_tensors(codes, scales, g, layer.fp4_partitions, self.config.group_size, fmt)
            # NVFP4Linear: on CUDA the W4A16 repack alone (4.5 bits a weight), the CPU the exact
            # reference; a custom op that torch.compile and CUDA graphs take whole
            layer.fp4_shards = [NVFP4Linear.from_fp4(t) for t in shards]
            for key in ("codes", "scales", "g", "act"):  # the checkpoint's copy is not needed any more
                if self.names[key] and hasattr(layer, self.names[key]):
                    delattr(layer, self.names[key])

        def apply(self, layer, x, bias=None):
            if len(layer.fp4_shards) == 1:  # the bias in the kernel's epilogue
                return layer.fp4_shards[0].with_bias(x, bias)
            y = torch.cat([shard(x) for shard in layer.fp4_shards], dim=-1)
            return y if bias is None else y + bias

    class FP4CupyConfig(QuantizationConfig):
        name = "nvfp4"

        def __init__(self, layout: str = "nvfp4", group_size: int = 16, ignore=(), w4a4: bool = False):
            super().__init__()
            self.layout, self.group_size, self.ignore, self.w4a4 = layout, group_size, list(ignore), w4a4

        def get_name(self):
            return self.name

        def get_supported_act_dtypes(self):
            return [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 75

        @staticmethod
        def get_config_filenames():
            return []

        @classmethod
        def from_config(cls, config):
            layout = layout_of(config)
            if layout is None:
                raise ValueError(f"fp4cupy: not an NVFP4 quantization_config: {config}")
            return cls(layout, _group_size(config), _ignored(config), _w4a4(config))

        @classmethod
        def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
            return cls.name if user_quant in NAMES and layout_of(hf_quant_cfg) else None

        def is_skipped(self, prefix: str) -> bool:
            return any(prefix == p or prefix.endswith("." + p) or fnmatch.fnmatch(prefix, p) for p in self.ignore)

        def get_quant_method(self, layer, prefix):
            if isinstance(layer, LinearBase):
                return UnquantizedLinearMethod() if self.is_skipped(prefix) else FP4CupyLinearMethod(self)
            if hasattr(layer, "moe_config") and not self.is_skipped(prefix):  # FusedMoE / RoutedExperts
                from .vllm_moe import FP4CupyMoEMethod

                return FP4CupyMoEMethod(self, layer.moe_config)
            return None

    class FP4CupyAliasConfig(FP4CupyConfig):
        name = "fp4cupy"


def register() -> None:
    """Register the quantization methods with vLLM (vLLM calls this through the entry point)."""
    if QuantizationConfig is not None:
        register_quantization_config("nvfp4")(FP4CupyConfig)
        register_quantization_config("fp4cupy")(FP4CupyAliasConfig)
