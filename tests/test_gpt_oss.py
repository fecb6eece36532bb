"""gpt-oss checkpoints (OpenAI's MXFP4 experts layout, fp4cupy/gpt_oss.py): transformers' own
reader and fp4cupy's import agree bit for bit, on the CPU."""
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="transformers 5's 3-D experts")
import fp4cupy  # noqa: E402
from fp4cupy.experts import NVFP4Experts  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=16)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def tiny_gpt_oss(seed=0):
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**CONFIG)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def write_gpt_oss(model, path):
    """``model``, its experts quantized to MXFP4 by fp4cupy, as gpt-oss checkpoints are written: per
    experts module and projection p, p_blocks [E, rows, K/32, 16], p_scales [E, rows, K/32], p_bias;
    everything else as it is; config.json with quant_method "mxfp4"."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if ".experts." not in k}
    for name, m in model.named_modules():
        if isinstance(m, NVFP4Experts):
            for proj, layers in (("gate_up_proj", m.up), ("down_proj", m.down)):
                ws = [layer.fp4_weight() for layer in layers]
                rows, k = ws[0].shape
                state[f"{name}.{proj}_blocks"] = torch.stack([w.data for w in ws]).reshape(len(ws), rows, k // 32, 16)
                state[f"{name}.{proj}_scales"] = torch.stack([w.scales for w in ws])
                state[f"{name}.{proj}_bias"] = torch.stack([layer.bias.detach() for layer in layers])
    path.mkdir()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (path / "config.json").write_text(json.dumps(config))


def test_transformers_and_fp4cupy_read_a_gpt_oss_checkpoint_alike(tmp_path):
    """transformers' Mxfp4 reader (dequantized) finds every expert's weight equal to fp4cupy's
    dequantize; fp4cupy's import holds the stored bytes and gives the written model's logits."""
    model = tiny_gpt_oss()
    report = fp4cupy.quantize_model(model, "mxfp4", 32, skip=("self_attn", "lm_head", "embed"), progress=False)
    assert "4 of 4 MoE expert weight stacks" in str(report)
    write_gpt_oss(model, tmp_path / "ckpt")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32)
    for layer, ours in zip(theirs.model.layers, model.model.layers):
        for name, fp4 in (("gate_up_proj", ours.mlp.experts.up), ("down_proj", ours.mlp.experts.down)):
            for e, expert in enumerate(fp4):  # theirs: [E, in, out]
                assert torch.equal(getattr(layer.mlp.experts, name)[e].T, expert.fp4_weight().dequantize()), (name, e)
    back = fp4cupy.import_checkpoint(tiny_gpt_oss(seed=1), tmp_path / "ckpt")
    experts = back.model.layers[1].mlp.experts
    assert isinstance(experts, NVFP4Experts) and experts.up[0].fmt == "mxfp4"
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_a_quantized_model_does_not_take_a_gpt_oss_checkpoint(tmp_path):
    model = tiny_gpt_oss()
    fp4cupy.quantize_model(model, "mxfp4", 32, skip=("self_attn", "lm_head", "embed"), progress=False)
    write_gpt_oss(model, tmp_path / "ckpt")
    nvfp4 = tiny_gpt_oss()
    fp4cupy.quantize_model(nvfp4, progress=False)
    with pytest.raises(ValueError, match="is nvfp4 group 16 but the checkpoint holds mxfp4 group 32"):
        fp4cupy.import_checkpoint(nvfp4, tmp_path / "ckpt")


def test_export_writes_the_gpt_oss_layout_that_transformers_and_fp4cupy_read(tmp_path):
    """fp4cupy.export(format="gpt-oss") writes what the reference writer above writes, tensor for
    tensor; transformers reads it as gpt-oss MXFP4 and the import gives the model back."""
    from safetensors.torch import load_file

    model = tiny_gpt_oss()
    fp4cupy.quantize_model(model, "mxfp4", 32, skip=("self_attn", "lm_head", "embed"), progress=False)
    out = fp4cupy.export(model, tmp_path / "export", "gpt-oss", shard_bytes=50_000)
    write_gpt_oss(model, tmp_path / "reference")
    ours = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    want = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert len(list(out.glob("*.safetensors"))) > 1 and set(ours) == set(want)
    assert all(torch.equal(ours[k], want[k]) for k in want)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32)
    assert torch.equal(theirs.model.layers[1].mlp.experts.down_proj[3].T,
                       model.model.layers[1].mlp.experts.down[3].fp4_weight().dequantize())
    back = fp4cupy.import_checkpoint(tiny_gpt_oss(seed=2), out)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_export_to_the_gpt_oss_layout_refuses_what_it_cannot_hold(tmp_path):
    everything = tiny_gpt_oss()
    fp4cupy.quantize_model(everything, "mxfp4", 32, progress=False)  # attention too
    with pytest.raises(ValueError, match="8 quantized Linear layers: quantize with"):
        fp4cupy.export(everything, tmp_path / "a", "gpt-oss")
    nvfp4 = tiny_gpt_oss()
    fp4cupy.quantize_model(nvfp4, skip=("self_attn", "lm_head", "embed"), progress=False)
    with pytest.raises(ValueError, match=r"experts \[\('nvfp4', 16\)\]"):
        fp4cupy.export(nvfp4, tmp_path / "b", "gpt-oss")
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(**dict(CONFIG, head_dim=None)))
    fp4cupy.quantize_model(mixtral, "mxfp4", 32, progress=False)
    with pytest.raises(ValueError, match="model_type 'gpt_oss'"):
        fp4cupy.export(mixtral, tmp_path / "c", "gpt-oss")
    assert not (tmp_path / "a").exists()  # the checks run before anything is written
