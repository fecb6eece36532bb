"""MXFP4 checkpoints in compressed-tensors' mxfp4-pack-quantized layout: export, import, the
compressed-tensors library's own reading of them, and the vLLM plugin's view (CPU)."""
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import fp4cupy  # noqa: E402
from fp4cupy import interop as ex  # noqa: E402


def tiny_mxfp4(seed=7):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
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


def test_compressed_tensors_reads_our_mxfp4_export(tmp_path):
    """transformers + compressed-tensors decompress the export to fp4cupy's dequantized weights."""
    ct = pytest.importorskip("compressed_tensors")
    if not hasattr(ct.config.CompressionFormat, "mxfp4_pack_quantized"):
        pytest.skip(f"compressed-tensors {ct.__version__} has no mxfp4-pack-quantized")
    model = tiny_mxfp4()
    out = fp4cupy.export(model, tmp_path / "ct", format="compressed-tensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False), dtype=torch.float32)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, fp4cupy.NVFP4Linear)]
    assert len(layers) == 14
    for name, layer in layers:
        got = loaded.get_submodule(name).weight.detach().to(torch.bfloat16)
        assert torch.equal(got, layer.fp4_weight().dequantize(dtype=torch.bfloat16)), name


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
    from safetensors.torch import save_file

    model = transformers.LlamaForCausalLM(tiny_mxfp4().config).eval()
    args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, dynamic=False,
                            scale_dtype=torch.uint8)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state, written = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w = mod.weight.detach()
            blocks = w.view(w.shape[0], -1, 32)
            scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)  # powers of two
            packed = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
            written[name] = packed
            state.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in written:
            state[k] = v.contiguous()
    (tmp_path / "ck").mkdir()
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    back = fp4cupy.import_checkpoint(transformers.LlamaForCausalLM(model.config).eval(), tmp_path / "ck")
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
