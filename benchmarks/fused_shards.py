"""vLLM's fused layers: one launch for a weight whose shards share a global scale, against one
launch a shard and a concatenation (what the vLLM plugin runs when the scales differ), and cuBLAS
fp16 on the fused dense weight; measured alternately in this run on this card.

    PYTHONPATH=$PWD python3 benchmarks/fused_shards.py [--quick] [--bf16]

Layers are [shard rows] x K of real models: q/k/v and gate/up of Llama-3-8B, Qwen2.5-7B and a
tensor-parallel rank of Llama-3-70B (TP=8). Each side is a CUDA graph of 30 calls (as vLLM decodes),
three weight sets rotating so L2 does not hold them. x is fp16 [M, K] (bf16 with --bf16, as vLLM
mostly runs; cuBLAS then in bf16).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from fp4cupy.vllm_plugin import shard_tensors  # noqa: E402
from timing import card, graph_compare  # noqa: E402

LAYERS = {
    "Llama-3-8B qkv": ((4096, 1024, 1024), 4096),
    "Llama-3-8B gate_up": ((14336, 14336), 4096),
    "Qwen2.5-7B qkv": ((3584, 512, 512), 3584),
    "Qwen2.5-7B gate_up": ((18944, 18944), 3584),
    "Llama-3-70B TP8 qkv": ((1024, 128, 128), 8192),
    "Llama-3-70B TP8 gate_up": ((3584, 3584), 8192),
}
MS = (1, 16)


def weights(parts, k, dtype, sets=3):
    """Per set: the dense weight, the fused prepared weight, and the prepared shards (one global scale)."""
    out = []
    for _ in range(sets):
        dense = torch.randn(sum(parts), k, device="cuda", dtype=dtype) * 0.02
        t = fp4cupy.quantize(dense)
        (fused,) = shard_tensors(t.data, t.scales, [t.global_scale] * len(parts), list(parts), 16)
        starts = [sum(parts[:i]) for i in range(len(parts))]
        apart = [fp4cupy.FP4Tensor(t.data[lo:lo + n], t.scales[lo:lo + n], t.global_scale_array, (n, k))
                 for lo, n in zip(starts, parts)]
        out.append((dense, fp4cupy.prepare(fused), [fp4cupy.prepare(s) for s in apart]))
    return out


def rows(layers=LAYERS, ms=MS, dtype=torch.float16):
    table = []
    for name, (parts, k) in layers.items():
        sets = weights(parts, k, dtype)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            fused = lambda i: fp4cupy.linear(x, sets[i % 3][1])  # noqa: E731
            apart = lambda i: torch.cat([fp4cupy.linear(x, s) for s in sets[i % 3][2]], dim=-1)  # noqa: E731
            r = graph_compare(apart, fused)
            c = graph_compare(lambda i: F.linear(x, sets[i % 3][0]), fused)
            table.append(dict(layer=name, shape=f"{'+'.join(map(str, parts))}x{k}", m=m, apart=r["peer_ms"],
                              fused=r["ours_ms"], gain=r["ratio"], lo=r["lo"], hi=r["hi"], cublas=c["peer_ms"],
                              vs_cublas=c["ratio"], apart_vs_cublas=c["peer_ms"] / r["peer_ms"]))
        del sets
        torch.cuda.empty_cache()
    return table


def main(quick=False, bf16=False):
    layers = dict(list(LAYERS.items())[:2]) if quick else LAYERS
    dt = "bf16" if bf16 else "fp16"
    print(f"# fused shards, {card()}, {dt} x, CUDA graphs of 30 calls, 3 weight sets rotating")
    print(f"| layer | rows x K | M | shards + cat us | fused us | fused speed-up (min-max) | cuBLAS {dt} us "
          "| fused vs cuBLAS | shards vs cuBLAS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows(layers, dtype=torch.bfloat16 if bf16 else torch.float16):
        print(f"| {r['layer']} | {r['shape']} | {r['m']} | {r['apart'] * 1e3:.1f} | {r['fused'] * 1e3:.1f} | "
              f"{r['gain']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f}) | {r['cublas'] * 1e3:.1f} | {r['vs_cublas']:.2f}x | "
              f"{r['apart_vs_cublas']:.2f}x |")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv, bf16="--bf16" in sys.argv)
