"""GPU linear / gemm against float64 references (run on a GPU: pytest -m gpu)."""
import numpy as np
import pytest

import fp4cupy

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


def rel(a, b):
    return float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("m", [1, 3, 17, 129])
def test_linear_matches_float64(dtype, tol, m):
    g = torch.Generator(device="cuda").manual_seed(m)
    w = fp4cupy.quantize(torch.randn(200, 512, device="cuda", generator=g))  # N=200: not a tile multiple
    x = torch.randn(2, m, 512, device="cuda", generator=g).to(dtype)
    bias = torch.randn(200, device="cuda", generator=g).to(dtype)
    y = fp4cupy.linear(x, w, bias)
    want = x.double() @ fp4cupy.dequantize(w).double().T + bias.double()
    assert y.dtype == dtype and y.shape == (2, m, 200)
    assert rel(y, want) <= tol


def test_gemm_fp32_matches_float64():
    g = torch.Generator(device="cuda").manual_seed(0)
    a = fp4cupy.quantize(torch.randn(256, 512, device="cuda", generator=g))
    b = fp4cupy.quantize(torch.randn(512, 384, device="cuda", generator=g))
    c = fp4cupy.gemm(a, b)
    want = fp4cupy.dequantize(a).double() @ fp4cupy.dequantize(b).double()
    assert c.dtype == torch.float32 and rel(c, want) <= 1e-5
    bw = fp4cupy.quantize(torch.randn(384, 512, device="cuda", generator=g))
    c2 = fp4cupy.gemm(a, bw, trans_b=True)
    assert rel(c2, fp4cupy.dequantize(a).double() @ fp4cupy.dequantize(bw).double().T) <= 1e-5


def test_seed_gpu_script_flow():
    import fp4cupy as cuda_fp4_ext

    major, minor = cuda_fp4_ext.get_compute_capability()
    x = torch.randn(64, 64, device="cuda")
    data, scales, global_scale = cuda_fp4_ext.quantize(x, group_size=16)
    back = cuda_fp4_ext.dequantize(data, scales, global_scale, 64, 64, group_size=16)
    assert back.is_cuda and torch.abs(x - back).max() < 1.0 and f"{global_scale:.6f}"
    M, N, K = 128, 128, 64
    A, B = torch.randn(M, K, device="cuda"), torch.randn(K, N, device="cuda")
    Ad, As, Ag = cuda_fp4_ext.quantize(A, group_size=16)
    Bd, Bs, Bg = cuda_fp4_ext.quantize(B, group_size=16)
    C = cuda_fp4_ext.gemm(Ad, As, Ag, Bd, Bs, Bg, M, N, K, group_size=16)
    assert C.shape == (M, N) and rel(C, (A @ B).double()) < 0.2
