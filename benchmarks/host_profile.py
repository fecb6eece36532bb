"""Where the host time of one public call goes: cProfile over many calls on a tiny tensor, or
(``linear_parts``) each step of a W4A16 ``linear`` call timed alone against torch's F.linear.

    PYTHONPATH=$PWD python3 benchmarks/host_profile.py [quantize|quantize_g|dequantize|linear|linear_op|linear_parts|
                                                        experts|experts_on_input]
"""
from __future__ import annotations

import cProfile
import os
import pstats
import struct
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from fp4cupy import cuda_linear, cuda_ops, mma_plan, torch_ops  # noqa: E402,F401  (torch_ops registers the ops)
from timing import card, host_us  # noqa: E402


def main(which: str = "quantize", calls: int = 3000):
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    t = fp4cupy.quantize(x)
    fns = {"quantize": lambda: fp4cupy.quantize(x, nonfinite="mark"),
           "quantize_raise": lambda: fp4cupy.quantize(x),
           "quantize_g": lambda: fp4cupy.quantize(x, global_scale=0.01, nonfinite="mark"),
           "dequantize": lambda: fp4cupy.dequantize(t, dtype=torch.bfloat16)}
    if hasattr(fp4cupy, "prepare"):
        w = fp4cupy.prepare(fp4cupy.quantize(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)))
        xs = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
        fns["linear"] = lambda: fp4cupy.linear(xs, w)
        fns["linear_op"] = lambda: torch.ops.fp4cupy.linear(xs, None, None, w.global_scale, w.codes,
                                                            w.scale_codes, None, "nvfp4", 16, 256)
    if which.startswith("experts"):  # a small Mixtral block's experts, one token (the grouped path)
        fns[which] = experts_call(which == "experts_on_input")
    fn = fns[which]
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"== {which}: {calls} calls; {host_us(fn, calls):.1f} us a call without the profiler ({card()})")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def experts_call(on_input: bool):
    """One token through NVFP4Experts of 8 experts (512 x 256, top-2, bf16): the grouped path; with
    ``on_input`` the router weights on the inputs (Llama 4)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from fp4cupy.experts import NVFP4Experts

    config = transformers.MixtralConfig(hidden_size=256, intermediate_size=512, num_local_experts=8,
                                        num_experts_per_tok=2)
    with torch.device("cuda"):
        dense = MixtralExperts(config).to(torch.bfloat16)
    experts = NVFP4Experts.from_float(dense)
    experts.source.router_weight_on_input = on_input
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    index = torch.tensor([[1, 5]], device="cuda")
    weights = torch.tensor([[0.6, 0.4]], device="cuda", dtype=torch.bfloat16)

    def call():
        with torch.no_grad():
            return experts(x, index, weights)
    return call


def linear_parts(calls: int = 20000):
    """us a call of each step of ``fp4cupy.linear(x, prepare(W))`` (256x256, M=1, fp16), alone."""
    pw = fp4cupy.prepare(fp4cupy.quantize(torch.randn(256, 256, device="cuda")))
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    w16 = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    y = x.new_empty(1, 256)
    p = mma_plan.plan(256, 256, 1, False, 0)
    stream = cuda_ops._torch_stream_ptr(torch, 0)
    args = cuda_linear.kernel_args(pw, x, y)
    block = p.launch._block()
    parts = {
        "fp4cupy.linear": lambda: fp4cupy.linear(x, pw),
        "torch F.linear (same shape, fp16 weight)": lambda: F.linear(x, w16),
        "cuda_linear.launch_w4a16 (arguments ready)": lambda: cuda_linear.launch_w4a16(1, 256, 256, False, 0, stream,
                                                                                       args, None),
        "runtime.Launcher call": lambda: p.launch(p.grid, p.threads, p.shared, stream, *args, 1, 256, 256),
        "  of it, struct.pack_into": lambda: struct.pack_into(p.launch._fmt, block[0], 0, *args, 1, 256, 256),
        "x.new_empty(*x.shape[:-1], n)": lambda: x.new_empty(*x.shape[:-1], 256),
        "x.new_empty(x.shape[:-1] + (n,)) (a torch.Size)": lambda: x.new_empty(x.shape[:-1] + (256,)),
        "six data_ptr()": lambda: (x.data_ptr(), y.data_ptr(), x.data_ptr(), y.data_ptr(), x.data_ptr(), y.data_ptr()),
        "torch's raw stream": lambda: cuda_ops._torch_stream_ptr(torch, 0),
        "mma_plan.plan (cached)": lambda: mma_plan.plan(256, 256, 1, False, 0),
    }
    print(f"== host time a call, each part alone ({card()}); the host's speed moves ~1.5x between runs\n")
    print("| part | us |\n|---|---|")
    for name, fn in parts.items():
        print(f"| {name} | {host_us(fn, calls):.2f} |")


if __name__ == "__main__":
    for w in sys.argv[1:] or ["quantize"]:
        linear_parts() if w == "linear_parts" else main(w)
