"""A MoE block's experts: fp4cupy's NVFP4Experts against transformers' bf16 experts, in this run on this card.

    PYTHONPATH=$PWD python3 benchmarks/moe.py [--tokens 1,4,16,64,256,1024,2048] [--models Llama-4-Scout,...]

Mixtral-8x7B's experts (8 of 14336 x 4096, top-2; random bf16 weights, no download), Qwen3-30B-A3B's
(128 of 768 x 2048, top-8) and Llama-4-Scout's (16 of 8192 x 5120, top-1, fp4cupy with the router
weights on the experts' inputs as Llama 4 has them, the peers on their outputs: the same work).
One call = the experts module's forward for T tokens with random routing, host work included
(transformers' experts loop syncs once a call to list the experts hit), timed with CUDA events,
alternating with the peer: transformers' eager loop on the bf16 weights, and its grouped_mm
implementation where this transformers has one. Prints the speed-up over each, and,
where ``loops_over_experts`` says no (where fp4cupy runs two grouped launches and no
host sync), over fp4cupy's own loop over the experts hit, and both fp4cupy and grouped_mm replayed from CUDA graphs.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from fp4cupy import experts as fp4_experts  # noqa: E402
from fp4cupy.experts import NVFP4Experts  # noqa: E402
from timing import card, compare  # noqa: E402

MODELS = {"Mixtral-8x7B": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                           num_experts_per_tok=2)),
          "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                              num_experts_per_tok=8)),
          # Llama 4's arithmetic (router weights on the inputs) on its experts' shapes; the peer is a
          # Mixtral-style module of those shapes (transformers' Llama 4 experts have no grouped form)
          "Llama-4-Scout": ("llama4", dict(hidden_size=5120, intermediate_size=8192, num_local_experts=16,
                                           num_experts_per_tok=1))}


def experts_module(kind: str, sizes: dict):
    import transformers

    if kind in ("mixtral", "llama4"):
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts

        config = transformers.MixtralConfig(**sizes)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        config = transformers.Qwen3MoeConfig(**sizes)
    config._experts_implementation = "eager"
    with torch.device("cuda"):
        m = Experts(config).to(torch.bfloat16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return m, config


def looped(fp4, x, index, weights):
    """(ms, speed-up) of fp4cupy's loop over the experts hit against its grouped launches, same run."""
    def loop():
        names = ("GROUPED_MAX_ROWS", "GROUPED_MAX_ROWS_WG", "LOOP_MAX_EXPERTS")
        limits = [getattr(fp4_experts, name) for name in names]
        for name, value in zip(names, (-1, -1, 10**6)):
            setattr(fp4_experts, name, value)
        try:
            return fp4(x, index, weights)
        finally:
            for name, value in zip(names, limits):
                setattr(fp4_experts, name, value)
    r = compare(loop, lambda: fp4(x, index, weights), pairs=7, inner=3)
    return f"{r['peer_ms']:.3f}", f"{r['ratio']:.2f}x"


def in_graphs(peer, ours):
    """(ours ms, peer ms, speed-up) with each call captured once in a CUDA graph and replayed: GPU
    time without the host; the peer's cell names the error where it cannot be captured."""
    def captured(fn):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    replay = captured(ours)
    try:
        peer_replay = captured(peer)
    except Exception as e:  # noqa: BLE001 (a host sync inside: not capturable)
        return "-", type(e).__name__, "-"
    r = compare(peer_replay, replay, pairs=7, inner=10)
    return f"{r['ours_ms']:.3f}", f"{r['peer_ms']:.3f}", f"{r['ratio']:.2f}x"


def rows(name: str, kind: str, sizes: dict, tokens: list[int]) -> None:
    """The table's rows of one model's experts."""
    dense, config = experts_module(kind, sizes)
    fp4 = NVFP4Experts.from_float(copy.deepcopy(dense))
    on_input = fp4.source.router_weight_on_input = kind == "llama4"
    experts, k = dense.down_proj.shape[0], sizes["num_experts_per_tok"]
    for t in tokens:
        x = torch.randn(t, sizes["hidden_size"], device="cuda", dtype=torch.bfloat16)
        index = torch.stack([torch.randperm(experts, device="cuda")[:k] for _ in range(t)])
        weights = torch.softmax(torch.randn(t, k, device="cuda"), -1).to(torch.bfloat16)
        with torch.no_grad():
            if on_input:  # the float experts on the weighted inputs, outputs unweighted (top-1)
                ref = dense(x * weights, index, torch.ones_like(weights)).double()
            else:
                ref = dense(x, index, weights).double()
            err = float((fp4(x, index, weights).double() - ref).norm() / ref.norm())
            eager = compare(lambda: dense(x, index, weights), lambda: fp4(x, index, weights), pairs=7, inner=3)
            grouped, graphs = ("-", "-"), ("-", "-", "-")
            grouped_here = not fp4_experts.loops_over_experts(t * k, experts, x.get_device())
            loop = looped(fp4, x, index, weights) if grouped_here else ("-", "-")
            try:
                config._experts_implementation = "grouped_mm"
                dense(x, index, weights)
                r = compare(lambda: dense(x, index, weights), lambda: fp4(x, index, weights), pairs=7, inner=3)
                grouped = f"{r['peer_ms']:.3f}", f"{r['ratio']:.2f}x"
                if grouped_here:
                    graphs = in_graphs(lambda: dense(x, index, weights), lambda: fp4(x, index, weights))
            except Exception as e:  # noqa: BLE001 (no grouped_mm in this transformers / torch)
                grouped = type(e).__name__, "-"
            finally:
                config._experts_implementation = "eager"
        print(f"| {name} | {t} | {eager['ours_ms']:.3f} | {eager['peer_ms']:.3f} | {eager['ratio']:.2f}x "
              f"| {grouped[0]} | {grouped[1]} | {loop[0]} | {loop[1]} | {' | '.join(graphs)} | {err:.1e} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,4,16,64,256,1024,2048")
    ap.add_argument("--models", default=",".join(MODELS), help="of " + ", ".join(MODELS))
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    torch.manual_seed(0)
    print(f"\n## benchmarks/moe.py on {card()} (torch {torch.__version__}, fp4cupy {fp4cupy.version()})\n")
    print("| experts | tokens | fp4cupy ms | bf16 eager ms | speed-up | bf16 grouped_mm ms | speed-up "
          "| fp4cupy loop ms | speed-up | graphs: fp4cupy ms | grouped_mm ms | speed-up | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        rows(name, *MODELS[name], tokens)
        torch.cuda.empty_cache()
    print("\nrel. error: fp4cupy's output against the bf16 experts on the unquantized weights (Frobenius), the "
          "quantization error, not a kernel check.")


if __name__ == "__main__":
    main()
