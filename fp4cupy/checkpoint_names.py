"""The tensor names a model's checkpoint uses, where transformers' module names differ from them.

transformers 5 loads some architectures through a conversion: a MoE block's per-expert matrices
``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` (Mixtral: ``block_sparse_moe.experts.{e}.w1``
/ ``w3`` / ``w2``) become the 3-D ``experts.gate_up_proj`` and ``experts.down_proj``, and some
prefixes are renamed. ``save_pretrained`` reverts that (``revert_weight_conversion``), and the
checkpoints that vLLM, modelopt and llm-compressor read and write use the reverted names. These
helpers ask the same function, on index tensors, which rows of which expert each checkpoint matrix
holds, and what a 1:1 tensor is called in the checkpoint.
"""
from __future__ import annotations

import torch


def _revert(model, tensors: dict) -> dict:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # not transformers 5: names are the module's
        return tensors
    if not hasattr(model, "config"):
        return tensors
    return revert_weight_conversion(model, tensors)


def expert_layers(model, name: str, projections: dict[str, tuple[int, int]]) -> dict[str, tuple[str, int, int, int]]:
    """The per-expert matrices ``model``'s checkpoint holds for its experts module ``name``, whose
    3-D weights are ``projections`` {weight name: (experts, rows)} ([E, rows, in] in the module's
    names, e.g. gate_up_proj, down_proj): {checkpoint layer name (no ".weight"): (weight name,
    expert, first row, rows)}. {} where the checkpoint keeps the 3-D weights."""
    out = {}
    for wname, (experts, rows) in projections.items():
        # [E, rows, 2]: row r of expert e holds e * rows + r (two columns: no conversion squeezes them away)
        index = torch.arange(experts * rows, dtype=torch.float64).reshape(experts, rows, 1).expand(-1, -1, 2)
        reverted = _revert(model, {f"{name}.{wname}": index.contiguous()})
        if f"{name}.{wname}" in reverted:
            return {}
        for key, t in reverted.items():
            first = int(t.reshape(-1)[0])
            if not key.endswith(".weight") or t.dim() != 2 or t.shape[1] != 2 or not torch.equal(
                    t[:, 0], first + torch.arange(t.shape[0], dtype=torch.float64)):
                raise NotImplementedError(f"{name}.{wname}: the checkpoint holds {key} {tuple(t.shape)}, "
                                          "not rows of one expert")
            out[key.removesuffix(".weight")] = (wname, first // rows, first % rows, t.shape[0])
    return out


def checkpoint_tensors(model, tensors: dict) -> dict:
    """``tensors`` of ``model``'s state dict under their checkpoint names (as save_pretrained writes
    them: renamed, 3-D expert weights split an expert)."""
    return _revert(model, tensors)


def checkpoint_name(model, key: str, like: torch.Tensor | None = None) -> str:
    """``key`` of ``model``'s state dict (a tensor shaped as ``like``) as its checkpoint names it:
    a prefix renamed, or ``key`` itself (also where one tensor becomes several)."""
    t = torch.empty(like.shape if like is not None else (0,), device="meta")
    try:
        reverted = _revert(model, {key: t})
    except Exception:  # a conversion that cannot take this tensor: not a 1:1 rename
        return key
    return next(iter(reverted)) if len(reverted) == 1 else key
