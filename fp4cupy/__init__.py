"""fp4cupy: NVFP4 / MXFP4 4-bit floating point for every NVIDIA GPU, and a bit-exact CPU reference.

    >>> import numpy as np, fp4cupy
    >>> t = fp4cupy.quantize(np.random.randn(256, 512).astype(np.float32))
    >>> x = fp4cupy.dequantize(t)           # float32, same shape, same library/device as the input

See reference.py for the numerics (the spec) and README.md for the formats.
"""
from __future__ import annotations

from .formats import FORMATS, Format, get_format
from .ops import dequantize, gemm, linear, quantize
from .prepared import PreparedWeight, prepare
from .tensor import FP4Tensor

__version__ = "0.1.0"

_TORCH_API = {"NVFP4Linear": "nn", "NVFP4LinearLayer": "nn", "quantize_model": "nn", "quantize_model_to_nvfp4": "nn",
              "save": "checkpoint", "load": "checkpoint", "export": "interop", "import_checkpoint": "interop",
              "calibrate": "interop", "FP4CupyConfig": "transformers_quantizer"}


def __getattr__(name):
    """torch-facing names load torch only when first used: ``fp4cupy.NVFP4Linear``, ``fp4cupy.save``, ...;
    ``fp4cupy.FP4CupyConfig`` imports transformers and registers fp4cupy's from_pretrained method."""
    if name in _TORCH_API:
        import importlib

        return getattr(importlib.import_module(f".{_TORCH_API[name]}", __name__), name)
    raise AttributeError(f"module 'fp4cupy' has no attribute {name!r}")


__all__ = [
    "FORMATS", "FP4Tensor", "Format", "dequantize", "gemm", "get_compute_capability", "get_format",
    "has_hardware_acceleration", "include_dir", "linear", "prepare", "PreparedWeight", "quantize", "version",
    "NVFP4Linear", "NVFP4LinearLayer", "quantize_model", "quantize_model_to_nvfp4", "save", "load", "export",
    "import_checkpoint", "calibrate", "FP4CupyConfig",
]


def version() -> str:
    """The package version."""
    return __version__


def get_compute_capability(device: int | None = None):
    """(major, minor) of the current (or given) CUDA device, or None when there is no GPU."""
    from . import runtime

    return runtime.compute_capability(device)


def has_hardware_acceleration(device: int | None = None) -> bool:
    """True only on GPUs with FP4 tensor cores that fp4cupy compiles for (sm_100+ arch-specific targets)."""
    from . import runtime

    return runtime.has_fp4_hardware(device)


def include_dir() -> str:
    """Folder holding ``fp4.cuh``, for ``options=("-I" + fp4cupy.include_dir(),)`` in your own RawKernel."""
    from . import runtime

    return str(runtime.KERNEL_DIR)
