"""MoE experts as FP4 layers on CUDA (run on a GPU: pytest -m gpu): each expert's projections run
the W4A16 kernel, in one grouped launch a projection up to grouped_max_rows rows an expert on average
(cuda_grouped.py), else a launch an expert; the block against the transformers module on the dequantized weights."""
import copy
import gc

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import fp4cupy  # noqa: E402
from fp4cupy import cuda_grouped  # noqa: E402
from fp4cupy import experts as fp4_experts  # noqa: E402
from fp4cupy.experts import NVFP4Experts, grouped_max_rows  # noqa: E402
from fp4cupy.nn import NVFP4Linear  # noqa: E402
from test_experts import TINY, combine_reference, dequantized_copy, route_reference, routing  # noqa: E402

SIZES = dict(TINY, hidden_size=512, intermediate_size=768, num_local_experts=8)


def grouped_calls(monkeypatch) -> list:
    """Counts NVFP4Experts' grouped launches."""
    calls, launch = [], cuda_grouped.grouped_linear
    monkeypatch.setattr(cuda_grouped, "grouped_linear", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("tokens", [3, 40, 300, 1100, 8400])
def test_experts_on_cuda_match_the_original_on_dequantized_weights(kind, dtype, tol, tokens, monkeypatch):
    """fp16/bf16 tokens through the W4A16 kernel (the up and down projections each round to the
    dtype) against the float32 module on deq(W). 3 tokens: 6 rows, fewer than the 8 experts (the
    grouped grid over rows); 40: experts get 0 to ~20 rows (over experts; sm_90a: the warpgroup
    kernel); 300: 75 rows an expert on average (the tiled kernel; sm_90a: the warpgroup kernel);
    1100: 275, the loop (sm_90a: the warpgroup kernel); 8400: 2100, the loop."""
    calls = grouped_calls(monkeypatch)
    torch.manual_seed(0)
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts

        config = transformers.MixtralConfig(**SIZES)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts

        config = transformers.GptOssConfig(**SIZES)
    config._experts_implementation = "eager"
    original = Experts(config).cuda()
    for p in original.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fp4 = NVFP4Experts.from_float(copy.deepcopy(original).to(dtype))
    assert fp4.up[0].weight is None and fp4.up[0].codes.is_cuda  # held as the kernel's repack
    ref = dequantized_copy(original, fp4)
    x = torch.randn(tokens, 512, device="cuda")
    index, weights = (t.cuda() for t in routing(tokens, 8, 2, 2, unused=(5,)))
    with torch.no_grad():
        want = ref(x.to(dtype).float(), index, weights).double()
        got = fp4(x.to(dtype), index, weights.to(dtype))
    assert got.dtype == dtype and got.is_cuda
    assert float((got.double() - want).norm() / want.norm()) <= tol
    assert len(calls) == (2 if tokens * 2 <= grouped_max_rows(torch.cuda.current_device()) * 8 else 0)


def uses_wg_grouped() -> bool:
    """Whether this GPU takes the grouped warpgroup kernel (sm_90a)."""
    return fp4cupy.cuda_linear._wg_ok(torch.cuda.current_device())


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("kernel", ["mma", "warpgroup"])
def test_grouped_launch_rows_match_each_experts_float64_product(dtype, tol, fmt, kernel, poison, monkeypatch):
    """cuda_grouped.grouped_linear against x_r @ deq(W_e)^T + b_e in float64, row by row, for 5 experts
    of 200 rows (not a multiple of the 16-row tile), some with biases: an expert with more rows than
    a pass (picked twice by tokens), one with none, rows of expert 5 (another rank's), in both
    grids (over experts, and over rows with 4 rows for 5 experts), and 173 rows through the tiled
    kernel (two passes of 64 for expert 0), and 370 rows whose passes run side by side (grid x = 4).
    "warpgroup" (sm_90a): the last two through w4a16_wgmma_grouped.cu (tiles of 64, then 96 rows:
    expert 0's 200 rows in three), and tiles of 32 (55 rows), of 128 (460 rows of experts with 1 to
    300 rows); where the tiled kernel would run, its output bit for bit."""
    if kernel == "warpgroup" and not uses_wg_grouped():
        pytest.skip("the grouped warpgroup kernel runs on sm_90a")
    if kernel == "mma":
        monkeypatch.setattr(cuda_grouped, "WG_MIN_PASS", 10**9)
    torch.manual_seed(1)
    n, k, gs = 200, 64 * 5, 32 if fmt == "mxfp4" else 16
    layers = [NVFP4Linear.from_fp4(fp4cupy.quantize(torch.randn(n, k, device="cuda"), fmt, gs),
                                   torch.randn(n, device="cuda", dtype=dtype) if e % 2 else None) for e in range(5)]
    table, *_held = cuda_grouped.expert_table(layers, dtype)
    ids = torch.arange(6, device="cuda")
    for experts_of_rows, tokens in (([0] * 19 + [1] * 3 + [3] * 7 + [4] + [5] * 2, 8), ([1, 2, 4, 5], 4),
                                    ([0] * 100 + [2] * 70 + [5] * 3, 64),  # passes of 64: the tiled kernel
                                    ([0] * 200 + [1] * 130 + [2] * 40, 200),  # 4 blocks share an expert's rows
                                    ([0] * 20 + [1] * 10 + [3] * 25, 25),
                                    ([0] * 300 + [1] + [3] * 129 + [4] * 30, 300)):
        if kernel == "warpgroup":
            tile = cuda_grouped.wg_tile_rows(tokens, len(experts_of_rows), 5, torch.cuda.current_device())
            assert tile == {8: 0, 4: 0, 64: 64, 200: 96, 25: 32, 300: 128}[tokens], tokens
        expert_of_row = torch.tensor(experts_of_rows, device="cuda")
        offsets = torch.searchsorted(expert_of_row, ids, out_int32=True)
        x = torch.randn(len(experts_of_rows), k, device="cuda").to(dtype)
        y = cuda_grouped.grouped_linear(x, table, expert_of_row, offsets, n, tokens)  # poisoned: 0xAB bytes
        for e in range(5):
            rows = expert_of_row == e
            w = layers[e].fp4_weight().dequantize().double()
            want = x[rows].double() @ w.T + (0 if layers[e].bias is None else layers[e].bias.detach().double())
            err = float((y[rows].double() - want).norm() / want.norm()) if rows.any() else 0.0
            assert err <= tol, (e, err)
        if kernel == "warpgroup" and cuda_grouped.pass_tokens(tokens, len(experts_of_rows), 5) >= 33:
            # the tiled kernel adds the same products in the same K order: equal bit for bit
            wg_min_pass = cuda_grouped.WG_MIN_PASS
            monkeypatch.setattr(cuda_grouped, "WG_MIN_PASS", 10**9)
            assert torch.equal(y, cuda_grouped.grouped_linear(x, table, expert_of_row, offsets, n, tokens)), tokens
            monkeypatch.setattr(cuda_grouped, "WG_MIN_PASS", wg_min_pass)


def test_route_sorts_slots_by_expert_and_combine_adds_them_back(poison):
    """cuda_grouped.route against torch's stable sort (offsets and the experts' row order equal; each
    slot's row holds its expert and token: the order within an expert is free) on 300 tokens x 8 of
    40 experts, some slots another rank's (40, 57); expert_tiles against a list of each expert's
    tiles; combine against its torch reference bit for bit, weights float32 and in h's dtype."""
    torch.manual_seed(4)
    tokens, k, experts, hidden = 300, 8, 40, 96
    index = torch.randint(0, experts, (tokens, k), device="cuda")
    index[::7, 3], index[5, 0] = experts, 57
    expert_of_row, token_of_row, offsets, row_of_slot = cuda_grouped.route(index, experts)
    want_experts, _, want_offsets, _ = route_reference(index, experts)
    assert torch.equal(offsets, want_offsets) and torch.equal(expert_of_row, want_experts)
    slots = torch.arange(tokens * k, device="cuda")
    assert torch.equal(torch.sort(row_of_slot.long()).values, slots)  # a permutation
    assert torch.equal(expert_of_row[row_of_slot.long()], index.reshape(-1).clamp(max=experts))
    assert torch.equal(token_of_row[row_of_slot.long()], slots // k)
    for nt in (64, 128, 5):  # tiles of at most nt rows of an expert, expert by expert, then empty ones
        capacity = tokens * k // nt + experts
        tiles = cuda_grouped.expert_tiles(offsets, nt, capacity)
        want = [[r0, min(nt, hi - r0)] for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())
                for r0 in range(lo, hi, nt)]
        assert tiles.tolist() == want + [[0, 0]] * (capacity - len(want)), nt
    for dtype in (torch.float16, torch.bfloat16):
        h = torch.randn(tokens * k, hidden, device="cuda").to(dtype)
        for weights in (torch.rand(tokens, k, device="cuda"), torch.rand(tokens, k, device="cuda").to(dtype)):
            got = cuda_grouped.combine(h, row_of_slot, index, weights, experts)
            assert torch.equal(got, combine_reference(h, row_of_slot, index, weights, experts)), (dtype, weights.dtype)


def qwen3_experts(dtype=torch.bfloat16):
    """A random Qwen3-MoE experts module (16 experts of 256 x 128, top-4) quantized on CUDA, and its config."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = transformers.Qwen3MoeConfig(hidden_size=128, moe_intermediate_size=256, num_experts=16,
                                         num_experts_per_tok=4)
    config._experts_implementation = "eager"
    original = Qwen3MoeExperts(config).cuda().to(dtype)
    for p in original.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return NVFP4Experts.from_float(original)


def qwen3_tokens(tokens: int):
    """bf16 tokens [tokens, 128] for qwen3_experts, each routed to 4 distinct of its 16 experts
    (index [tokens, 4]), with softmax weights."""
    x = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(tokens)])
    return x, index, torch.softmax(torch.randn(tokens, 4, device="cuda"), -1).to(torch.bfloat16)


def test_a_cuda_graph_holds_the_grouped_experts():
    """The grouped path reads no count back: captured once, a graph replays new routings, equal to
    eager calls bit for bit."""
    torch.manual_seed(2)
    fp4 = qwen3_experts()
    x, index, weights = qwen3_tokens(6)
    with torch.no_grad():
        fp4(x, index, weights)  # compile and build the tables outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fp4(x, index, weights)
        for seed in range(3):
            torch.manual_seed(10 + seed)
            x.copy_(torch.randn_like(x))
            index.copy_(qwen3_tokens(6)[1])
            graph.replay()
            assert torch.equal(out, fp4(x, index, weights))


def test_the_grouped_launch_follows_the_layers_buffers():
    """The launch table holds raw pointers: a deep copy (the original freed) and a loaded state dict
    run their own weights."""
    torch.manual_seed(3)
    fp4, other = qwen3_experts(), qwen3_experts()
    x, index, weights = qwen3_tokens(5)
    with torch.no_grad():
        want, want_other = fp4(x, index, weights), other(x, index, weights)
        copied = copy.deepcopy(fp4)
        del fp4
        gc.collect()
        torch.cuda.empty_cache()
        assert torch.equal(copied(x, index, weights), want)
        copied.load_state_dict(other.state_dict())
        assert torch.equal(copied(x, index, weights), want_other)


def test_a_quantized_mixtral_generates_on_cuda_like_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).eval()
    fp4cupy.quantize_model(model, progress=False)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits
    assert isinstance(model.model.layers[0].mlp.experts, NVFP4Experts)
    assert float((gpu.cpu() - cpu).norm() / cpu.norm()) < 1e-5  # float32: the same products, another order
    model.generate(ids.cuda(), max_new_tokens=4, do_sample=False)
    out = fp4cupy.export(model, tmp_path / "out", "modelopt")  # experts held as the repack: decoded for the file
    back = fp4cupy.import_checkpoint(transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)), out)
    for name, t in model.cpu().state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name



@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens,k", [(5, 1), (100, 1), (700, 1), (300, 2)])
def test_llama4_experts_on_cuda_weight_their_inputs_as_the_dense_form(dtype, tol, tokens, k, monkeypatch):
    """A Llama 4 block's NVFP4Experts on CUDA (router weights on the experts' inputs, scaled in the
    grouped launches' row order) against transformers' dense experts on the dequantized weights in
    float32, every expert on every token scaled by its score (0 where not chosen): 5 tokens (fewer
    rows than experts), 100 (sm_90a: the grouped warpgroup kernel from 17 rows an expert), 700,
    and two experts a token. The routing is given: a router in fp16 may choose otherwise at near ties."""
    from test_llama4 import dequantized_block, tiny_llama4

    calls = grouped_calls(monkeypatch)
    model = tiny_llama4(hidden_size=512, intermediate_size=256, intermediate_size_mlp=768, num_experts_per_tok=k)
    original = copy.deepcopy(model.model.layers[0].feed_forward)
    fp4cupy.quantize_model(model, progress=False)
    experts = model.model.layers[0].feed_forward.experts
    dense = dequantized_block(original, model.model.layers[0].feed_forward).experts
    experts = experts.to(dtype).cuda()
    x = torch.randn(tokens, 512).to(dtype)
    index, weights = routing(tokens, 4, k, 7)
    weights = weights.to(dtype)
    scores = torch.zeros(tokens, 4).scatter_(1, index, weights.float())
    with torch.no_grad():
        routed_in = x.float().repeat(4, 1) * scores.t().reshape(-1, 1)
        want = dense(routed_in).reshape(4, tokens, 512).sum(0).double()
        got = experts(x.cuda(), index.cuda(), weights.cuda())
    assert got.dtype == dtype and len(calls) == 2
    assert float((got.double().cpu() - want).norm() / want.norm()) <= tol


def test_a_gpt_oss_checkpoint_runs_its_mxfp4_experts_through_the_kernel(tmp_path):
    """OpenAI's MXFP4 experts imported bit for bit, then on CUDA in bf16: each expert runs as the
    NVFP4 twin's repack (the W4A16 kernel); logits near the float32 CPU model's."""
    from test_gpt_oss import tiny_gpt_oss, write_gpt_oss

    model = tiny_gpt_oss()
    fp4cupy.quantize_model(model, "mxfp4", 32, skip=("self_attn", "lm_head", "embed"), progress=False)
    write_gpt_oss(model, tmp_path / "ckpt")
    back = fp4cupy.import_checkpoint(tiny_gpt_oss(seed=1), tmp_path / "ckpt")
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = back(ids).logits.double()
        back = back.to(torch.bfloat16).cuda()
        experts = back.model.layers[0].mlp.experts
        assert experts.up[0].codes is not None and experts.up[0].codes.is_cuda  # the repack: the kernel's path
        got = back(ids.cuda()).logits.double().cpu()
    assert float((got - want).norm() / want.norm()) < 3e-2


def test_a_cuda_graph_captures_the_grouped_path_past_its_eager_row_limit(monkeypatch):
    """While a graph captures, any number of rows an expert takes the grouped launches (the loop's
    host sync cannot be captured), and tables built before the capture serve it though other layers
    were repacked since (no upload while capturing): the replay equals the grouped path run eagerly."""
    torch.manual_seed(4)
    fp4 = qwen3_experts()
    tokens = grouped_max_rows(torch.cuda.current_device()) * 16 // 4 + 40  # past the eager grouped path's rows
    x, index, weights = qwen3_tokens(tokens)
    calls = grouped_calls(monkeypatch)
    limits = fp4_experts.GROUPED_MAX_ROWS, fp4_experts.GROUPED_MAX_ROWS_WG
    with torch.no_grad():
        assert fp4.grouped_tables(torch.bfloat16) is not None
        fp4(x, index, weights)  # eager: the loop
        assert calls == []
        monkeypatch.setattr(fp4_experts, "GROUPED_MAX_ROWS", 10**6)
        monkeypatch.setattr(fp4_experts, "GROUPED_MAX_ROWS_WG", 10**6)
        want = fp4(x, index, weights)  # the grouped path eagerly (which compiles its kernels)
        monkeypatch.setattr(fp4_experts, "GROUPED_MAX_ROWS", limits[0])
        monkeypatch.setattr(fp4_experts, "GROUPED_MAX_ROWS_WG", limits[1])
        NVFP4Linear.from_float(torch.nn.Linear(128, 64, device="cuda"))  # another layer's repack
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fp4(x, index, weights)
        graph.replay()
        assert torch.equal(out, want)
    assert len(calls) == 4  # two a grouped call: eager, the capture


def test_torch_compile_with_cuda_graphs_runs_the_grouped_experts(monkeypatch):
    """torch.compile(fullgraph=True, mode="reduce-overhead") holds NVFP4Experts as one op
    (fp4cupy::experts) whose grouped launches its CUDA graphs capture: equal to eager, bit for bit."""
    torch.manual_seed(5)
    fp4 = qwen3_experts()
    x, index, weights = qwen3_tokens(6)
    with torch.no_grad():
        want = fp4(x, index, weights).clone()
        calls = grouped_calls(monkeypatch)
        compiled = torch.compile(fp4, fullgraph=True, mode="reduce-overhead")
        for _ in range(4):
            got = compiled(x, index, weights).clone()
            assert torch.equal(got, want)
    assert len(calls) >= 2  # the op ran the grouped launches (replays call no Python)
