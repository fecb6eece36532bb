"""Checkpoint export / import in the fp4cupy, modelopt and compressed-tensors layouts (CPU), NVFP4
and, as compressed-tensors' mxfp4-pack-quantized, MXFP4."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import fp4cupy  # noqa: E402
from fp4cupy import interop as ex  # noqa: E402


def tiny(seed=7):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_export_import_round_trips_bit_exactly(tmp_path, fmt):
    model = tiny()
    fp4cupy.quantize_model_to_nvfp4(model, progress=False)
    out = fp4cupy.export(model, tmp_path / fmt, format=fmt, shard_bytes=20_000)  # several shards
    assert len(list(out.glob("model-*.safetensors"))) > 1
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "lm_head" in cfg["ignore"]
    assert_imported_as_exported(fp4cupy.import_checkpoint(tiny(seed=99), out), model, fmt)


def assert_imported_as_exported(back, model, fmt):
    """``back`` (imported from ``model``'s ``fmt`` export) holds the same tensors and gives its logits."""
    state = back.state_dict()
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():
        if fmt == "compressed-tensors" and k.endswith("weight_global_scale"):
            # stored as 1/g: when no float32 c has RN(1/c) == g, g comes back 1 ulp off
            assert abs(float(state[k]) - float(v)) <= float(np.spacing(np.float32(v))), k
        else:
            assert torch.equal(state[k], v), k
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_a_model_built_from_the_exports_config_imports_it(tmp_path, fmt):
    """README's fresh_float_model for a transformers checkpoint: the architecture from config.json
    (its quantization_config does not get in the way), weights not initialized, then import_checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    model = tiny()
    fp4cupy.quantize_model_to_nvfp4(model, progress=False)
    out = fp4cupy.export(model, tmp_path, format=fmt)
    with no_init_weights():
        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    assert_imported_as_exported(fp4cupy.import_checkpoint(fresh, out), model, fmt)


def test_layouts_keys_and_dtypes(tmp_path):
    from safetensors import safe_open

    model = tiny()
    fp4cupy.quantize_model_to_nvfp4(model, progress=False)
    q = "model.layers.0.self_attn.q_proj"
    g = float(model.get_submodule(q).weight_global_scale)
    want = {"modelopt": {"weight": (torch.uint8, (64, 32)), "weight_scale": (torch.float8_e4m3fn, (64, 4)),
                         "weight_scale_2": (torch.float32, ())},
            "compressed-tensors": {"weight_packed": (torch.uint8, (64, 32)), "weight_scale": (torch.float8_e4m3fn, (64, 4)),
                                   "weight_global_scale": (torch.float32, (1,))}}
    for fmt, spec in want.items():
        out = fp4cupy.export(model, tmp_path / fmt, format=fmt)
        with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as h:
            for leaf, (dtype, shape) in spec.items():
                t = h.get_tensor(f"{q}.{leaf}")
                assert t.dtype == dtype and tuple(t.shape) == shape, (fmt, leaf)
            gs = float(h.get_tensor(f"{q}.{'weight_scale_2' if fmt == 'modelopt' else 'weight_global_scale'}").reshape(-1)[0])
        assert gs == (g if fmt == "modelopt" else ex.inverse_global_scale(g))
    hf = json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["group_size"] == 16 and "lm_head" in hf["quantization"]["exclude_modules"]


def test_inverse_global_scale_is_within_one_ulp():
    rng = np.random.default_rng(0)
    gs = rng.uniform(1e-6, 1.0, 2000).astype(np.float32)
    back = np.array([np.float32(1) / np.float32(ex.inverse_global_scale(g)) for g in gs])
    assert (np.abs(back - gs) <= np.spacing(gs)).all()
    assert (back == gs).mean() > 0.6  # exact wherever a reciprocal preimage exists


def test_export_needs_quantized_layers(tmp_path):
    with pytest.raises(ValueError, match="no NVFP4Linear"):
        fp4cupy.export(tiny(), tmp_path)
    with pytest.raises(ValueError, match="format must be"):
        fp4cupy.export(tiny(), tmp_path, format="gguf")


def test_quantize_command(tmp_path, capsys):
    from fp4cupy import cli

    src = tmp_path / "src"
    tiny().save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    assert cli.main(["quantize", str(src), str(tmp_path / "out"), "--export", "modelopt"]) == 0
    assert (tmp_path / "out" / "hf_quant_config.json").is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()
    back = fp4cupy.import_checkpoint(tiny(seed=3), tmp_path / "out")
    assert isinstance(back.model.layers[1].mlp.up_proj, fp4cupy.NVFP4Linear)
    assert cli.main(["quantize", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err


@pytest.mark.parametrize("fmt,group", [("nvfp4", 16), ("mxfp4", 32)])
def test_transformers_reads_our_compressed_tensors_export(tmp_path, fmt, group):
    """transformers + compressed-tensors load the export (nvfp4- or mxfp4-pack-quantized); their
    decompressed weights (computed in bf16 by compressed-tensors) equal fp4cupy's dequantize to
    bf16, bit for bit."""
    ct = pytest.importorskip("compressed_tensors")
    if not hasattr(ct.config.CompressionFormat, f"{fmt}_pack_quantized"):
        pytest.skip(f"compressed-tensors {ct.__version__} has no {fmt}-pack-quantized")
    model = tiny()
    fp4cupy.quantize_model(model, fmt, group, progress=False)
    out = fp4cupy.export(model, tmp_path / "ct", format="compressed-tensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False), dtype=torch.float32)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, fp4cupy.NVFP4Linear)]
    assert len(layers) == 14
    for name, layer in layers:
        got = loaded.get_submodule(name).weight.detach().to(torch.bfloat16)
        assert torch.equal(got, layer.fp4_weight().dequantize(dtype=torch.bfloat16)), name


def compressed_tensors_checkpoint(path, model, compress) -> dict:
    """Write ``model`` as compressed-tensors would: each Linear but lm_head as ``compress(weight)``'s
    tensors, the rest as it is, in one safetensors file under ``path``; return {layer: its tensors}."""
    from safetensors.torch import save_file

    written = {name: compress(mod.weight.detach()) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and name != "lm_head"}
    state = {f"{name}.{k}": v.contiguous() for name, packed in written.items() for k, v in packed.items()}
    state.update({k: v.contiguous() for k, v in model.state_dict().items() if k.rpartition(".")[0] not in written})
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    return written


def test_import_of_a_checkpoint_written_by_compressed_tensors(tmp_path):
    """The compressed-tensors library quantizes and packs (its own recipe); importing keeps its bytes."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True, dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def compress(w):
        gs = generate_gparam(w.amin(), w.amax())
        blocks = w.view(w.shape[0], -1, 16)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=gs)
        return NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gs}, scheme)

    written = compressed_tensors_checkpoint(tmp_path / "ck", tiny(), compress)
    back = fp4cupy.import_checkpoint(tiny(seed=5), tmp_path / "ck")
    for name, packed in written.items():
        layer = back.get_submodule(name)
        assert isinstance(layer, fp4cupy.NVFP4Linear), name
        assert torch.equal(layer.weight, packed["weight_packed"]), name
        assert torch.equal(layer.weight_scale, packed["weight_scale"].view(torch.uint8)), name
        assert float(layer.weight_global_scale) == float(np.float32(1) / np.float32(float(packed["weight_global_scale"])))
    assert ct.__version__


def test_vllm_plugin_imports_without_vllm_and_reads_the_three_configs(tmp_path):
    from fp4cupy import vllm_plugin

    vllm_plugin.register()  # a no-op where vLLM is absent; vLLM itself is exercised by tests/workers/vllm_e2e.py
    model = tiny()
    fp4cupy.quantize_model_to_nvfp4(model, progress=False)
    for fmt in ex.FORMATS:
        out = fp4cupy.export(model, tmp_path / fmt, format=fmt)
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert vllm_plugin.layout_of(cfg) == fmt
        assert vllm_plugin._group_size(cfg) == 16 and "lm_head" in vllm_plugin._ignored(cfg)
    assert vllm_plugin.layout_of({"quant_method": "gptq"}) is None


def test_calibrated_w4a4_exports(tmp_path):
    from safetensors import safe_open

    model = tiny()
    fp4cupy.quantize_model_to_nvfp4(model, progress=False)
    amax = fp4cupy.calibrate(model, [torch.randint(0, 96, (1, 8)) for _ in range(3)], progress=False)
    q = "model.layers.0.self_attn.q_proj"
    assert amax[q] > 0 and len(amax) == 15  # 14 quantized + lm_head
    out = fp4cupy.export(model, tmp_path / "mo", format="modelopt", input_amax=amax)
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "NVFP4"
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as h:
        assert float(h.get_tensor(f"{q}.input_scale")) == pytest.approx(amax[q] / 2688, rel=1e-6)
    out = fp4cupy.export(model, tmp_path / "ct", format="compressed-tensors", input_amax=amax)
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as h:
        assert float(h.get_tensor(f"{q}.input_global_scale")[0]) == pytest.approx(2688 / amax[q], rel=1e-6)
    back = fp4cupy.import_checkpoint(tiny(seed=2), out)  # activation scales are read past, weights load
    assert isinstance(back.model.layers[0].self_attn.q_proj, fp4cupy.NVFP4Linear)


def test_exported_fused_layers_carry_one_global_scale(tmp_path):
    """vLLM's own NVFP4 kernels take one global scale for a fused q/k/v or gate/up weight (the max of
    the shards'): the exports carry equal ones, so those kernels decode every shard right."""
    from safetensors import safe_open

    model = tiny()
    fp4cupy.quantize_model_to_nvfp4(model, progress=False)
    p = "model.layers.1."
    for fmt, leaf in (("modelopt", "weight_scale_2"), ("compressed-tensors", "weight_global_scale")):
        out = fp4cupy.export(model, tmp_path / fmt, format=fmt)
        with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as h:
            for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
                assert len({float(h.get_tensor(f"{p}{n}.{leaf}").reshape(-1)[0]) for n in group}) == 1, (fmt, group)


def test_vllm_shard_tensors_merge_shards_of_one_global_scale():
    from fp4cupy.vllm_plugin import shard_tensors

    torch.manual_seed(3)
    parts = [64, 16, 16]
    w = torch.randn(sum(parts), 128)
    one = fp4cupy.quantize(w)  # one global scale: q/k/v as modelopt and fp4cupy write them
    x = torch.randn(5, 128)
    merged = shard_tensors(one.data, one.scales, [float(one.global_scale)] * 3, parts, 16)
    assert len(merged) == 1 and merged[0].shape == (96, 128)
    torch.testing.assert_close(fp4cupy.linear(x, merged[0]), fp4cupy.linear(x, one), rtol=0, atol=0)

    each = [fp4cupy.quantize(s) for s in w.split(parts)]  # one global scale a shard: kept apart, exact
    data, scales = torch.cat([t.data for t in each]), torch.cat([t.scales for t in each])
    split = shard_tensors(data, scales, [float(t.global_scale) for t in each], parts, 16)
    assert [t.shape for t in split] == [(64, 128), (16, 128), (16, 128)]
    for got, want in zip(split, each):
        assert torch.equal(got.data, want.data) and torch.equal(got.scales, want.scales)
        assert float(got.global_scale) == float(want.global_scale)


# MXFP4 checkpoints in compressed-tensors' mxfp4-pack-quantized layout (compressed-tensors' reading of
# our export is test_transformers_reads_our_compressed_tensors_export above).
def tiny_mxfp4(seed=7):
    model = tiny(seed)
    fp4cupy.quantize_model(model, fmt="mxfp4", group_size=32, progress=False)
    return model


def test_mxfp4_exports_as_compressed_tensors_and_imports_bit_exactly(tmp_path):
    from safetensors import safe_open

    model = tiny_mxfp4()
    out = fp4cupy.export(model, tmp_path / "ct", format="compressed-tensors", shard_bytes=20_000)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "mxfp4-pack-quantized"
    weights = cfg["config_groups"]["group_0"]["weights"]
    assert (weights["strategy"], weights["group_size"], weights["scale_dtype"]) == ("group", 32, "torch.uint8")
    q = "model.layers.0.self_attn.q_proj"
    keys = {}
    for f in out.glob("model-*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys.update({k: h.get_tensor(k) for k in h.keys() if k.startswith(q + ".")})
    assert sorted(keys) == [f"{q}.weight_packed", f"{q}.weight_scale"]  # no global scale
    assert keys[f"{q}.weight_packed"].dtype == torch.uint8 and keys[f"{q}.weight_packed"].shape == (64, 32)
    assert keys[f"{q}.weight_scale"].dtype == torch.uint8 and keys[f"{q}.weight_scale"].shape == (64, 2)

    with pytest.raises(ValueError, match="is nvfp4 group 16 but the checkpoint holds mxfp4 group 32"):
        fp4cupy.import_checkpoint(fp4cupy.quantize_model(tiny(), progress=False).model, out)
    back = fp4cupy.import_checkpoint(tiny_mxfp4(seed=99), out)
    layer = back.get_submodule(q)
    assert (layer.fmt, layer.group_size) == ("mxfp4", 32)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    fresh = transformers.LlamaForCausalLM(model.config).eval()  # a float model: its layers become MXFP4 ones
    fp4cupy.import_checkpoint(fresh, out)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_mxfp4_models_export_only_where_the_layout_holds_them(tmp_path):
    model = tiny_mxfp4()
    with pytest.raises(ValueError, match=r"modelopt checkpoints hold NVFP4 with group 16.*mxfp4 group 32"):
        fp4cupy.export(model, tmp_path / "mo", format="modelopt")
    with pytest.raises(ValueError, match="no static activation scale"):
        fp4cupy.export(model, tmp_path / "ct", format="compressed-tensors", input_amax={"x": 1.0})
    mixed = tiny_mxfp4()
    mixed.model.layers[0].mlp.down_proj = fp4cupy.NVFP4Linear.from_float(torch.nn.Linear(128, 64))
    with pytest.raises(ValueError, match=r"or MXFP4 with group 32 in every layer.*nvfp4 group 16"):
        fp4cupy.export(mixed, tmp_path / "mixed", format="compressed-tensors")
    assert (fp4cupy.export(model, tmp_path / "own", format="nvfp4") / "config.json").is_file()


def test_vllm_plugin_reads_the_mxfp4_config_and_merges_its_shards(tmp_path):
    from fp4cupy import vllm_plugin

    out = fp4cupy.export(tiny_mxfp4(), tmp_path / "ct", format="compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert vllm_plugin.layout_of(cfg) == "compressed-tensors-mxfp4"
    assert vllm_plugin._group_size(cfg) == 32 and not vllm_plugin._w4a4(cfg)
    assert ex.LAYOUTS["compressed-tensors-mxfp4"]["g"] is None

    torch.manual_seed(2)
    w = torch.randn(96, 128)
    t = fp4cupy.quantize(w, "mxfp4")
    (merged,) = vllm_plugin.shard_tensors(t.data, t.scales, [1.0] * 3, [64, 16, 16], 32, "mxfp4")
    assert (merged.fmt, merged.group_size, merged.shape) == ("mxfp4", 32, (96, 128))
    x = torch.randn(3, 128)
    torch.testing.assert_close(fp4cupy.linear(x, merged), fp4cupy.linear(x, t), rtol=0, atol=0)


def test_import_of_an_mxfp4_checkpoint_written_by_compressed_tensors(tmp_path):
    """compressed-tensors quantizes (its own scale rule) and packs MXFP4; importing keeps its bytes."""
    ct = pytest.importorskip("compressed_tensors")
    if not hasattr(ct.config.CompressionFormat, "mxfp4_pack_quantized"):
        pytest.skip(f"compressed-tensors {ct.__version__} has no mxfp4-pack-quantized")
    from compressed_tensors.compressors import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, dynamic=False,
                            scale_dtype=torch.uint8)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def compress(w):
        blocks = w.view(w.shape[0], -1, 32)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)  # powers of two
        return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)

    written = compressed_tensors_checkpoint(tmp_path / "ck", tiny(), compress)
    back = fp4cupy.import_checkpoint(tiny(seed=5), tmp_path / "ck")
    for name, packed in written.items():
        layer = back.get_submodule(name)
        assert (type(layer), layer.fmt, layer.group_size) == (fp4cupy.NVFP4Linear, "mxfp4", 32), name
        assert sorted(packed) == ["weight_packed", "weight_scale"]
        assert torch.equal(layer.weight, packed["weight_packed"]), name
        assert torch.equal(layer.weight_scale, packed["weight_scale"]), name
        want = MXFP4PackedCompressor.decompress(dict(packed), scheme)["weight"]  # compressed-tensors' own decode
        assert torch.equal(layer.fp4_weight().dequantize(dtype=torch.bfloat16), want.to(torch.bfloat16)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_scale_mode_quantizes_as_compressed_tensors_does(dtype):
    """scale_mode="round" gives compressed-tensors' MXFP4 codes and scales bit for bit (the OCP floor
    and torchao's rceil do not), for float32 and bf16 weights."""
    ct = pytest.importorskip("compressed_tensors")
    if not hasattr(ct.config.CompressionFormat, "mxfp4_pack_quantized"):
        pytest.skip(f"compressed-tensors {ct.__version__} has no mxfp4-pack-quantized")
    from compressed_tensors.compressors import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    w = (torch.randn(256, 512) * torch.exp(3 * torch.randn(256, 1))).to(dtype)
    w[0, :32] = 0
    w[1, 0], w[1, 1:32] = 1.75 * 2**-3, 0.01  # a significand of 1.75: round carries, floor does not
    w[2, 0], w[2, 1:32] = 1.74 * 2**-3, 0.01
    args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, dynamic=False,
                            scale_dtype=torch.uint8)
    blocks = w.view(w.shape[0], -1, 32)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    theirs = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale},
                                            QuantizationScheme(targets=["Linear"], weights=args))
    ours = fp4cupy.quantize(w, "mxfp4", scale_mode="round")
    assert torch.equal(ours.scales, theirs["weight_scale"]) and torch.equal(ours.data, theirs["weight_packed"])
    assert int(ours.scales[1, 0]) == int(fp4cupy.quantize(w, "mxfp4").scales[1, 0]) + 1
    for other in ("floor", "rceil"):
        assert not torch.equal(fp4cupy.quantize(w, "mxfp4", scale_mode=other).scales, theirs["weight_scale"])


def test_quantize_command_writes_mxfp4_compressed_tensors(tmp_path, capsys):
    from fp4cupy import cli

    src = tmp_path / "src"
    transformers.LlamaForCausalLM(tiny_mxfp4().config).save_pretrained(src)
    argv = ["quantize", str(src), str(tmp_path / "out"), "--export", "compressed-tensors", "--fmt", "mxfp4",
            "--scale-mode", "round"]
    assert cli.main(argv) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "mxfp4-pack-quantized"
    back = fp4cupy.import_checkpoint(transformers.LlamaForCausalLM(tiny_mxfp4().config), tmp_path / "out")
    assert back.model.layers[1].mlp.up_proj.fmt == "mxfp4"
    assert cli.main(["quantize", str(src), str(tmp_path / "bad"), "--export", "modelopt", "--fmt", "mxfp4"]) == 2
    assert "modelopt checkpoints hold NVFP4 with group 16" in capsys.readouterr().err
