"""The vLLM plugin's MoE method without vLLM (CI serves real checkpoints through it in
tests/workers/vllm_e2e.py --moe): experts stacked from an export as vLLM's weight loader stacks
them run bit for bit as the quantized model's own NVFP4Experts, on the CPU."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="transformers 5's 3-D experts")
import fp4cupy  # noqa: E402
from fp4cupy.interop import LAYOUTS  # noqa: E402
from fp4cupy.vllm_moe import Gating, experts_from_stacked, local_expert_ids  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
BLOCK = "model.layers.0.block_sparse_moe"


def silu_and_mul(out, h):
    """vLLM's silu_and_mul on [rows, 2I] gate-then-up rows, written into out."""
    gate, up = h.chunk(2, dim=-1)
    out.copy_(torch.nn.functional.silu(gate) * up)


def exported_mixtral(tmp_path, format, fmt="nvfp4", group_size=16, **sizes):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**(TINY | sizes))).eval()
    fp4cupy.quantize_model(model, fmt=fmt, group_size=group_size, progress=False)
    out = fp4cupy.export(model, tmp_path / "ckpt", format=format)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return model, tensors, json.loads((out / "config.json").read_text())["quantization_config"]


def stacked(tensors, layout, experts=4, block=BLOCK, projections=("w1", "w3", "w2")):
    """(w13, w2) as vLLM's weight loader fills the layer: each expert's w1 (gate) rows then its w3
    (up) rows, global scales [E, 2] (w1's, w3's) and [E], under the layout's tensor names."""
    names = LAYOUTS[layout]

    def get(e, proj, key):
        return tensors[f"{block}.experts.{e}.{proj}.{names[key]}"]

    def one(projs):
        codes = torch.stack([torch.cat([get(e, p, "codes") for p in projs]) for e in range(experts)])
        scales = torch.stack([torch.cat([get(e, p, "scales") for p in projs]) for e in range(experts)])
        g = None
        if names["g"]:
            g = torch.stack([torch.cat([get(e, p, "g").reshape(1) for p in projs]) for e in range(experts)])
            g = g if len(projs) == 2 else g[:, 0]
        return codes, scales, g

    return one(projections[:2]), one(projections[2:])


@pytest.mark.parametrize("format,fmt,group_size,layout", [
    ("nvfp4", "nvfp4", 16, "nvfp4"), ("modelopt", "nvfp4", 16, "modelopt"),
    ("compressed-tensors", "nvfp4", 16, "compressed-tensors"),
    ("compressed-tensors", "mxfp4", 32, "compressed-tensors-mxfp4")])
def test_stacked_experts_run_as_the_models_own(tmp_path, format, fmt, group_size, layout):
    model, tensors, cfg = exported_mixtral(tmp_path, format, fmt, group_size)
    w13, w2 = stacked(tensors, layout)
    if LAYOUTS[layout]["fp8_scales"]:
        assert w13[1].dtype == torch.float8_e4m3fn  # as vLLM's parameter holds them
    experts = experts_from_stacked(w13, w2, layout, group_size, Gating(silu_and_mul, True))
    own = model.model.layers[0].mlp.experts
    for mine, theirs in zip([*experts.up, *experts.down], [*own.up, *own.down]):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.weight_scale, theirs.weight_scale)
        g, want = mine.weight_global_scale.item(), theirs.weight_global_scale.item()
        # compressed-tensors stores 1/g: when no float32 c has RN(1/c) == g, g comes back 1 ulp off
        assert g == want or (layout == "compressed-tensors" and abs(g - want) <= np.spacing(np.float32(want)))
        assert mine.fmt == theirs.fmt == fmt
    torch.manual_seed(1)
    x = torch.randn(7, TINY["hidden_size"])
    index = torch.stack([torch.randperm(4)[:2] for _ in range(7)])
    weights = torch.rand(7, 2)
    if layout == "compressed-tensors":
        torch.testing.assert_close(experts(x, index, weights), own(x, index, weights), rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(experts(x, index, weights), own(x, index, weights))
    assert f"{BLOCK}.gate" in cfg["ignore"]  # the router is a float matrix vLLM must not quantize


def test_llama4_experts_weight_their_inputs_as_the_models_own(tmp_path):
    """Llama 4 (vLLM's apply_router_weight_on_input): the stacked experts with the router's weights on
    their inputs give the quantized model's own experts bit for bit."""
    from test_llama4 import tiny_llama4

    model = tiny_llama4()
    fp4cupy.quantize_model(model, progress=False)
    out = fp4cupy.export(model, tmp_path / "ckpt", format="modelopt")
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    w13, w2 = stacked(tensors, "modelopt", block="model.layers.1.feed_forward",
                      projections=("gate_proj", "up_proj", "down_proj"))
    experts = experts_from_stacked(w13, w2, "modelopt", 16, Gating(silu_and_mul, True, router_weight_on_input=True))
    own = model.model.layers[1].feed_forward.experts
    torch.manual_seed(1)
    x, index, weights = torch.randn(7, 64), torch.randint(0, 4, (7, 1)), torch.rand(7, 1)
    with torch.no_grad():
        assert torch.equal(experts(x, index, weights), own(x, index, weights))
        assert not torch.equal(experts(x, index, weights), experts(x, index, torch.ones_like(weights)) * weights)


def test_gate_and_up_of_different_global_scales_are_refused(tmp_path):
    _, tensors, _ = exported_mixtral(tmp_path, "modelopt")
    w13, w2 = stacked(tensors, "modelopt")
    g = w13[2].clone()
    g[2, 1] *= 2
    with pytest.raises(ValueError, match="layer: expert 2: its gate and up rows hold global scales"):
        experts_from_stacked((w13[0], w13[1], g), w2, "modelopt", 16, Gating(silu_and_mul, True), "layer")


def test_float_experts_are_in_the_ignore_list(tmp_path):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).eval()
    fp4cupy.quantize_model(model, skip=("lm_head", "embed", "*.experts"), progress=False)
    out = fp4cupy.export(model, tmp_path / "ckpt", format="modelopt")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert f"{BLOCK}.experts" in cfg["exclude_modules"] and f"{BLOCK}.gate" in cfg["exclude_modules"]


def test_other_ranks_experts_become_not_here():
    ids = torch.tensor([[0, 5], [3, 2]], dtype=torch.int32)
    expert_map = torch.tensor([-1, -1, 0, 1, -1, 2])  # this rank holds global experts 2, 3 and 5
    assert local_expert_ids(ids, expert_map, 3).tolist() == [[3, 2], [1, 0]]
    assert local_expert_ids(ids, None, 6) is ids


@pytest.mark.gpu
@pytest.mark.parametrize("format,fmt,group_size,layout", [
    ("modelopt", "nvfp4", 16, "modelopt"), ("compressed-tensors", "mxfp4", 32, "compressed-tensors-mxfp4")])
def test_stacked_experts_on_cuda_run_the_grouped_kernels_as_the_models_own(tmp_path, format, fmt, group_size, layout,
                                                                           monkeypatch):
    """The method's experts from CUDA parameters: held as the W4A16 repack alone, bf16 tokens in two
    grouped launches, equal to the quantized model's own experts moved to the GPU."""
    from fp4cupy import cuda_grouped

    calls, launch = [], cuda_grouped.grouped_linear
    monkeypatch.setattr(cuda_grouped, "grouped_linear", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    # K a multiple of 64 in both projections: the W4A16 kernels' weights
    model, tensors, _ = exported_mixtral(tmp_path, format, fmt, group_size, hidden_size=128, intermediate_size=192)
    w13, w2 = (tuple(None if t is None else t.cuda() for t in part) for part in stacked(tensors, layout))
    experts = experts_from_stacked(w13, w2, layout, group_size, Gating(silu_and_mul, True))
    assert all(layer.weight is None and layer.codes.is_cuda for layer in [*experts.up, *experts.down])
    own = model.model.layers[0].mlp.experts.to("cuda", torch.bfloat16)
    torch.manual_seed(1)
    x = torch.randn(5, 128, device="cuda", dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(5)]).cuda()
    weights = torch.rand(5, 2, device="cuda")
    with torch.no_grad():
        got, want = experts(x, index.int(), weights), own(x, index, weights)
    assert got.dtype == torch.bfloat16 and len(calls) == 4  # two a call
    assert torch.equal(got, want)
