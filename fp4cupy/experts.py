"""The experts of a transformers mixture-of-experts block as FP4 layers.

transformers 5 holds a MoE block's experts as one module of 3-D weights, not as nn.Linear layers:
``gate_up_proj`` (or ``up_proj`` without a gate) [E, out, in] and ``down_proj`` [E, hidden,
intermediate] ([E, in, out] where ``is_transposed``), with optional ``*_bias`` [E, out]. A quantizer
that swaps nn.Linear layers leaves those, most of a MoE model's weights, in 16 bits.
``NVFP4Experts`` holds each expert's two projections as ``NVFP4Linear`` layers (gate and up as one
matrix, so they share one global scale, as vLLM fuses them) and runs each expert's routed tokens
through them: the W4A16 kernel on a GPU, exact up to float32 accumulation order on the CPU. The
block's own gating (``_apply_gate``: SwiGLU, gpt-oss's clamped form, interleaved gate/up),
activation and post-expert norm are those of the original module, kept as ``source`` without its
weights.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from .nn import NVFP4Linear, replace_module
from .ops import quantize
from .torch_ops import define_op, register_fake

_FLAGS = ("has_gate", "has_bias", "is_transposed")  # set by transformers' @use_experts_implementation
# Rows an expert on average (tokens * k / experts) up to which CUDA runs the experts as two grouped
# launches (cuda_grouped.py; no host sync) instead of a loop over the experts hit (one sync, a
# launch an expert and projection: ~0.1 ms of host time each). H200, bf16, grouped over loop, two
# runs (benchmarks/moe.py, session 23): Mixtral-8x7B (8 experts, top-2) 1.7-3.6x up to 4 rows,
# 1.9-2.3x at 16, 1.1-1.3x at 64, 1.8x at 128, 1.04-1.8x at 256, 0.83-1.5x at 512; Qwen3-30B-A3B
# (128 experts, top-8) 4-45x from 0.06 to 128 rows.
GROUPED_MAX_ROWS = 256
# The same where the grouped warpgroup kernel runs (sm_90a; cuda_grouped.WG_MIN_PASS). H200, bf16,
# grouped over loop (scratch A/B, session 25): Mixtral-8x7B 1.4-2.1x up to 558 rows, 1.17x at 1088,
# 1.14x at 1615, 1.05x at 2139; Qwen3-30B-A3B 28-46x up to 288 rows.
GROUPED_MAX_ROWS_WG = 2048
# Blocks of more experts than this take the grouped launches at any rows: the loop's host time
# (~0.1 ms an expert hit) outweighs any kernel difference (Qwen3-30B-A3B, 128 experts, H200: the
# loop 25-54x slower than the grouped launches at every size measured, 1-4096 tokens).
LOOP_MAX_EXPERTS = 16


def grouped_max_rows(device: int) -> int:
    """Rows an expert on average up to which CUDA ``device`` runs NVFP4Experts as grouped launches."""
    from . import cuda_linear

    return GROUPED_MAX_ROWS_WG if cuda_linear._wg_ok(device) else GROUPED_MAX_ROWS


def loops_over_experts(rows: int, experts: int, device: int) -> bool:
    """Whether NVFP4Experts runs ``rows`` (tokens * k) over ``experts`` experts on CUDA ``device`` as
    a loop over the experts hit (eagerly; a CUDA graph capture takes the grouped launches at any
    rows): past ``grouped_max_rows`` rows an expert on average, in blocks of at most LOOP_MAX_EXPERTS."""
    return experts <= LOOP_MAX_EXPERTS and rows > grouped_max_rows(device) * experts


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module of 3-D weights that NVFP4Experts takes."""
    if not all(hasattr(module, f) for f in _FLAGS) or not hasattr(module, "_apply_gate"):
        return False
    names = weight_names(module)
    return all(isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 3 for n in names)


def experts_view(module: nn.Module) -> nn.Module | None:
    """``module`` as an experts module NVFP4Experts takes: itself where ``is_experts``, a Llama4Experts
    over a Llama 4 block's experts (llama4.py), else None."""
    from .llama4 import Llama4Experts, is_llama4_experts

    if is_experts(module):
        return module
    return Llama4Experts(module) if is_llama4_experts(module) else None


def install_experts(model: nn.Module, name: str, experts: NVFP4Experts) -> None:
    """Put ``experts`` where ``model``'s experts module ``name`` is (a Llama 4 block's: the block
    becomes a llama4.Llama4Moe, which routes them)."""
    from . import llama4

    if isinstance(experts.source, llama4.Llama4Experts):
        llama4.install(model, name, experts)
    else:
        replace_module(model, name, experts)


def _check(module: nn.Module) -> None:
    if not is_experts(module):
        raise TypeError("NVFP4Experts takes a transformers experts module of 3-D weights (gate_up_proj or up_proj, "
                        f"down_proj; @use_experts_implementation); got {type(module).__name__}")


def weight_names(module: nn.Module) -> tuple[str, str]:
    """The names of an experts module's two 3-D weights: (gate_up_proj or up_proj, down_proj)."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def expert_weights(module: nn.Module, name: str) -> torch.Tensor:
    """``module``'s 3-D weight ``name`` as [E, out, in] (a view)."""
    w = getattr(module, name).detach()
    return w.transpose(1, 2) if module.is_transposed else w


def quantized_experts(experts: nn.Module, fmt: str = "nvfp4", group_size: int = 16, scale_mode: str | None = None,
                      device=None) -> tuple[list[NVFP4Linear], list[NVFP4Linear]]:
    """(up, down): each expert's projections as NVFP4Linear layers (DESIGN.md section 1's recipe,
    one global scale an expert and projection; the biases copied), on ``device`` (None: the
    weights'; else each expert's matrix is copied there alone); ``experts`` is left as it is."""
    _check(experts)
    layers = []
    for name in weight_names(experts):
        w = expert_weights(experts, name)
        bias = getattr(experts, name + "_bias").detach() if experts.has_bias else [None] * w.shape[0]
        if device is not None and experts.has_bias:
            bias = bias.to(device)
        quantized = (quantize((w[e] if device is None else w[e].to(device)).contiguous(), fmt, group_size,
                              scale_mode=scale_mode) for e in range(w.shape[0]))
        layers.append([NVFP4Linear.from_fp4(t, b) for t, b in zip(quantized, bias)])
    return layers[0], layers[1]


class NVFP4Experts(nn.Module):
    """A transformers experts module with FP4 weights: ``up[e]`` (gate and up, or up) and ``down[e]``
    are expert e's NVFP4Linear layers; ``source`` is the original module without its weights (its
    gating, activation and flags). Called as the original: ``(hidden_states [T, H], top_k_index
    [T, k], top_k_weights [T, k]) -> [T, H]``, each token's experts' outputs weighted in
    hidden_states' dtype and added (where ``source.router_weight_on_input``, as Llama 4's: each
    expert's input rows weighted instead, its outputs added as they are). On CUDA, unless
    ``loops_over_experts`` (fp16/bf16, no gradient to track): one grouped launch a projection over
    every expert (cuda_grouped.py), the slots added in float32 and rounded once, no host sync (a
    CUDA graph can hold it). Else a loop over the experts hit (one host sync), added in the dtype
    in expert order, as transformers' eager experts do. Traced by torch.compile (no gradient to
    track): one op, ``fp4cupy::experts``, that runs the same call."""

    def __init__(self, source: nn.Module, up: list[NVFP4Linear], down: list[NVFP4Linear]):
        super().__init__()
        self.up, self.down, self.source = nn.ModuleList(up), nn.ModuleList(down), source
        self._register()

    def _register(self) -> None:
        """A key of this module for the op that stands for it in a traced graph."""
        self.op_key = next(_KEYS)
        _TRACED[self.op_key] = self

    @classmethod
    def from_float(cls, experts: nn.Module, fmt: str = "nvfp4", group_size: int = 16,
                   scale_mode: str | None = None) -> NVFP4Experts:
        """Quantize each expert's weights (``quantized_experts``) and take them, and the biases, out
        of ``experts``, which becomes ``source``."""
        return cls.around(experts, *quantized_experts(experts, fmt, group_size, scale_mode))

    @classmethod
    def around(cls, experts: nn.Module, up: list[NVFP4Linear], down: list[NVFP4Linear]) -> NVFP4Experts:
        """The module of ``up`` and ``down`` (made from ``experts``' weights), ``experts`` stripped of them."""
        _strip(experts)
        return cls(experts, up, down)

    @classmethod
    def empty_like(cls, experts: nn.Module, fmt: str = "nvfp4", group_size: int = 16) -> NVFP4Experts:
        """Zero FP4 layers of ``experts``' shapes (to load a state dict into), ``experts`` stripped."""
        _check(experts)
        layers = []
        for name in weight_names(experts):
            w = expert_weights(experts, name)
            layers.append([NVFP4Linear(w.shape[2], w.shape[1], group_size, experts.has_bias, fmt, device=w.device,
                                       dtype=w.dtype) for _ in range(w.shape[0])])
        return cls.around(experts, *layers)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if torch.compiler.is_compiling() and not self._tracks_grad(hidden_states):
            # traced (torch.compile): one opaque op, so fullgraph holds the block (the loop reads
            # counts back; the grouped launches read raw pointers); it runs the call below
            return torch.ops.fp4cupy.experts(hidden_states, top_k_index, top_k_weights, self.op_key)
        return self._call(hidden_states, top_k_index, top_k_weights)

    def _tracks_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.source.has_bias)

    def _call(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tables = self._grouped_tables(hidden_states, top_k_index.shape[-1])
        if tables is not None:
            return self._forward_grouped(hidden_states, top_k_index, top_k_weights, *tables)
        n, k = len(self.down), top_k_index.shape[-1]
        # (token, slot) pairs sorted by expert: one host sync for the counts (transformers' eager loop
        # syncs once an expert hit, ~0.5 ms each on an H200); index n is expert parallelism's "not here"
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n + 1).tolist()
        token, weight = order // k, top_k_weights.reshape(-1)[order]
        x = hidden_states[token]
        on_input = self.router_weight_on_input
        if on_input:
            x = x * weight[:, None].to(x.dtype)
        out = torch.zeros_like(hidden_states)
        start = 0
        for e, count in enumerate(counts[:n]):
            if count:
                rows = slice(start, start + count)
                h = self._finish(self.down[e](self._activate(self.up[e](x[rows]))))
                h = h if on_input else h * weight[rows, None]
                out.index_add_(0, token[rows], h.to(out.dtype))  # experts in order, as eager
            start += count
        return out

    @property
    def router_weight_on_input(self) -> bool:
        """Whether the router's weights scale each expert's input rows (Llama 4; vLLM's
        apply_router_weight_on_input) instead of its outputs."""
        return getattr(self.source, "router_weight_on_input", False)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        """The block's gating (gate and up) or activation (up alone), as the original module's."""
        return self.source._apply_gate(h) if self.source.has_gate else self.source.act_fn(h)

    def _finish(self, h: torch.Tensor) -> torch.Tensor:
        """The post-expert norm where the block has one."""
        return self.source.post_expert_norm(h) if getattr(self.source, "has_post_expert_norm", False) else h

    def _grouped_tables(self, x: torch.Tensor, k: int):
        """(up table, down table) for ``cuda_grouped.grouped_linear`` where this call takes the
        grouped launches: fp16/bf16 CUDA tokens, k experts each, where ``loops_over_experts`` says no
        (any rows while a CUDA graph captures), no gradient to track, not traced, every layer held
        as the W4A16 repack; else None."""
        if (not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16)
                or (loops_over_experts(x.shape[0] * k, len(self.down), x.get_device())
                    and not torch.cuda.is_current_stream_capturing())  # the loop's host sync cannot be captured
                or torch.compiler.is_compiling() or self._tracks_grad(x)):
            return None
        tables = self.grouped_tables(x.dtype)
        return None if tables is None or tables[0].device != x.device else tables

    def grouped_tables(self, dtype: torch.dtype):
        """(up table, down table) of the layers' pointers for tokens of ``dtype`` (cuda_grouped.
        expert_table), or None where they are not all held as the W4A16 repack on one GPU. Asked
        again when any NVFP4Linear's buffers changed since (the tables hold raw pointers), and
        uploaded again only where this module's pointers did change: build them once before a CUDA
        graph captures the block."""
        cache = self.__dict__.setdefault("_grouped_cache", {})
        generation = NVFP4Linear.buffers_generation
        entry = cache.get(dtype)
        if entry is None or entry[0] != generation:
            from . import cuda_grouped

            before = entry[1] if entry is not None else (None, None)
            entry = cache[dtype] = (generation, tuple(cuda_grouped.expert_table(list(layers), dtype, reuse)
                                                      for layers, reuse in zip((self.up, self.down), before)))
        up, down = entry[1]
        return None if up is None or down is None else (up[0], down[0])

    def _forward_grouped(self, x, top_k_index, top_k_weights, up, down):
        """forward in four launches of fp4cupy's (cuda_grouped.py: route, two grouped W4A16, combine)
        and the block's gating, with no host sync: each token's experts' outputs weighted in x's
        dtype, added in float32 in slot order, rounded once."""
        from . import cuda_grouped

        experts = len(self.down)
        index = top_k_index.long().contiguous()
        expert_of_row, token_of_row, offsets, row_of_slot = cuda_grouped.route(index, experts)
        tokens, rows = index.shape[0], x[token_of_row]
        if self.router_weight_on_input:  # each row times its slot's weight, in x's dtype; outputs unweighted
            weight_of_row = torch.empty(index.numel(), dtype=x.dtype, device=x.device)
            weight_of_row[row_of_slot.long()] = top_k_weights.reshape(-1).to(x.dtype)
            rows, top_k_weights = rows * weight_of_row[:, None], torch.ones_like(top_k_weights)
        h = cuda_grouped.grouped_linear(rows, up, expert_of_row, offsets, self.up[0].out_features, tokens)
        h = self._activate(h).contiguous()
        h = cuda_grouped.grouped_linear(h, down, expert_of_row, offsets, self.down[0].out_features, tokens)
        return cuda_grouped.combine(self._finish(h), row_of_slot, index, top_k_weights, experts)

    def __getstate__(self):  # the launch tables point at these layers' buffers: a copy builds its own
        state = super().__getstate__()
        state.pop("_grouped_cache", None)
        return state

    def __setstate__(self, state):  # a copy (deepcopy, unpickle) has a key of its own
        super().__setstate__(state)
        self._register()

    def weight_nbytes(self) -> int:
        return sum(layer.weight_nbytes() for layer in (*self.up, *self.down))

    def extra_repr(self) -> str:
        first = self.up[0]
        return (f"experts={len(self.down)}, fmt={first.fmt}, group_size={first.group_size}, "
                f"weights={self.weight_nbytes() / 2**20:.2f} MiB")


# NVFP4Experts by op_key, for fp4cupy::experts (weak: the op keeps no module alive)
_TRACED = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@define_op("experts(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, int key) -> Tensor")
def _experts_op(hidden_states, top_k_index, top_k_weights, key):
    """NVFP4Experts ``key``'s forward, as one op of a traced graph."""
    return _TRACED[key]._call(hidden_states, top_k_index, top_k_weights)


@register_fake(_experts_op)
def _(hidden_states, top_k_index, top_k_weights, key):
    return torch.empty_like(hidden_states)


def prepare_to_load(model: nn.Module, name: str, fmt: str, group_size: int) -> None:
    """Make ``model``'s experts module ``name`` an NVFP4Experts of ``fmt`` / ``group_size`` that a
    checkpoint can load into (zero layers in place of a float module's weights); ValueError where
    it already holds another format."""
    current = model.get_submodule(name)
    if not isinstance(current, NVFP4Experts):
        install_experts(model, name, NVFP4Experts.empty_like(experts_view(current) or current, fmt, group_size))
    elif (current.up[0].fmt, current.up[0].group_size) != (fmt, group_size):
        raise ValueError(f"{name} is {current.up[0].fmt} group {current.up[0].group_size} but the checkpoint holds "
                         f"{fmt} group {group_size}: import into a float model")


def _strip(experts: nn.Module) -> None:
    """Drop the weights and biases NVFP4Experts now holds."""
    for name in weight_names(experts):
        for key in (name, name + "_bias"):
            if key in experts._parameters:
                del experts._parameters[key]


def checkpoint_layers(model: nn.Module, name: str, module: nn.Module) -> dict[str, tuple[str, int, int, int]]:
    """The per-expert matrices ``model``'s checkpoint holds for its experts module ``name`` (float
    or NVFP4Experts): {checkpoint layer name: ("up" or "down", expert, first row, rows)} (rows of
    NVFP4Experts' layers: gate and up are rows of "up"). NotImplementedError where the checkpoint
    keeps 3-D weights (gpt-oss) or stores them transposed."""
    from . import llama4
    from .checkpoint_names import checkpoint_name, expert_layers

    source = module.source if isinstance(module, NVFP4Experts) else (experts_view(module) or module)
    if isinstance(source, llama4.Llama4Experts):  # per-expert layers, as vLLM's Llama 4 loader reads them
        if isinstance(module, NVFP4Experts):
            sizes = len(module.up), module.up[0].out_features // 2, module.down[0].out_features
        else:
            sizes = source.gate_up_proj.shape[0], source.gate_up_proj.shape[2] // 2, source.gate_up_proj.shape[1]
        stored = checkpoint_name(model, f"{name}.gate_up_proj").removesuffix(".gate_up_proj")
        return llama4.checkpoint_layers(stored, *sizes)
    if source.is_transposed:
        raise NotImplementedError(f"{name}: experts stored [E, in, out] ({type(source).__name__}) are not written "
                                  "or read as per-expert layers")
    up_name, down_name = weight_names(source)
    if isinstance(module, NVFP4Experts):
        shapes = {up_name: (len(module.up), module.up[0].out_features),
                  down_name: (len(module.down), module.down[0].out_features)}
    else:
        shapes = {w: tuple(expert_weights(source, w).shape[:2]) for w in (up_name, down_name)}
    layers = expert_layers(model, name, shapes)
    if not layers:
        raise NotImplementedError(f"{name}: {type(source).__name__} checkpoints keep 3-D expert weights; only "
                                  "per-expert layers (experts.N.gate_proj, experts.N.w1, ...) are written and read")
    return {k: ("up" if w == up_name else "down", e, r0, rows) for k, (w, e, r0, rows) in layers.items()}


class FloatExperts:
    """import_checkpoint's float experts: the rows of per-expert float layers (experts.N.gate_proj
    ...) written into the model's 3-D weights and biases, in a copy of each."""

    def __init__(self, model: nn.Module):
        self.model, self.tensors, self.rows = model, {}, {}

    def add(self, name: str, proj: str, e: int, r0: int, rows: int, leaf: str, t: torch.Tensor) -> None:
        module = self.model.get_submodule(name)
        if isinstance(module, NVFP4Experts):
            raise ValueError(f"{name} holds FP4 experts but the checkpoint keeps them in float: import into a float "
                             "model")
        if leaf not in ("weight", "bias"):
            return  # not a float layer's tensor
        from .llama4 import is_llama4_experts

        if is_llama4_experts(module):
            raise NotImplementedError(f"{name}: per-expert float layers of Llama 4 experts are not read; keep them "
                                      "as the 3-D gate_up_proj / down_proj")
        key = f"{name}.{weight_names(module)[proj == 'down']}" + ("_bias" if leaf == "bias" else "")
        if key not in self.tensors:
            self.tensors[key] = torch.empty_like(getattr(module, key.rpartition(".")[2]), device="cpu")
        self.tensors[key][e, r0:r0 + rows] = t
        self.rows[key] = self.rows.get(key, 0) + rows

    def state(self, strict: bool) -> dict:
        """{the model's 3-D tensor name: its tensor}; with ``strict``, ValueError where the checkpoint
        left rows of one out."""
        for key, t in self.tensors.items():
            if strict and self.rows[key] != t.shape[0] * t.shape[1]:
                raise ValueError(f"{key}: the checkpoint holds {self.rows[key]} of its {t.shape[0] * t.shape[1]} "
                                 "expert rows")
        return self.tensors
