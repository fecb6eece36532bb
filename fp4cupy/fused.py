"""Layers that vLLM runs as one matrix, and the one NVFP4 global scale they share.

vLLM loads the q/k/v projections of an attention block into one weight (``QKVParallelLinear``), and
gate/up into another (``MergedColumnParallelLinear``); a mixture-of-experts layer stacks each
expert's w1 and w3. Its own NVFP4 kernels (modelopt, compressed-tensors: Marlin on Hopper, CUTLASS
on Blackwell) keep one global scale for such a weight, the largest of the shards' (vLLM 0.32 warns
that the others then lose accuracy; for experts it refuses). So modelopt and llm-compressor quantize
those siblings with one global scale, and so does ``fp4cupy.quantize_model``:

    g = amax over all the siblings' weights / (6 * 448)        (float32, DESIGN.md section 1)

which is the largest of the siblings' own global scales: the sibling that holds the amax keeps
its codes and scales bit for bit; the others get smaller block scales (E4M3), still the reference
recipe with a given global scale. fp4cupy's vLLM plugin then runs the fused weight as one launch.
"""
from __future__ import annotations

import math

from . import reference

# Names of sibling layers (children of one module) that vLLM fuses: Llama / Qwen / Mistral /
# Gemma attention and MLP, BERT attention, Mixtral experts, DeepSeek's MLA input projections.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                  ("w1", "w3"), ("q_a_proj", "kv_a_proj_with_mqa"))


def fused_groups(names, fused=FUSED_SIBLINGS) -> list[tuple[str, ...]]:
    """Groups of qualified layer names, in ``names``' order, that are siblings named by one entry of
    ``fused`` (two or more of them present). A name is in at most one group."""
    by_parent = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for i, group in enumerate(fused):
            if leaf in group:
                by_parent.setdefault((parent, i), []).append(name)
                break
    return [tuple(members) for members in by_parent.values() if len(members) > 1]


def shared_global_scale(weights) -> float | None:
    """The NVFP4 global scale of torch weights taken as one tensor: max |w| / (6 * 448) in float32;
    None when a weight holds NaN or Inf (quantize then says which)."""
    amax = max(float(w.detach().abs().max()) if w.numel() else 0.0 for w in weights)
    return float(reference.global_scale_from_amax(amax)) if math.isfinite(amax) else None
