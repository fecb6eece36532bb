"""MoE experts (transformers 5's 3-D expert weights) as FP4 layers, on the CPU: NVFP4Experts against
the original module running the dequantized weights, whole-model quantization, save and load."""
import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="transformers 5's 3-D experts")
import fp4cupy  # noqa: E402
from fp4cupy.experts import NVFP4Experts, expert_weights, is_experts  # noqa: E402
from test_interop import assert_imported_as_exported  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


def experts_module(kind: str):
    """A random float32 experts module: Mixtral (SwiGLU, [gate; up]) or gpt-oss (biases, weights
    stored [E, in, out], interleaved gate/up, clamped gate)."""
    torch.manual_seed(0)
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        m = MixtralExperts(transformers.MixtralConfig(**TINY))
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        m = GptOssExperts(transformers.GptOssConfig(**TINY))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    m.config._experts_implementation = "eager"
    return m


def dequantized_copy(original, fp4: NVFP4Experts):
    """``original`` with its weights replaced by fp4's dequantized ones (its own layout, biases kept)."""
    ref = copy.deepcopy(original)
    for name, layers in zip(("gate_up_proj" if ref.has_gate else "up_proj", "down_proj"), (fp4.up, fp4.down)):
        w = torch.stack([layer.fp4_weight().dequantize() for layer in layers])
        getattr(ref, name).data = w.transpose(1, 2).contiguous() if ref.is_transposed else w
    return ref


def routing(tokens, experts, k, seed, unused=()):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(experts) if e not in unused])
    index = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(tokens)])
    return index, torch.softmax(torch.randn(tokens, k, generator=g), -1)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_experts_equal_the_original_module_on_dequantized_weights(kind, fmt):
    """Each token's experts through the FP4 layers = the transformers module on deq(W), to float32
    rounding; an expert no token chose is skipped."""
    original = experts_module(kind)
    assert is_experts(original)
    fp4 = NVFP4Experts.from_float(copy.deepcopy(original), fmt, 32 if fmt == "mxfp4" else 16)
    ref = dequantized_copy(original, fp4)
    x = torch.randn(9, 64)
    index, weights = routing(9, 4, 2, 1, unused=(3,))
    with torch.no_grad():
        want, got = ref(x, index, weights), fp4(x, index, weights)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert float((got - want).norm() / want.norm()) < 1e-5
    with pytest.raises(TypeError, match="3-D weights"):
        NVFP4Experts.from_float(torch.nn.Linear(64, 64))


def route_reference(index, experts):
    """cuda_grouped.route's outputs in torch (rows of an expert in slot order)."""
    flat = index.reshape(-1).clamp(max=experts)
    expert_of_row, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(expert_of_row, torch.arange(experts + 1, device=index.device), out_int32=True)
    row_of_slot = torch.empty_like(order, dtype=torch.int32)
    row_of_slot[order] = torch.arange(len(order), dtype=torch.int32, device=index.device)
    return expert_of_row, order // index.shape[-1], offsets, row_of_slot


def combine_reference(h, row_of_slot, index, weights, experts):
    """cuda_grouped.combine in torch: each slot's row times its weight, rounded to h's dtype; the
    slots added in float32 one after another, rounded once; another rank's slots skipped."""
    contrib = (h[row_of_slot.long()] * weights.reshape(-1, 1)).to(h.dtype).float()
    contrib[index.reshape(-1) >= experts] = 0
    contrib = contrib.view(*weights.shape, -1)
    acc = torch.zeros_like(contrib[:, 0])
    for j in range(weights.shape[1]):
        acc += contrib[:, j]
    return acc.to(h.dtype)


def grouped_on_the_cpu(monkeypatch) -> None:
    """cuda_grouped's route, grouped launch and combine replaced by torch stand-ins (the launch:
    each expert's rows through its layer), so NVFP4Experts' grouped path runs on the CPU."""
    from fp4cupy import cuda_grouped

    def launch(x, layers, expert_of_row, offsets, n, tokens):
        assert torch.equal(expert_of_row, expert_of_row.sort().values) and offsets.dtype == torch.int32
        y = torch.full((len(x), n), float("nan"))  # rows of no expert here: not written
        for e, layer in enumerate(layers):
            y[offsets[e]:offsets[e + 1]] = layer(x[offsets[e]:offsets[e + 1]])
        return y

    monkeypatch.setattr(cuda_grouped, "grouped_linear", launch)
    monkeypatch.setattr(cuda_grouped, "route", route_reference)
    monkeypatch.setattr(cuda_grouped, "combine", combine_reference)


def test_the_grouped_path_orders_and_weights_rows_as_the_loop(monkeypatch):
    """NVFP4Experts' grouped forward (CUDA: route, two grouped launches, combine; no host sync) on
    the CPU, with torch stand-ins for the kernels (each expert's rows through its layer): equal to
    the loop, an expert chosen twice by a token and an expert-parallel "not here" index (4) included."""
    grouped_on_the_cpu(monkeypatch)
    fp4 = NVFP4Experts.from_float(experts_module("mixtral"))
    index, weights = routing(9, 4, 2, 5)
    index[2, 1], index[5] = 4, 3
    x = torch.randn(9, 64)
    with torch.no_grad():
        want = fp4(x, index, weights)  # the loop, on the CPU
        got = fp4._forward_grouped(x, index, weights, list(fp4.up), list(fp4.down))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_grouped_launch_table_takes_repacked_layers_with_biases_of_the_dtype(monkeypatch):
    """cuda_grouped.expert_table (the pointers the grouped kernels read) on stand-in layers: every
    layer held as the repack on one device, biases of x's dtype; else None, and NVFP4Experts loops.
    Asked again with the same pointers, the table is the one it gave before."""
    from types import SimpleNamespace

    from fp4cupy import cuda_grouped

    monkeypatch.setattr(cuda_grouped.cuda_linear, "_mma_ok", lambda device, bf16=False: True)  # sm_80+

    def layer(bias_dtype=torch.bfloat16, codes=True):
        return SimpleNamespace(codes=torch.zeros(4, dtype=torch.uint8) if codes else None,
                               scale_codes=torch.zeros(2, dtype=torch.uint8), kernel_global_scale=None,
                               weight_global_scale=torch.ones(()),
                               bias=None if bias_dtype is None else torch.zeros(3, dtype=bias_dtype))
    layers = [layer(), layer(None)]
    table, held, _ = cuda_grouped.expert_table(layers, torch.bfloat16)
    assert table.shape == (2, 4) and table[0, 0] == layers[0].codes.data_ptr() and table[1, 3] == 0
    assert table[0, 3] == layers[0].bias.data_ptr() and table[0, 2] == layers[0].weight_global_scale.data_ptr()
    assert cuda_grouped.expert_table([layer(), layer(torch.float32)], torch.bfloat16) is None
    assert cuda_grouped.expert_table([layer(), layer(codes=False)], torch.bfloat16) is None
    first = cuda_grouped.expert_table(layers, torch.bfloat16)
    assert cuda_grouped.expert_table(layers, torch.bfloat16, first) is first  # the same pointers: no upload
    layers[1].codes = torch.zeros(4, dtype=torch.uint8)
    again = cuda_grouped.expert_table(layers, torch.bfloat16, first)
    assert again is not first and again[0][1, 0] == layers[1].codes.data_ptr()
    monkeypatch.setattr(cuda_grouped.cuda_linear, "_mma_ok", lambda device, bf16=False: not bf16)  # sm_75
    half = [layer(torch.float16), layer(None)]
    assert cuda_grouped.expert_table(half, torch.float16) is not None  # fp16: the grouped kernels
    assert cuda_grouped.expert_table(layers, torch.bfloat16) is None  # bf16: the loop


def test_the_weights_leave_the_source_and_their_error_is_the_recipes():
    original = experts_module("gpt_oss")
    w = expert_weights(original, "gate_up_proj").clone()
    fp4 = NVFP4Experts.from_float(original)
    assert not hasattr(fp4.source, "gate_up_proj") and not hasattr(fp4.source, "down_proj_bias")
    assert [n for n, _ in fp4.named_parameters()] == [f"{p}.{e}.bias" for p in ("up", "down") for e in range(4)]
    for e in range(4):
        assert torch.equal(fp4.up[e].fp4_weight().data, fp4cupy.quantize(w[e]).data)


def tiny_mixtral():
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).eval()


def test_quantize_model_takes_the_experts_and_the_model_still_generates(tmp_path):
    model = tiny_mixtral()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    measured = fp4cupy.quantize_model(model, replace_linear=False, progress=False)
    assert is_experts(model.model.layers[0].mlp.experts)  # measuring leaves the model alone
    report = fp4cupy.quantize_model(model, progress=False)
    assert [e["rel_error"] for e in report] == [e["rel_error"] for e in measured]
    stacks = [e for e in report if len(e["shape"]) == 3]
    assert [e["name"] for e in stacks][:2] == ["model.layers.0.mlp.experts.gate_up_proj",
                                               "model.layers.0.mlp.experts.down_proj"]
    assert stacks[0]["shape"] == (4, 192, 64) and all(0.05 < e["rel_error"] < 0.15 for e in stacks)
    assert "and 4 of 4 MoE expert weight stacks quantized" in str(report)
    assert isinstance(model.model.layers[1].mlp.experts, NVFP4Experts)
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).norm() / before.norm()) < 0.3
    model.generate(ids[:1], max_new_tokens=3, do_sample=False)

    fp4cupy.save(model, tmp_path / "m.safetensors")  # into a fresh float model: experts rebuilt as FP4
    fresh = fp4cupy.load(tmp_path / "m.safetensors", tiny_mixtral())
    assert isinstance(fresh.model.layers[0].mlp.experts, NVFP4Experts)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, after)


def test_a_compiled_model_holds_the_experts_as_one_op():
    """torch.compile(fullgraph=True) takes a quantized MoE model whole (its experts one op of the
    graph, the loop behind it) with the eager logits; a deep copy runs its own layers."""
    model = tiny_mixtral()
    fp4cupy.quantize_model(model, progress=False)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits, want)
        copied = copy.deepcopy(model)
        first = copied.model.layers[0].mlp.experts
        assert first.op_key != model.model.layers[0].mlp.experts.op_key
        first.down[0].weight_scale.zero_()  # the copy's own layer, not the original's
        changed = copied(ids).logits
        assert not torch.equal(changed, want)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(copied, fullgraph=True, backend="aot_eager")(ids).logits, changed)


def test_skip_patterns_and_group_sizes_leave_experts_alone():
    report = fp4cupy.quantize_model(tiny_mixtral(), skip=("lm_head", "embed", "*.experts"), progress=False)
    assert all(e["skipped"] == "matches skip '*.experts'" for e in report if len(e["shape"]) == 3)
    assert "and 0 of 4 MoE expert weight stacks" in str(report)
    report = fp4cupy.quantize_model(tiny_mixtral(), group_size=64, progress=False)  # intermediate 96
    down = [e for e in report if e["name"].endswith("experts.down_proj")]
    assert down and all("in_features=96 is not a multiple of group_size=64" in e["skipped"] for e in down)


def tiny_qwen3_moe():
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**dict(TINY, num_experts=4, moe_intermediate_size=96, decoder_sparse_step=1))
    return transformers.Qwen3MoeForCausalLM(config).eval()


@pytest.mark.parametrize("make,names", [
    (tiny_mixtral, ("block_sparse_moe.experts.0.w1", "block_sparse_moe.experts.0.w3", "block_sparse_moe.experts.3.w2")),
    (tiny_qwen3_moe, ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.3.down_proj"))])
@pytest.mark.parametrize("format", ["compressed-tensors", "modelopt", "nvfp4", "mxfp4"])
def test_export_writes_experts_under_the_checkpoint_names_and_imports_back_bit_exactly(make, names, format, tmp_path):
    """Each expert's gate, up and down as the layers save_pretrained names (Mixtral's w1 / w3 / w2
    under block_sparse_moe, Qwen's gate_proj / up_proj / down_proj), and back into a fresh float
    model: the same codes, scales and logits."""
    from safetensors import safe_open

    fmt, group = ("mxfp4", 32) if format == "mxfp4" else ("nvfp4", 16)
    model = make()
    fp4cupy.quantize_model(model, fmt, group, progress=False)
    out = fp4cupy.export(model, tmp_path / "out", "compressed-tensors" if format == "mxfp4" else format)
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    prefix = "model.layers.1."
    codes = "weight_packed" if format in ("compressed-tensors", "mxfp4") else "weight"
    assert {f"{prefix}{n}.{codes}" for n in names} <= keys
    float_model = make()  # what save_pretrained names its tensors: each of ours is one of those, or of its layer
    saved = set(transformers.core_model_loading.revert_weight_conversion(float_model, float_model.state_dict()))
    assert all(k in saved or k.rpartition(".")[0] + ".weight" in saved for k in keys)
    assert_imported_as_exported(fp4cupy.import_checkpoint(make(), out), model, format)


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_qwen3_moe])
@pytest.mark.parametrize("format,fmt", [("compressed-tensors", "nvfp4"), ("modelopt", "nvfp4"), ("nvfp4", "nvfp4"),
                                        ("compressed-tensors", "mxfp4")])
def test_a_checkpoint_with_float_experts_imports_back(make, format, fmt, tmp_path):
    """Experts left in float (skip "*.experts") while the other Linear layers are quantized: the
    export holds their per-expert float layers, and the import stacks them back into the model's
    3-D experts, bit for bit."""
    model = make()
    fp4cupy.quantize_model(model, fmt, 32 if fmt == "mxfp4" else 16, skip=("lm_head", "embed", "*.experts"),
                           progress=False)
    out = fp4cupy.export(model, tmp_path / "out", format)
    back = fp4cupy.import_checkpoint(make(), out)
    assert is_experts(back.model.layers[1].mlp.experts)
    assert_imported_as_exported(back, model, format)
    if format == "modelopt":  # into FP4 experts: refused, with what to do
        quantized = fp4cupy.quantize_model(make(), progress=False).model
        with pytest.raises(ValueError, match="holds FP4 experts but the checkpoint keeps them in float"):
            fp4cupy.import_checkpoint(quantized, out)


def test_import_refuses_gate_and_up_of_different_global_scales(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_qwen3_moe()
    fp4cupy.quantize_model(model, progress=False)
    out = fp4cupy.export(model, tmp_path / "out", "modelopt")
    f = next(out.glob("*.safetensors"))
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.experts.2.up_proj.weight_scale_2"] *= 2
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="experts.up.2: its gate and up rows hold global scales"):
        fp4cupy.import_checkpoint(tiny_qwen3_moe(), out)


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_qwen3_moe])
def test_transformers_reads_our_mxfp4_experts_export(make, tmp_path):
    """transformers + compressed-tensors load the MXFP4 export of a MoE model, per-expert layers
    merged back into its 3-D experts: each expert's decompressed weight equals fp4cupy's dequantize
    to bf16, bit for bit. (Their NVFP4 MoE path drops the global scale, see NOTES.md.)"""
    ct = pytest.importorskip("compressed_tensors")
    if not hasattr(ct.config.CompressionFormat, "mxfp4_pack_quantized"):
        pytest.skip(f"compressed-tensors {ct.__version__} has no mxfp4-pack-quantized")
    model = make()
    fp4cupy.quantize_model(model, "mxfp4", 32, progress=False)
    out = fp4cupy.export(model, tmp_path / "ct", "compressed-tensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False), dtype=torch.float32)
    checked = 0
    for layer, ours in zip(loaded.model.layers, model.model.layers):
        for name, fp4 in (("gate_up_proj", ours.mlp.experts.up), ("down_proj", ours.mlp.experts.down)):
            for e, expert in enumerate(fp4):
                got = getattr(layer.mlp.experts, name)[e].detach().to(torch.bfloat16)
                assert torch.equal(got, expert.fp4_weight().dequantize(dtype=torch.bfloat16)), (name, e)
                checked += 1
    assert checked == 16


def test_an_experts_passes_run_side_by_side_from_a_pass_of_rows_on_average():
    from fp4cupy.cuda_grouped import pass_blocks

    assert pass_blocks(16, 32, 8, 8) == 1  # 4 rows an expert: one block a pass
    assert pass_blocks(1024, 2048, 8, 64) == 9  # 256 rows an expert: blocks for twice that
    assert pass_blocks(100, 800, 1, 64) == 2  # never more than the call's tokens need


def test_sm90a_takes_the_warpgroup_kernel_from_17_expected_rows_an_expert(monkeypatch):
    from fp4cupy import cuda_grouped, cuda_linear

    assert cuda_grouped.expected_rows(1024, 2048, 8) == 288  # 256 rows an expert + two deviations
    assert cuda_grouped.expected_rows(16, 2048, 8) == 16  # at most the call's tokens
    assert cuda_grouped.pass_tokens(1024, 2048, 8) == 64  # the other kernels' passes stop at 64
    assert cuda_grouped.wg_tile_rows(1024, 2048, 8, 0) == 0  # not on this machine (no sm_90a GPU)
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: True)
    assert cuda_grouped.wg_tile_rows(1024, 2048, 8, 0) == 128  # tiles of at most 128 rows
    assert cuda_grouped.wg_tile_rows(1024, 4096, 128, 0) == 64  # Qwen3-30B-A3B: 32 rows an expert -> 44
    assert cuda_grouped.wg_tile_rows(256, 2048, 128, 0) == 32  # 16 -> 24
    assert cuda_grouped.wg_tile_rows(128, 1024, 128, 0) == 0  # 8 -> 14: w4a16.cu's grouped kernel


def test_the_loop_over_experts_runs_past_the_row_limit_in_blocks_of_few_experts(monkeypatch):
    from fp4cupy import cuda_linear
    from fp4cupy.experts import loops_over_experts

    assert not loops_over_experts(256 * 8, 8, 0)  # 256 rows an expert: grouped (no sm_90a here)
    assert loops_over_experts(257 * 8, 8, 0)
    assert not loops_over_experts(10**6 * 128, 128, 0)  # 128 experts: the loop's host time, never
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: True)
    assert not loops_over_experts(2048 * 16, 16, 0)  # sm_90a: the warpgroup kernel up to 2048 rows
    assert loops_over_experts(2049 * 16, 16, 0)
