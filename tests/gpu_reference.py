"""What the GPU linear tests compare with: the float64 product of x and the dequantized weight,
the tolerances of issue #4 (output rounding of fp16 and bf16), and seeded CUDA generators.
Imported by test_gpu_linear.py and test_gpu_tiled.py after their ``pytest.importorskip("torch")``."""
import torch

import fp4cupy

TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel(a, b):
    """Relative Frobenius error of ``a`` against the float64 ``b``."""
    return float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))


def gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def reference(x, w, bias=None):
    """x @ dequantize(w).T (+ bias) in float64."""
    y = x.double() @ fp4cupy.dequantize(w).double().T
    return y if bias is None else y + bias.double()
