"""Llama 4's MoE blocks with FP4 experts (fp4cupy/llama4.py), on the CPU: the block against
transformers' dense form on the dequantized weights, the router weights on the experts' inputs,
checkpoints of per-expert layers, save and load. CI serves the export with real vLLM
(tests/workers/vllm_e2e.py --moe)."""
import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.llama4")
import fp4cupy  # noqa: E402
from fp4cupy.experts import NVFP4Experts  # noqa: E402
from fp4cupy.llama4 import Llama4Experts, Llama4Moe, is_llama4_experts  # noqa: E402
from test_experts import routing  # noqa: E402
from test_interop import assert_imported_as_exported  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
              interleave_moe_layer_step=1, attention_chunk_size=128, use_qk_norm=False)


def tiny_llama4(**over):
    """A random float32 Llama 4 text model whose every layer is a MoE block; experts' weights random
    (transformers starts gate_up_proj at zero)."""
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**(CONFIG | over))).eval()
    for name, p in model.named_parameters():
        if ".experts." in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def dequantized_block(block, fp4_block):
    """transformers' block ``block`` with fp4_block's dequantized weights: experts (back to [E, in, out])
    and shared expert."""
    ref = copy.deepcopy(block)
    up = torch.stack([layer.fp4_weight().dequantize() for layer in fp4_block.experts.up])
    down = torch.stack([layer.fp4_weight().dequantize() for layer in fp4_block.experts.down])
    ref.experts.gate_up_proj.data = up.transpose(1, 2).contiguous()
    ref.experts.down_proj.data = down.transpose(1, 2).contiguous()
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(ref.shared_expert, name).weight.data = getattr(fp4_block.shared_expert, name).fp4_weight().dequantize()
    return ref


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_the_block_runs_the_chosen_experts_as_the_dense_form_on_dequantized_weights(fmt):
    """Llama4Moe (the chosen expert on its tokens times their score) = transformers' block (every
    expert on every token, unchosen copies scaled to zero) on deq(W), to float32 rounding; the
    router's logits equal."""
    model = tiny_llama4()
    original = copy.deepcopy(model.model.layers[0].feed_forward)
    fp4cupy.quantize_model(model, fmt=fmt, group_size=32 if fmt == "mxfp4" else 16, progress=False)
    block = model.model.layers[0].feed_forward
    assert isinstance(block, Llama4Moe) and isinstance(block.experts, NVFP4Experts)
    assert isinstance(block.experts.source, Llama4Experts) and not list(block.experts.source.parameters())
    ref = dequantized_block(original, block)
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        got, logits = block(x)
        want, want_logits = ref(x)
        shared = ref.shared_expert(x.reshape(-1, 64))
    assert torch.equal(logits, want_logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float((got - shared).norm()) > 0.1 * float(shared.norm())  # the experts add something


def test_router_weights_scale_the_inputs_of_each_chosen_expert():
    """With router_weight_on_input, a token's output is the sum over its k experts of expert(x * w),
    not of w * expert(x): checked at k = 2, where the two differ through the gating's nonlinearity."""
    model = tiny_llama4(num_experts_per_tok=2)
    fp4cupy.quantize_model(model, progress=False)
    experts = model.model.layers[0].feed_forward.experts
    index, weights = routing(9, 4, 2, 3)
    x = torch.randn(9, 64)
    with torch.no_grad():
        got = experts(x, index, weights)
        want = torch.zeros_like(x)
        on_output = torch.zeros_like(x)
        for t in range(9):
            for e, w in zip(index[t].tolist(), weights[t]):
                def run(v):
                    return experts.down[e](experts.source._apply_gate(experts.up[e](v[None])))[0]
                want[t] += run(x[t] * w)
                on_output[t] += w * run(x[t])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float((want - on_output).norm()) > 1e-2 * float(want.norm())


def test_the_grouped_path_weights_the_inputs_as_the_loop(monkeypatch):
    """The grouped forward (CUDA's route, grouped launches and combine, with torch stand-ins on the
    CPU) scales each row by its slot's weight as the loop does, at k = 2 and with an expert-parallel
    "not here" index (4)."""
    from test_experts import grouped_on_the_cpu

    grouped_on_the_cpu(monkeypatch)
    model = tiny_llama4(num_experts_per_tok=2)
    fp4cupy.quantize_model(model, progress=False)
    experts = model.model.layers[0].feed_forward.experts
    index, weights = routing(9, 4, 2, 5)
    index[2, 1] = 4
    x = torch.randn(9, 64)
    with torch.no_grad():
        want = experts(x, index, weights)  # the loop, on the CPU
        got = experts._forward_grouped(x, index, weights, list(experts.up), list(experts.down))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_measuring_leaves_the_blocks_alone_and_reports_the_experts():
    model = tiny_llama4()
    report = fp4cupy.quantize_model(model, replace_linear=False, progress=False)
    assert is_llama4_experts(model.model.layers[0].feed_forward.experts)
    shapes = {e["name"]: e["shape"] for e in report if ".experts." in e["name"]}
    assert shapes == {f"model.layers.{i}.feed_forward.experts.{w}": s for i in (0, 1)
                      for w, s in (("gate_up_proj", (4, 64, 64)), ("down_proj", (4, 64, 32)))}
    assert all(0 < e["rel_error"] < 0.2 for e in report if ".experts." in e["name"])


@pytest.mark.parametrize("format,fmt", [("nvfp4", "nvfp4"), ("modelopt", "nvfp4"), ("compressed-tensors", "nvfp4"),
                                        ("compressed-tensors", "mxfp4")])
def test_exports_as_per_expert_layers_and_imports_back(format, fmt, tmp_path):
    """The experts are written as experts.{e}.gate_proj / up_proj / down_proj (gate and up: rows of one
    matrix, one global scale), read back into a float Llama 4 model as the same blocks."""
    from safetensors import safe_open

    model = tiny_llama4()
    fp4cupy.quantize_model(model, fmt=fmt, group_size=32 if fmt == "mxfp4" else 16, progress=False)
    out = fp4cupy.export(model, tmp_path / "ckpt", format=format)
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    codes = {"nvfp4": "weight", "modelopt": "weight", "compressed-tensors": "weight_packed"}[format]
    stem = "model.layers.1.feed_forward.experts"
    assert {f"{stem}.{e}.{p}.{codes}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")} <= keys
    assert not any(k.startswith(f"{stem}.gate_up_proj") or k.startswith(f"{stem}.down_proj") for k in keys)
    back = fp4cupy.import_checkpoint(tiny_llama4(), out)
    assert isinstance(back.model.layers[1].feed_forward, Llama4Moe)
    assert_imported_as_exported(back, model, format)


def test_save_and_load_rebuild_the_blocks(tmp_path):
    model = tiny_llama4()
    fp4cupy.quantize_model(model, progress=False)
    fp4cupy.save(model, tmp_path / "m.safetensors")
    back = fp4cupy.load(tmp_path / "m.safetensors", tiny_llama4())
    assert isinstance(back.model.layers[0].feed_forward, Llama4Moe)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_float_experts_stay_as_transformers_blocks_and_export_as_3d(tmp_path):
    """Experts skipped by quantize_model keep transformers' block; the export keeps their 3-D weights
    and names the module in the ignore list (vLLM then runs them in float)."""
    import json

    model = tiny_llama4()
    fp4cupy.quantize_model(model, skip=("lm_head", "embed", "*.experts"), progress=False)
    assert is_llama4_experts(model.model.layers[0].feed_forward.experts)
    out = fp4cupy.export(model, tmp_path / "ckpt", format="compressed-tensors")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.feed_forward.experts" in ignore
    back = fp4cupy.import_checkpoint(tiny_llama4(), out)
    assert is_llama4_experts(back.model.layers[0].feed_forward.experts)
    assert_imported_as_exported(back, model, "compressed-tensors")


def test_a_compiled_llama4_model_holds_the_experts_as_one_op():
    """torch.compile(fullgraph=True) takes the quantized model whole (each block's routing in the
    graph, its experts one op) with the eager logits."""
    model = tiny_llama4()
    fp4cupy.quantize_model(model, progress=False)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        torch._dynamo.reset()
        assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits, want)


def test_the_multimodal_model_exports_its_experts_under_the_checkpoints_names(tmp_path):
    """Llama4ForConditionalGeneration (how Scout and Maverick ship): the text model's experts are
    written as language_model.model.layers.N.feed_forward.experts.{e}.* and read back bit for bit.
    (transformers 5.24's text-only forward of the wrapper fails on its own; the text model is compared.)"""
    from safetensors import safe_open

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)

    def make():
        torch.manual_seed(0)
        m = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=CONFIG,
                                                                                  vision_config=vision)).eval()
        for name, p in m.named_parameters():
            if ".experts." in name:
                torch.nn.init.normal_(p, std=0.05)
        return m

    model = make()
    fp4cupy.quantize_model(model, skip=("lm_head", "embed", "vision"), progress=False)
    out = fp4cupy.export(model, tmp_path / "ckpt", format="modelopt")
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    assert "language_model.model.layers.0.feed_forward.experts.3.up_proj.weight_scale_2" in keys
    back = fp4cupy.import_checkpoint(make(), out)
    assert isinstance(back.language_model.model.layers[0].feed_forward, Llama4Moe)
    ids = torch.randint(0, 90, (1, 7))
    with torch.no_grad():
        assert torch.equal(back.language_model(input_ids=ids).logits, model.language_model(input_ids=ids).logits)


def test_per_expert_float_layers_of_llama4_experts_are_refused_by_name(tmp_path):
    """A checkpoint holding one block's Llama 4 experts as per-expert float layers (not the 3-D weights
    fp4cupy writes for float experts): NotImplementedError naming the module, not a wrong load."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama4()
    fp4cupy.quantize_model(model, progress=False)
    out = fp4cupy.export(model, tmp_path / "ckpt", format="modelopt")
    stem = "model.layers.0.feed_forward.experts"
    for f in out.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(f).items() if not k.startswith(stem + ".")}
        if len(tensors) < len(load_file(f)):
            for e in range(4):
                for proj, shape in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
                    tensors[f"{stem}.{e}.{proj}.weight"] = torch.randn(shape)
            save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(NotImplementedError, match=f"{stem}: per-expert float layers of Llama 4 experts"):
        fp4cupy.import_checkpoint(tiny_llama4(), out)
