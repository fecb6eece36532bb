"""torch integration on the CPU: NVFP4Linear, custom ops, whole-model quantization, save/load."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fp4cupy  # noqa: E402
from fp4cupy import reference  # noqa: E402


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def exact_linear(x, layer):
    w = layer.fp4_weight().dequantize().double()
    y = x.double() @ w.T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("fmt,gs", [("nvfp4", 16), ("nvfp4", 32), ("mxfp4", 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_from_float_equals_dequantized_linear(fmt, gs, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40, bias=bias)
    layer = fp4cupy.NVFP4Linear.from_float(lin, group_size=gs, fmt=fmt)
    t = fp4cupy.quantize(lin.weight.detach(), fmt, gs)
    assert torch.equal(layer.weight, t.data) and torch.equal(layer.weight_scale, t.scales)
    x = torch.randn(2, 5, 128)
    y = layer(x)
    assert y.shape == (2, 5, 40) and y.dtype == x.dtype
    assert rel(y, exact_linear(x, layer)) < 1e-6
    assert "fmt=" + fmt in repr(layer) and "smaller than bf16" in repr(layer)


def test_an_outside_bias_gives_the_layer_holding_it_bit_for_bit():
    torch.manual_seed(5)
    lin = torch.nn.Linear(64, 24)
    bare = torch.nn.Linear(64, 24, bias=False)
    bare.weight = lin.weight
    held, without = fp4cupy.NVFP4Linear.from_float(lin), fp4cupy.NVFP4Linear.from_float(bare)
    x = torch.randn(3, 64)
    assert torch.equal(without.with_bias(x, lin.bias), held(x))
    assert torch.equal(without.with_bias(x, None), without(x))
    with pytest.raises(ValueError, match=r"bias of shape \(23,\): this layer takes \[24\]"):
        without.with_bias(x, torch.randn(23))


def test_a_batch_of_no_tokens_runs_forward_and_backward_like_nn_linear():
    """An MoE expert that no token chose: y [0, N], and backward gives x an empty gradient and the
    bias a zero one, as torch.nn.Linear does."""
    lin = torch.nn.Linear(64, 24)
    layer = fp4cupy.NVFP4Linear.from_float(lin)
    x = torch.randn(0, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == lin(x).shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(layer.bias.grad, torch.zeros(24))


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_a_dtype_cast_keeps_the_global_scale_float32(cast):
    """model.half() / .to(bf16) cast the bias like nn.Linear's, not the FP32 global scale (decoded
    weights would leave the recipe)."""
    layer = fp4cupy.NVFP4Linear.from_float(torch.nn.Linear(64, 24))
    g, w = layer.weight_global_scale.clone(), layer.fp4_weight().dequantize()
    cast(layer)
    assert layer.weight_global_scale.dtype == torch.float32 and torch.equal(layer.weight_global_scale, g)
    assert layer.bias.dtype != torch.float32 and torch.equal(layer.fp4_weight().dequantize(), w)


def test_seed_constructor_and_state_dict_round_trip():
    torch.manual_seed(1)
    layer = fp4cupy.NVFP4LinearLayer(64, 32, group_size=16).from_float(torch.nn.Linear(64, 32))
    fresh = fp4cupy.NVFP4LinearLayer(64, 32, group_size=16)
    assert not torch.equal(fresh.weight, layer.weight)
    fresh.load_state_dict(layer.state_dict())
    for k, v in layer.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match="multiple of group_size"):
        fp4cupy.NVFP4Linear(60, 8)


def test_custom_ops_pass_opcheck():
    torch.manual_seed(2)
    x = torch.randn(4, 64)
    data, scales, g = torch.ops.fp4cupy.quantize(x, "nvfp4", 16)
    torch.library.opcheck(torch.ops.fp4cupy.quantize, (x, "nvfp4", 16))
    torch.library.opcheck(torch.ops.fp4cupy.dequantize, (data, scales, g, "nvfp4", 16, "float32"))
    w = torch.randn(24, 64)
    wd, ws, wg = torch.ops.fp4cupy.quantize(w, "nvfp4", 16)
    torch.library.opcheck(torch.ops.fp4cupy.linear, (x, wd, ws, wg, None, None, torch.randn(24), "nvfp4", 16, 24))


def test_compiles_fullgraph_without_breaks():
    torch.manual_seed(3)
    layer = fp4cupy.NVFP4Linear.from_float(torch.nn.Linear(64, 16))
    model = torch.nn.Sequential(layer, torch.nn.GELU())
    x = torch.randn(2, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(4)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_tiny_llama_quantized_generates_and_stays_close():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    report = fp4cupy.quantize_model_to_nvfp4(model, group_size=16, progress=False)
    names = {e["name"]: e for e in report}
    assert "skipped" in names["lm_head"] and isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, fp4cupy.NVFP4Linear)
    done = [e for e in report if "skipped" not in e]
    assert len(done) == 2 * 7 and all(0.05 < e["rel_error"] < 0.15 for e in done)  # FP4: ~10% per weight
    assert all(e["bytes_after"] < e["bytes_before"] / 3.5 for e in done)
    with torch.no_grad():
        after = model(ids).logits
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)
    assert 0 < rel(after, before) < 0.2
    assert "Linear layers quantized" in str(report)


def test_skip_patterns_tied_weights_and_copy():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    report = fp4cupy.quantize_model(model, skip=("*.mlp.down_proj",), inplace=False, progress=False)
    names = {e["name"]: e for e in report}
    assert names["lm_head"]["skipped"] == "tied weight"
    assert "skip" in names["model.layers.1.mlp.down_proj"]["skipped"]
    assert isinstance(report.model.model.layers[1].mlp.up_proj, fp4cupy.NVFP4Linear)
    assert isinstance(model.model.layers[1].mlp.up_proj, torch.nn.Linear)  # the original is untouched


def test_save_load_round_trips_bit_exactly(tmp_path):
    model = tiny_llama()
    fp4cupy.quantize_model_to_nvfp4(model, progress=False)
    path = tmp_path / "m.safetensors"
    fp4cupy.save(model, path)
    state = fp4cupy.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    fresh = fp4cupy.load(path, tiny_llama())  # a float model: quantized layers are rebuilt, then loaded
    assert isinstance(fresh.model.layers[0].self_attn.q_proj, fp4cupy.NVFP4Linear)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert open(path, "rb").read(8) and b"fp4cupy.layers" in open(path, "rb").read(4096)


def test_fp4tensor_to_torch_views():
    t = fp4cupy.quantize(torch.randn(8, 32))
    v = t.to_torch()
    assert v["data"].data_ptr() == t.data.data_ptr() == v["data_fp4"].data_ptr()
    assert v["scales"].dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(v["scales"].float().numpy(), reference.e4m3_decode(t.scales.numpy()))
    m = fp4cupy.quantize(torch.randn(8, 32), "mxfp4").to_torch()
    assert m["scales"].dtype == torch.float8_e8m0fnu and float(m["global_scale"]) == 1.0


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
def test_other_transformers_architectures(arch):
    """Qwen2 (biased q/k/v projections) and a BERT-style encoder quantize and run."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
    else:
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4)
        model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        before = model(ids)[0]
        report = fp4cupy.quantize_model(model, progress=False)
        after = model(ids)[0]
    done = [e for e in report if "skipped" not in e]
    assert len(done) >= 2 * 6 and 0 < rel(after, before) < 0.3
    biased = [m for m in model.modules() if isinstance(m, fp4cupy.NVFP4Linear) and m.bias is not None]
    assert biased  # Qwen2's q/k/v and BERT's layers carry a bias


def test_layer_constructors_reject_what_they_cannot_take():
    with pytest.raises(TypeError, match="from_float takes an nn.Linear"):
        fp4cupy.NVFP4Linear.from_float(torch.nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="the layer is 64 -> 32 but the nn.Linear is 32 -> 64"):
        fp4cupy.NVFP4LinearLayer(64, 32).from_float(torch.nn.Linear(32, 64))
    with pytest.raises(TypeError, match="from_fp4 takes a 2-D FP4Tensor of torch tensors"):
        fp4cupy.NVFP4Linear.from_fp4(fp4cupy.quantize(np.ones((4, 32), np.float32)))


def test_fused_siblings_share_one_global_scale():
    """q/k/v and gate/up (which vLLM runs as one matrix) get the global scale of their concatenation;
    each keeps the reference codes for that scale, so the fused matrix is quantized as one tensor."""
    model = tiny_llama()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():
        attn.k_proj.weight.mul_(0.25)  # amaxes far apart: one global scale each would differ
        mlp.up_proj.weight.mul_(3.0)
    dense = {name: lin.weight.detach().clone() for name, lin in model.named_modules() if isinstance(lin, torch.nn.Linear)}
    report = fp4cupy.quantize_model(model, progress=False)
    p = "model.layers.0."
    for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        data, scales, g = reference.quantize(torch.cat([dense[p + n] for n in group]).numpy())
        layers = [model.get_submodule(p + n) for n in group]
        assert [float(layer.weight_global_scale) for layer in layers] == [float(g)] * len(group)
        np.testing.assert_array_equal(torch.cat([layer.weight for layer in layers]).numpy(), data)
        np.testing.assert_array_equal(torch.cat([layer.weight_scale for layer in layers]).numpy(), scales)
    for alone in ("self_attn.o_proj", "mlp.down_proj"):
        assert float(model.get_submodule(p + alone).weight_global_scale) == reference.quantize(dense[p + alone].numpy())[2]
    names = {e["name"]: e for e in report}
    assert names[p + "self_attn.k_proj"]["global_scale_shared_with"] == (p + "self_attn.q_proj", p + "self_attn.v_proj")
    assert "global_scale_shared_with" not in names[p + "mlp.down_proj"]
    assert "10 layers share a global scale with their fused siblings" in str(report)

    own = tiny_llama()
    with torch.no_grad():
        own.model.layers[0].self_attn.k_proj.weight.mul_(0.25)
    fp4cupy.quantize_model(own, progress=False, fused=())  # one global scale a layer
    qg, kg = (float(own.get_submodule(p + n).weight_global_scale) for n in ("self_attn.q_proj", "self_attn.k_proj"))
    assert kg == reference.quantize(dense[p + "self_attn.k_proj"].numpy())[2] != qg


def test_fused_groups_are_siblings_named_in_one_entry():
    from fp4cupy.fused import fused_groups

    names = ["a.q_proj", "a.k_proj", "b.q_proj", "a.v_proj", "a.o_proj", "m.gate_proj", "m.up_proj", "m.down_proj",
             "e.0.w1", "e.0.w2", "e.0.w3", "x.gate_proj"]
    assert fused_groups(names) == [("a.q_proj", "a.k_proj", "a.v_proj"), ("m.gate_proj", "m.up_proj"), ("e.0.w1", "e.0.w3")]
    assert fused_groups(names, fused=()) == []
    assert fused_groups(["q_proj", "k_proj"], fused=(("q_proj", "k_proj"),)) == [("q_proj", "k_proj")]  # top level


def test_fused_siblings_with_a_nonfinite_weight_raise_the_quantize_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fp4cupy.quantize_model(model, progress=False)


def test_quantize_model_leaves_routers_and_gates_in_float():
    """Layers of fewer than 16 outputs (a router of 8 experts, Qwen2-MoE's shared_expert_gate of 1)
    stay nn.Linear, as vLLM builds them, and the report says why."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(64, 1), torch.nn.Linear(64, 16))
    report = fp4cupy.quantize_model(model, progress=False)
    assert [type(m).__name__ for m in model] == ["Linear", "Linear", "NVFP4Linear"]
    assert [e.get("skipped", "")[:15] for e in report] == ["out_features=8:", "out_features=1:", ""]


def test_quantize_model_on_a_device_copies_each_weight_there_and_gives_the_same_layers():
    """device=: each float weight is copied to the device to be quantized (the original layer is
    left as it was), then the model is moved there; here the CPU, so the layers are the ones made
    in place, bit for bit, MoE experts included (GPU: test_gpu_torch.py)."""
    import copy

    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(8)
    model = transformers.MixtralForCausalLM(cfg).eval()
    other = copy.deepcopy(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    report = fp4cupy.quantize_model(model, device="cpu", progress=False)
    assert str(report) == str(fp4cupy.quantize_model(other, progress=False))
    for n, m in linears.items():  # the float layers left as they were: their own weights, unchanged
        assert m.weight.device.type == "cpu" and torch.equal(m.weight, before[n]), n
    state, want = model.state_dict(), other.state_dict()
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)
