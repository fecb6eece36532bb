"""Llama 4's MoE blocks with FP4 experts.

transformers' ``Llama4TextMoe`` runs every expert on every token: the tokens repeated once an
expert, each copy scaled by its router score (the sigmoid of its router logit for the top-k
experts, 0 for the others), through ``Llama4TextExperts``' 3-D weights ``gate_up_proj`` [E, H, 2I]
(stored [in, out]: gate columns, then up) and ``down_proj`` [E, I, H], and adds the copies and the
shared expert. Its experts take no routing, so NVFP4Experts cannot stand in for them alone.

``Llama4Moe`` is the block with FP4 experts: the same router and shared expert, and an NVFP4Experts
whose ``source`` is a ``Llama4Experts`` (the experts' gating and flags, ``router_weight_on_input``).
It runs only the chosen experts, each on its tokens scaled by their score in the tokens' dtype,
outputs unweighted (vLLM's ``apply_router_weight_on_input``). With top-1 routing, as every Llama 4
model has, that is the dense form's arithmetic: the other copies are zero rows, whose outputs are
exactly zero (no biases). State-dict names do not change (``router``, ``shared_expert``, ``experts``).

Checkpoints hold the experts as per-expert layers ``experts.{e}.gate_proj`` / ``up_proj`` /
``down_proj``, the form vLLM's Llama 4 loader reads besides the fused 3-D one.
"""
from __future__ import annotations

import torch
from torch import nn


def is_llama4_experts(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Llama4TextExperts (float 3-D weights, no routing)."""
    return type(module).__name__ == "Llama4TextExperts" and hasattr(module, "gate_up_proj")


class Llama4Experts(nn.Module):
    """A Llama4TextExperts as the transformers experts modules that NVFP4Experts takes: its weights
    (shared, not copied), ``is_transposed``, the gating ``up * act(gate)`` on [rows, 2I] gate-then-up
    rows, and ``router_weight_on_input``. Has no forward of its own."""

    has_gate, has_bias, is_transposed, router_weight_on_input = True, False, True, True

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = experts.gate_up_proj, experts.down_proj, experts.act_fn

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return up * self.act_fn(gate)


class Llama4Moe(nn.Module):
    """Llama4TextMoe with FP4 experts (see the module docstring): ``(hidden_states) -> (out [T, H],
    router_logits [T, E])`` as the original."""

    def __init__(self, block: nn.Module, experts: nn.Module):
        super().__init__()
        self.top_k, self.hidden_dim, self.num_experts = block.top_k, block.hidden_dim, block.num_experts
        self.router, self.shared_expert, self.experts = block.router, block.shared_expert, experts

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        scores, logits = self.router(x)  # scores [T, E]: sigmoid of the top-k logits, 0 elsewhere
        index = torch.topk(logits, self.top_k, dim=1).indices  # the router's own choice
        out = self.shared_expert(x)
        out.add_(self.experts(x, index, scores.gather(1, index)))
        return out, logits


def checkpoint_layers(name: str, experts: int, intermediate: int, hidden: int) -> dict[str, tuple[str, int, int, int]]:
    """{checkpoint layer: ("up" or "down", expert, first row, rows)} of Llama 4 experts stored as
    ``name`` (rows of NVFP4Experts' layers: gate rows [0, I) and up rows [I, 2I) of "up")."""
    out = {}
    for e in range(experts):
        out[f"{name}.{e}.gate_proj"] = ("up", e, 0, intermediate)
        out[f"{name}.{e}.up_proj"] = ("up", e, intermediate, intermediate)
        out[f"{name}.{e}.down_proj"] = ("down", e, 0, hidden)
    return out


def install(model: nn.Module, name: str, experts: nn.Module) -> None:
    """Put NVFP4Experts ``experts`` (its source a Llama4Experts) where the experts ``name`` of a
    Llama 4 block are: the block becomes a Llama4Moe."""
    from .nn import replace_module

    parent = name.rpartition(".")[0]
    block = model.get_submodule(parent)
    if isinstance(block, Llama4Moe):
        block.experts = experts
    else:
        replace_module(model, parent, Llama4Moe(block, experts))
