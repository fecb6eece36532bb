"""Worker for tests/test_gpu_turing.py: fp4cupy's sm_75 (Turing) paths, run on a newer GPU with
FP4CUPY_EMULATE_CC=7.5 (plans for sm_75, kernels compiled to compute_75 PTX that the driver
finishes for the GPU at hand). fp16 x up to 128 tokens must run plan()'s mma.sync kernels and, from
33 tokens (65 on the small weights), the tiled kernel copying through registers (each MMA as two
m16n8k8), and match x @ dequantize(W).T in float64 to 1e-3; bf16 x and more tokens must take
dequantize + cuBLAS and match too; a MoE block's fp16 experts run the grouped mma.sync and tiled
launches (experts_checks). Outputs start poisoned; every check draws fresh inputs."""
import copy
import sys
from pathlib import Path

import torch

import fp4cupy
from fp4cupy import cuda_linear, cuda_tiled, nn, runtime

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
    tiled, real_tiled = [], cuda_tiled.launch_tiled
    cuda_tiled.launch_tiled = lambda p, *a: tiled.append(p.splits) or real_tiled(p, *a)
    checks, splits = 0, set()

    def check(y, want, dtype, kernel: bool, what, tiled_kernel: bool = False) -> None:
        nonlocal checks
        assert y.dtype == dtype and y.shape == want.shape, (what, y.shape)
        assert rel(y, want) <= TOL[dtype], (what, rel(y, want))
        assert (not dequantized) == kernel, (what, "dequantize path" if dequantized else "kernel")
        assert bool(tiled) == tiled_kernel, (what, tiled)
        splits.update(tiled)
        dequantized.clear(), tiled.clear()
        checks += 1

    for n, k in SHAPES:
        g = gen(n + k)
        pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(n, k, device="cuda", generator=g)))
        for m in (1, 3, 8, 16, 17, 32, 33, 64, 65, 100, 128, 129):
            x = torch.randn(m, k, device="cuda", generator=g).half()
            takes_tiled = m <= 128 and cuda_linear.uses_tiled_kernel(m, n, k)
            check(fp4cupy.linear(x, pw), reference(x, pw.weight), torch.float16, m <= 128, (n, k, m), takes_tiled)
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

    assert {1} < splits, splits  # the tiled kernel alone and with its K splits' finish
    checks += experts_checks()
    for source in ("w4a16.cu", "w4a16_tiled.cu"):
        assert {target for f, target in compiled if f == source} == {runtime.module_target(0)}, compiled
    print(f"sm_75 paths ({runtime.module_target(0)} on {torch.cuda.get_device_name()}): {checks} checks passed")


def experts_checks() -> int:
    """A Mixtral experts block in fp16: two grouped launches at 3 / 40 / 300 tokens (mma.sync; from
    33 rows an expert the tiled kernel), the loop past 256 rows an expert on average, against the
    float32 module on the dequantized weights; a CUDA graph holds the grouped call. bf16 loops (no
    bf16 MMA)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from fp4cupy import cuda_grouped
    from fp4cupy.experts import NVFP4Experts, grouped_max_rows
    from test_experts import TINY, dequantized_copy, routing

    launches, grouped = [], cuda_grouped.grouped_linear
    cuda_grouped.grouped_linear = lambda *a: launches.append(a[0].shape[0]) or grouped(*a)
    config = transformers.MixtralConfig(**dict(TINY, hidden_size=512, intermediate_size=768, num_local_experts=8))
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    original = MixtralExperts(config).cuda()
    for p in original.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fp4 = NVFP4Experts.from_float(copy.deepcopy(original).half())
    ref = dequantized_copy(original, fp4)
    checks = 0
    for tokens in (3, 40, 300, 1100):
        x = torch.randn(tokens, 512, device="cuda").half()
        index, weights = (t.cuda() for t in routing(tokens, 8, 2, tokens))
        with torch.no_grad():
            want, got = ref(x.float(), index, weights).double(), fp4(x, index, weights.half())
        assert got.dtype == torch.float16 and float((got.double() - want).norm() / want.norm()) <= 3e-3, tokens
        assert len(launches) == (2 if 2 * tokens <= grouped_max_rows(0) * 8 else 0), (tokens, launches)
        launches.clear()
        checks += 1
    assert fp4.grouped_tables(torch.float16) is not None and fp4.grouped_tables(torch.bfloat16) is None
    x = torch.randn(300, 512, device="cuda").half()
    index, weights = (t.cuda() for t in routing(300, 8, 2, 5))
    weights = weights.half()
    with torch.no_grad():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fp4(x, index, weights)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, fp4(x, index, weights))
    cuda_grouped.grouped_linear = grouped
    return checks + 1


if __name__ == "__main__":
    main()
