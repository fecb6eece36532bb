"""Worker for tests/test_gpu_turing.py: fp4cupy's sm_75 (Turing) paths, run on a newer GPU with
FP4CUPY_EMULATE_CC=7.5 (plans for sm_75, kernels compiled to compute_75 PTX that the driver
finishes for the GPU at hand). fp16 x up to 32 tokens must run plan()'s mma.sync kernels (each MMA
as two m16n8k8) and match x @ dequantize(W).T in float64 to 1e-3; bf16 x and more tokens must
take dequantize + cuBLAS and match too. Outputs start poisoned; every check draws fresh inputs."""
import sys
from pathlib import Path

import torch

import fp4cupy
from fp4cupy import cuda_linear, nn, runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_reference import TOL, gen, reference, rel  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672), (1024, 8192), (200, 512)]


def main() -> None:
    assert runtime.compute_capability(0) == (7, 5), runtime.compute_capability(0)
    assert runtime.module_target(0) in ("compute_75", "sm_75") and not cuda_linear._wg_ok(0)
    compiled, dequantized = [], []
    real_compile, real_dequantized, real_output = (runtime.compile_source, cuda_linear._linear_dequantized,
                                                   cuda_linear._new_output)
    runtime.compile_source = lambda f, target, *a: compiled.append((f, target)) or real_compile(f, target, *a)
    cuda_linear._linear_dequantized = lambda *a: dequantized.append(1) or real_dequantized(*a)
    cuda_linear._new_output = lambda x, lead, n: real_output(x, lead, n).view(torch.uint8).fill_(0xAB).view(x.dtype)
    checks = 0

    def check(y, want, dtype, kernel: bool, what) -> None:
        nonlocal checks
        assert y.dtype == dtype and y.shape == want.shape, (what, y.shape)
        assert rel(y, want) <= TOL[dtype], (what, rel(y, want))
        assert (not dequantized) == kernel, (what, "dequantize path" if dequantized else "kernel")
        dequantized.clear()
        checks += 1

    for n, k in SHAPES:
        g = gen(n + k)
        pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g)))
        for m in (1, 3, 8, 16, 17, 32, 33, 128):
            x = torch.randn(m, k, device="cuda", generator=g).half()
            check(fp4cupy.linear(x, pw), reference(x, pw.weight), torch.float16, m <= 32, (n, k, m))
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            check(fp4cupy.linear(x, pw), reference(x, pw.weight), torch.bfloat16, False, (n, k, m, "bf16"))

    g = gen(7)
    w = fp4cupy.quantize(torch.randn(200, 512, device="cuda", generator=g))
    x, bias = torch.randn(2, 7, 512, device="cuda", generator=g).half(), torch.randn(200, device="cuda").half()
    check(fp4cupy.linear(x, fp4cupy.prepare(w), bias), reference(x, w, bias), torch.float16, True, "batch dims, bias")

    layer = nn.NVFP4Linear.from_float(torch.nn.Linear(1024, 640, device="cuda").half())
    assert layer.codes is not None and layer.weight is None  # held as the repack alone
    for dtype, kernel in ((torch.float16, True), (torch.bfloat16, False)):
        x = torch.randn(4, 1024, device="cuda").to(dtype)
        with torch.no_grad():
            check(layer.to(dtype)(x), reference(x, layer.fp4_weight(), layer.bias), dtype, kernel, ("layer", dtype))

    import cupy

    rs = cupy.random.RandomState(3)
    wc = fp4cupy.quantize(rs.standard_normal((640, 1024), dtype=cupy.float32))
    xc = rs.standard_normal((16, 1024), dtype=cupy.float32).astype(cupy.float16)
    yc = fp4cupy.linear(xc, fp4cupy.prepare(wc))
    want = torch.from_dlpack(xc.astype(cupy.float64) @ fp4cupy.dequantize(wc).astype(cupy.float64).T)
    check(torch.from_dlpack(yc), want, torch.float16, True, "cupy")

    w4a16 = {target for f, target in compiled if f == "w4a16.cu"}
    assert w4a16 == {runtime.module_target(0)}, compiled
    print(f"sm_75 paths ({runtime.module_target(0)} on {torch.cuda.get_device_name()}): {checks} checks passed")


if __name__ == "__main__":
    main()
