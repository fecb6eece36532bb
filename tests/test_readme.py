"""The README's Python examples run as written (on the CPU here; the GPU lines are gated by
``get_compute_capability()``). ``model`` and ``fresh_float_model``, which the README leaves to
the reader, are small torch models."""
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import fp4cupy  # noqa: E402

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def block(first_line_part: str) -> str:
    (found,) = [b for b in BLOCKS if first_line_part in b.splitlines()[0]]
    return found


def small_model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))


def run(source: str, **names) -> dict:
    names.setdefault("__name__", "readme")
    exec(compile(source, "README.md", "exec"), names)
    return names


def test_every_python_block_is_covered():
    firsts = [b.splitlines()[0] for b in BLOCKS]
    assert firsts == ["import numpy as np", "import torch, fp4cupy", "import fp4cupy", "fp4cupy.export(model, \"out/\", "
                      "format=\"modelopt\")           # or \"compressed-tensors\", \"nvfp4\"",
                      "from transformers import AutoConfig, AutoModelForCausalLM", "from vllm import LLM",
                      "import cupy as cp, fp4cupy"], firsts


@pytest.mark.slow
def test_quickstart():
    ns = run(block("import numpy as np"))
    w = ns["w"]
    assert ns["t"].shape == w.shape and ns["w_hat"].shape == w.shape
    assert ns["odd"].shape == (2, 20) and ns["mx"].fmt == "mxfp4"
    assert ns["act"].global_scale == pytest.approx(0.002)
    assert ns["y"].shape == (8, 4096) and ns["y"].dtype == torch.bfloat16
    assert ns["c"].shape == (4096, 4096) and tuple(ns["packed"].shape) == (4096, 2048)


def test_torch_models_save_and_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, fresh = small_model(0), small_model(1)
    ns = run(block("import torch, fp4cupy"), model=model, fresh_float_model=fresh)
    assert "2 of 2 Linear layers quantized" in str(ns["report"])
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_checkpoint_export_and_import(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = small_model(2)
    fp4cupy.quantize_model_to_nvfp4(model)
    fresh = small_model(3)
    run(block("fp4cupy.export(model"), fp4cupy=fp4cupy, model=model, fresh_float_model=fresh)  # continues the last block
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_a_transformers_models_fresh_float_model(tmp_path, monkeypatch):
    """The block that builds fresh_float_model from an export's config.json, then the import."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(cfg).eval()
    fp4cupy.quantize_model_to_nvfp4(model, progress=False)
    fp4cupy.export(model, "out/", format="modelopt")
    ns = run(block("from transformers import AutoConfig"))
    fresh = fp4cupy.import_checkpoint(ns["fresh_float_model"], "out/").eval()
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_from_pretrained_with_fp4cupys_config(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained("path/to/hf-model")
    ns = run(block("import fp4cupy"))
    assert "7 of 8 Linear layers quantized" in str(ns["model"].fp4cupy_report)
