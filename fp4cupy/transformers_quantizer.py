"""transformers' ``from_pretrained`` quantizing on load, as bitsandbytes and torchao are asked:

    from fp4cupy import FP4CupyConfig       # registers the "fp4cupy" method with transformers
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FP4CupyConfig(), device_map="cuda")
    print(model.fp4cupy_report)             # quantize_model's per-layer report

The full-precision checkpoint loads as usual (on ``device_map``, in ``dtype``), then
``quantize_model`` turns every ``nn.Linear`` and MoE experts module it does not skip into FP4 layers:
with ``device_map="cuda"`` the float model is on the GPU first. ``FP4CupyConfig(device="cuda")``
without a device_map loads it into CPU memory and quantizes it onto the GPU a weight at a time, so
the GPU holds the FP4 model and one float weight at most. The layers are those of
``quantize_model`` called by hand, bit for bit (fused siblings share a global scale). transformers
cannot save the result (``save_pretrained`` refuses it); ``fp4cupy.export`` writes it in the
fp4cupy, modelopt or compressed-tensors layout, and ``fp4cupy.save`` as one file.
"""
from __future__ import annotations

from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import get_format

METHOD = "fp4cupy"


class FP4CupyConfig(QuantizationConfigMixin):
    """What ``quantize_model`` is called with: ``fmt`` "nvfp4" (group_size 16, or 8, 32, 64) or
    "mxfp4" (32), ``skip`` names or glob patterns of layers left in float, ``scale_mode`` MXFP4's
    block-scale rule ("floor", "rceil", "round"; None: the format's default), ``device`` where to
    quantize and put the model (None: where transformers loaded it)."""

    def __init__(self, fmt: str = "nvfp4", group_size: int | None = None, skip=("lm_head", "embed"),
                 scale_mode: str | None = None, device: str | None = None, **kwargs):
        f = get_format(fmt)  # ValueError for an unknown format, group size or scale mode, naming the known ones
        if scale_mode is not None:
            f.check_scale_mode(scale_mode)
        self.quant_method = METHOD
        self.fmt, self.group_size = f.name, f.check_group_size(group_size)
        self.skip, self.scale_mode = [skip] if isinstance(skip, str) else list(skip), scale_mode
        self.device = None if device is None else str(device)


class FP4CupyQuantizer(HfQuantizer):
    """Quantizes a model transformers has loaded in full precision (``_process_model_after_weight_loading``)."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            raise ValueError("fp4cupy: this checkpoint says it was quantized with fp4cupy; transformers cannot load "
                             "FP4 layers from it. Build the model from its config and call "
                             "fp4cupy.import_checkpoint(model, path) (README: 'Checkpoints other tools read').")

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .nn import quantize_model

        c = self.quantization_config
        model.fp4cupy_report = quantize_model(model, c.fmt, c.group_size, skip=tuple(c.skip), scale_mode=c.scale_mode,
                                              device=c.device)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:  # once, whatever imports this module again
    register_quantization_config(METHOD)(FP4CupyConfig)
if METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(METHOD)(FP4CupyQuantizer)
