"""MoE experts as FP4 layers on CUDA (run on a GPU: pytest -m gpu): each expert's projections run
the W4A16 kernel; the block against the transformers module on the dequantized weights."""
import copy

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import fp4cupy  # noqa: E402
from fp4cupy.experts import NVFP4Experts  # noqa: E402
from test_experts import TINY, dequantized_copy, routing  # noqa: E402

SIZES = dict(TINY, hidden_size=512, intermediate_size=768, num_local_experts=8)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_experts_on_cuda_match_the_original_on_dequantized_weights(kind, dtype, tol):
    """fp16/bf16 tokens through the W4A16 kernel (the up and down projections each round to the
    dtype) against the float32 module on deq(W); 40 tokens, so experts get 0 to ~20 each."""
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
    x = torch.randn(40, 512, device="cuda")
    index, weights = (t.cuda() for t in routing(40, 8, 2, 2, unused=(5,)))
    with torch.no_grad():
        want = ref(x.to(dtype).float(), index, weights).double()
        got = fp4(x.to(dtype), index, weights.to(dtype))
    assert got.dtype == dtype and got.is_cuda
    assert float((got.double() - want).norm() / want.norm()) <= tol


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
