"""transformers' from_pretrained with fp4cupy's quantization_config (CPU): the layers quantize_model
makes by hand, bit for bit, in both formats and for MoE experts; what it refuses, and why."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import fp4cupy  # noqa: E402
from fp4cupy import FP4CupyConfig, NVFP4Linear  # noqa: E402
from fp4cupy.experts import NVFP4Experts  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def llama(path):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("config,fmt", [(FP4CupyConfig(), "nvfp4"), (FP4CupyConfig("mxfp4", scale_mode="round"), "mxfp4"),
                                        (FP4CupyConfig(group_size=32, skip=["lm_head", "*.down_proj"]), "nvfp4"),
                                        (FP4CupyConfig(device="cpu"), "nvfp4")])
def test_from_pretrained_quantizes_as_quantize_model_does(tmp_path, config, fmt):
    path = llama(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    by_hand = AutoModelForCausalLM.from_pretrained(path)
    report = fp4cupy.quantize_model(by_hand, config.fmt, config.group_size, skip=tuple(config.skip),
                                    scale_mode=config.scale_mode, progress=False)
    assert str(model.fp4cupy_report) == str(report)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    assert len(layers) == (14 if "*.down_proj" not in config.skip else 12)
    assert all(m.fmt == fmt and m.group_size == config.group_size for m in layers.values())
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, NVFP4Linear)
    state, want = model.state_dict(), by_hand.state_dict()
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, by_hand(ids).logits)
    assert model.config.quantization_config.quant_method == "fp4cupy"


def test_moe_experts_quantize_on_load(tmp_path):
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(5)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP4CupyConfig())
    assert any(isinstance(m, NVFP4Experts) for m in model.modules())
    by_hand = AutoModelForCausalLM.from_pretrained(tmp_path)
    fp4cupy.quantize_model(by_hand, progress=False)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, by_hand(ids).logits)


def test_save_pretrained_refuses_and_export_writes_it(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama(tmp_path / "float"), quantization_config=FP4CupyConfig())
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "saved")
    out = fp4cupy.export(model, tmp_path / "out", format="modelopt")
    fresh = fp4cupy.import_checkpoint(AutoModelForCausalLM.from_pretrained(tmp_path / "float"), out)
    ids = torch.randint(0, 96, (1, 4))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_a_checkpoint_that_names_fp4cupy_is_refused_with_the_way_to_load_it(tmp_path):
    path = llama(tmp_path / "float")
    config = transformers.AutoConfig.from_pretrained(path)
    config.quantization_config = FP4CupyConfig().to_dict()
    config.save_pretrained(path)
    with pytest.raises(ValueError, match="import_checkpoint"):
        AutoModelForCausalLM.from_pretrained(path)


def test_bad_configs_say_what_is_allowed():
    with pytest.raises(ValueError, match="known formats"):
        FP4CupyConfig("int4")
    with pytest.raises(ValueError, match="allowed: 8, 16, 32, 64"):
        FP4CupyConfig(group_size=7)
    with pytest.raises(ValueError, match="allowed: floor, rceil, round"):
        FP4CupyConfig("mxfp4", scale_mode="nearest")
    assert FP4CupyConfig("MXFP4").group_size == 32 and FP4CupyConfig(skip="lm_head").skip == ["lm_head"]
    again = FP4CupyConfig.from_dict(FP4CupyConfig("mxfp4", scale_mode="rceil", device="cpu").to_dict())
    assert (again.fmt, again.group_size, again.scale_mode, again.device) == ("mxfp4", 32, "rceil", "cpu")
