"""torch integration on CUDA (run on a GPU: pytest -m gpu): layers, compile, graphs, streams, DLPack."""
import pytest

import fp4cupy

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def layer_and_input(dtype=torch.bfloat16, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(512, 384, bias=bias, device="cuda", dtype=dtype)
    layer = fp4cupy.NVFP4Linear.from_float(lin)
    return layer, torch.randn(3, 512, device="cuda", dtype=dtype)


def reference(layer, x):
    y = x.double() @ layer.fp4_weight().dequantize().double().T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3), (torch.float32, 1e-5)])
def test_layer_on_cuda_matches_reference(dtype, tol):
    layer, x = layer_and_input(dtype)
    assert rel(layer(x), reference(layer, x)) <= tol
    cpu = fp4cupy.NVFP4Linear.from_float(torch.nn.Linear(512, 384)).cuda()  # .to() after the fact
    assert rel(cpu(x.float()), reference(cpu, x.float())) <= 1e-5


def test_the_layer_without_gradients_skips_the_op_dispatch_and_gives_its_result(monkeypatch):
    """No gradient to track: forward calls the repacked path itself; with one, the fp4cupy::linear op
    (autograd); the same bits either way."""
    layer, x = layer_and_input()
    calls = []
    real = torch.ops.fp4cupy.linear
    monkeypatch.setattr(torch.ops.fp4cupy, "linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = layer(x)
    assert not calls
    tracked = layer(x.clone().requires_grad_())
    assert calls and torch.equal(fast, tracked.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_outside_bias_runs_in_the_kernel_as_the_layer_holding_it(dtype):
    """vLLM's layers hold their bias: with_bias gives the bits of a layer holding it (one rounding)."""
    held, x = layer_and_input(dtype)
    without = fp4cupy.NVFP4Linear.from_fp4(held.fp4_weight())
    with torch.no_grad():
        assert torch.equal(without.with_bias(x, held.bias), held(x))
    assert rel(without.with_bias(x, held.bias), reference(held, x)) <= (1e-3 if dtype == torch.float16 else 8e-3)


@pytest.mark.parametrize("fmt,group", [("nvfp4", 16), ("mxfp4", 32)])
def test_a_cast_after_quantizing_keeps_the_float32_global_scale(fmt, group):
    """layer.to(bf16) after quantizing: the kernel still reads a float32 global scale (MXFP4: the
    NVFP4 twin's), and the output matches the reference."""
    torch.manual_seed(3)
    layer = fp4cupy.NVFP4Linear.from_float(torch.nn.Linear(512, 384, device="cuda"), group, fmt).to(torch.bfloat16)
    assert layer.weight_global_scale.dtype == torch.float32
    assert layer.kernel_global_scale is None or layer.kernel_global_scale.dtype == torch.float32
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    assert rel(layer(x), reference(layer, x)) <= 8e-3


def test_compile_fullgraph_and_cuda_graph_give_the_eager_result():
    layer, x = layer_and_input()
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer(static_x)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, layer(x2), rtol=0, atol=0)


def test_side_streams_are_respected():
    layer, x = layer_and_input()
    want = layer(x)
    outs = []
    for _ in range(3):
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            xs = x * 1.0  # made on the side stream
            outs.append((s, layer(xs)))
    for s, y in outs:
        torch.cuda.current_stream().wait_stream(s)
        torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_torch_streams_wrap_without_deprecation_warnings():
    import warnings

    from fp4cupy import cuda_ops

    s = torch.cuda.Stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CuPy 14 deprecates ExternalStream
        wrapped = cuda_ops._external_stream(s.cuda_stream)
        fp4cupy.quantize(torch.randn(64, 128, device="cuda"))  # the call that records its status event
    assert wrapped.ptr == s.cuda_stream


def test_dlpack_is_zero_copy():
    t = fp4cupy.quantize(torch.randn(64, 128, device="cuda"))
    assert torch.from_dlpack(t).data_ptr() == t.data.data_ptr()
    v = t.to_torch()
    assert v["data_fp4"].data_ptr() == t.data.data_ptr() and v["scales"].data_ptr() == t.scales.data_ptr()
    cupy = pytest.importorskip("cupy")
    c = fp4cupy.quantize(cupy.random.standard_normal((64, 128), dtype=cupy.float32))
    assert c.to_torch()["data"].data_ptr() == c.data.data.ptr


def test_a_layer_the_kernel_declines_is_not_prepared_again_on_each_move(monkeypatch):
    layer, _ = layer_and_input(torch.float32)
    lin = torch.nn.Linear(96, 32, device="cuda")  # K = 96: not a multiple of 64, the dequantize path
    small = fp4cupy.NVFP4Linear.from_float(lin)
    assert small.codes is None and small.no_repack_on == torch.device("cuda", torch.cuda.current_device())
    calls, real = [], fp4cupy.nn.prepare
    monkeypatch.setattr(fp4cupy.nn, "prepare", lambda w: calls.append(w) or real(w))
    small.half().cuda().float()
    assert not calls
    x = torch.randn(3, 96, device="cuda")
    assert rel(small(x), reference(small, x)) <= 1e-5
    layer.cpu().cuda()  # a layer the kernel takes is repacked again on its way back
    assert len(calls) == 1 and layer.codes is not None and layer.no_repack_on is None


def test_a_float_global_scale_stays_0d_on_the_gpu():
    t = fp4cupy.quantize(torch.randn(64, 128, device="cuda"))
    u = fp4cupy.FP4Tensor(t.data, t.scales, 0.75, t.shape)
    assert u.global_scale_array.shape == () and u.global_scale_array.is_cuda and u.global_scale == 0.75
    torch.testing.assert_close(fp4cupy.dequantize(u), fp4cupy.dequantize(t) / t.global_scale * 0.75)


def test_tiny_llama_on_cuda_generates_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (1, 10), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
        fp4cupy.quantize_model_to_nvfp4(model, progress=False)
        after = model(ids).logits
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 14)
    assert 0 < rel(after, before) < 0.25
    fp4cupy.save(model, tmp_path / "m.safetensors")
    fresh = transformers.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    fp4cupy.load(tmp_path / "m.safetensors", fresh, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, after, rtol=0, atol=0)


def test_cuda_layer_holds_only_the_repack_and_exports_the_canonical_bytes():
    torch.manual_seed(9)
    lin = torch.nn.Linear(256, 200, device="cuda", dtype=torch.bfloat16)
    layer = fp4cupy.NVFP4Linear.from_float(lin)
    t = fp4cupy.quantize(lin.weight.detach())
    assert layer.weight is None and layer.codes is not None  # 4.5 bits a weight on the GPU, once
    assert layer.weight_nbytes() <= 256 * 200 * 9 // 16 + 16 * 4 * 256 // 2 + 4  # row tiles padded to 64
    state = layer.state_dict()
    assert torch.equal(state["weight"], t.data) and torch.equal(state["weight_scale"], t.scales)
    cpu = layer.cpu()
    assert torch.equal(cpu.weight, t.data.cpu()) and cpu.codes is None
    back = cpu.cuda()
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(back(x), fp4cupy.NVFP4Linear.from_float(lin)(x), rtol=0, atol=0)
    big = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)  # M > MMA_MAX_M: decoded from the repack
    assert rel(back(big), reference(back, big)) <= 8e-3


def test_mxfp4_layer_runs_the_kernel_and_exports_its_e8m0_scales():
    torch.manual_seed(11)
    lin = torch.nn.Linear(256, 200, device="cuda", dtype=torch.bfloat16)
    layer = fp4cupy.NVFP4Linear.from_float(lin, group_size=32, fmt="mxfp4")
    t = fp4cupy.quantize(lin.weight.detach(), "mxfp4")
    assert layer.weight is None and layer.codes is not None and layer.kernel_global_scale is not None
    state = layer.state_dict()
    assert "kernel_global_scale" not in state and float(state["weight_global_scale"]) == 1.0
    assert torch.equal(state["weight"], t.data) and torch.equal(state["weight_scale"], t.scales)
    want = lambda x: x.double() @ t.dequantize().double().T + lin.bias.double()  # noqa: E731
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    assert rel(layer(x), want(x)) <= 8e-3
    big, xf = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16), x.float()  # decoded from the repack
    assert rel(layer(big), want(big)) <= 8e-3 and rel(layer(xf), want(xf)) <= 1e-5
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=0, atol=0)
    cpu = layer.cpu()
    assert torch.equal(cpu.weight_scale, t.scales.cpu()) and cpu.codes is None and cpu.kernel_global_scale is None
    back = cpu.cuda()
    assert back.codes is not None
    torch.testing.assert_close(back(x), fp4cupy.NVFP4Linear.from_float(lin, 32, "mxfp4")(x), rtol=0, atol=0)
    fresh = fp4cupy.NVFP4Linear(256, 200, 32, fmt="mxfp4", device="cuda", dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    assert fresh.weight is None and torch.equal(fresh.state_dict()["weight_scale"], t.scales)


def test_fused_siblings_on_cuda_share_a_scale_and_run_as_one_weight():
    """quantize_model on CUDA gives q/k/v the codes, scales and global scale of their concatenation
    (the CPU reference's), and the vLLM plugin runs them as one NVFP4Linear."""
    from fp4cupy import reference
    from fp4cupy.vllm_plugin import shard_tensors

    torch.manual_seed(8)
    attn, parts = torch.nn.Module(), (256, 64, 64)
    for name, rows, s in zip(("q_proj", "k_proj", "v_proj"), parts, (1.0, 0.3, 2.0)):
        setattr(attn, name, torch.nn.Linear(512, rows, bias=False, device="cuda", dtype=torch.bfloat16))
        getattr(attn, name).weight.data.mul_(s)
    dense = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().float().cpu()
    fp4cupy.quantize_model(attn, progress=False)
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    weights = [layer.fp4_weight() for layer in layers]
    data, scales, g = reference.quantize(dense.numpy())
    assert [w.global_scale for w in weights] == [float(g)] * 3
    codes, scale_codes = torch.cat([w.data for w in weights]), torch.cat([w.scales for w in weights])
    assert torch.equal(codes.cpu(), torch.from_numpy(data)) and torch.equal(scale_codes.cpu(), torch.from_numpy(scales))
    merged = shard_tensors(codes, scale_codes, [w.global_scale for w in weights], list(parts), 16)
    assert len(merged) == 1 and merged[0].shape == (384, 512) and merged[0].data.is_cuda
    shard = fp4cupy.NVFP4Linear.from_fp4(merged[0])  # as the plugin holds it: the repack alone
    assert shard.weight is None and shard.codes.is_cuda
    for m in (1, 16):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        want = x.double() @ fp4cupy.dequantize(merged[0]).double().T
        assert rel(shard(x), want) <= 8e-3
        assert rel(torch.cat([layer(x) for layer in layers], dim=-1), want) <= 8e-3


def test_from_pretrained_with_fp4cupys_config_quantizes_on_the_gpu(tmp_path):
    """transformers loads the float checkpoint onto the GPU, then quantize_model: layers held as the
    W4A16 repack, the bits of quantize_model called by hand, generation runs."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(6)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    kw = dict(device_map="cuda", dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=fp4cupy.FP4CupyConfig(),
                                                              **kw).eval()
    layers = [m for m in model.modules() if isinstance(m, fp4cupy.NVFP4Linear)]
    assert len(layers) == 14 and all(m.codes is not None and m.codes.is_cuda and m.weight is None for m in layers)
    by_hand = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **kw).eval()
    fp4cupy.quantize_model(by_hand, progress=False)
    ids = torch.randint(0, 128, (1, 9), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, by_hand(ids).logits, rtol=0, atol=0)
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 13)


def test_quantize_model_onto_the_gpu_holds_one_float_weight_there_at_a_time(tmp_path):
    """A float model in CPU memory, quantize_model(device="cuda") (and FP4CupyConfig(device="cuda")
    through from_pretrained): the GPU's peak stays well under the float model's bytes, every tensor
    ends on the GPU, and the logits are those of the model moved first and quantized there."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=24,
                                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(9)  # 92 M values, 184 MB in bf16; the FP4 model ~52 MB, the largest weight 1 M values
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    kw = dict(dtype=torch.bfloat16)
    by_hand = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda", **kw).eval()
    fp4cupy.quantize_model(by_hand, progress=False)
    float_bytes = sum(p.numel() * 2 for p in transformers.LlamaForCausalLM(cfg).parameters())
    ids = torch.randint(0, 256, (1, 7), device="cuda")
    for load in ("quantize_model", "from_pretrained"):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if load == "quantize_model":
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **kw).eval()
            fp4cupy.quantize_model(model, device="cuda", progress=False)
        else:
            config = fp4cupy.FP4CupyConfig(device="cuda")
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, **kw).eval()
        assert torch.cuda.max_memory_allocated() - base < 0.5 * float_bytes, load
        assert all(t.is_cuda for t in model.state_dict().values()), load
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, by_hand(ids).logits, rtol=0, atol=0)
        del model


def test_the_cli_quantizes_on_the_gpu_to_the_bytes_of_the_cpu_reference(tmp_path):
    """``fp4cupy quantize --device cuda`` (the float model in CPU memory, a weight at a time on the
    GPU) writes the tensors ``--device cpu`` writes, bit for bit."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from fp4cupy import cli

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(10)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    for device in ("cpu", "cuda"):
        assert cli.main(["quantize", str(tmp_path / "src"), str(tmp_path / device), "--export", "modelopt",
                         "--device", device]) == 0
    on = {d: {k: v for f in sorted((tmp_path / d).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
          for d in ("cpu", "cuda")}
    assert set(on["cpu"]) == set(on["cuda"]) and any(k.endswith("weight_scale_2") for k in on["cpu"])
    assert all(torch.equal(on["cpu"][k].reshape(-1).view(torch.uint8), on["cuda"][k].reshape(-1).view(torch.uint8))
               for k in on["cpu"])
