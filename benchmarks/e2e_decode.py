"""End-to-end decode: a Llama-architecture model with Llama-3-8B shapes (from a transformers
LlamaConfig, random bf16 weights, no download), batch 1, static KV cache, each decode step one CUDA
graph; bf16 nn.Linear vs NVFP4 weight-only (fp4cupy.quantize_model, every Linear incl. lm_head).

    PYTHONPATH=$PWD python3 benchmarks/e2e_decode.py [--layers 32] [--new 128] [--compile] [--fused]

The decoder is written here in plain torch (RMSNorm, RoPE, grouped-query SDPA over a static cache,
SiLU MLP) so both variants run the same code and the same graph settings; only the Linear modules differ.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4cupy  # noqa: E402
from timing import card  # noqa: E402


def llama3_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)


ROPE_THETA = 500000.0  # Llama 3


class Block(nn.Module):
    def __init__(self, c, fused: bool = False):
        super().__init__()
        h, d, inter = c.hidden_size, c.hidden_size // c.num_attention_heads, c.intermediate_size
        self.nh, self.nkv, self.d, self.inter, self.fused = c.num_attention_heads, c.num_key_value_heads, d, inter, fused
        if fused:  # q/k/v and gate/up as one matrix each, as vLLM runs them
            self.qkv_proj = nn.Linear(h, (self.nh + 2 * self.nkv) * d, bias=False)
            self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False)
        else:
            self.q_proj, self.k_proj = nn.Linear(h, self.nh * d, bias=False), nn.Linear(h, self.nkv * d, bias=False)
            self.v_proj = nn.Linear(h, self.nkv * d, bias=False)
            self.gate_proj, self.up_proj = nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False)
        self.o_proj = nn.Linear(self.nh * d, h, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.n1, self.n2 = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)

    def forward(self, x, cos, sin, k_cache, v_cache, pos, mask):
        b = x.shape[0]
        y = self.n1(x)
        if self.fused:
            q, k, v = self.qkv_proj(y).split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        else:
            q, k, v = self.q_proj(y), self.k_proj(y), self.v_proj(y)
        q = q.reshape(b, 1, self.nh, self.d).transpose(1, 2)
        k = k.reshape(b, 1, self.nkv, self.d).transpose(1, 2)
        v = v.reshape(b, 1, self.nkv, self.d).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, 1, -1))
        y = self.n2(x)
        gate, up = self.gate_up_proj(y).split(self.inter, dim=-1) if self.fused else (self.gate_proj(y), self.up_proj(y))
        return x + self.down_proj(F.silu(gate) * up)


def rope(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), -1) * sin


class Decoder(nn.Module):
    def __init__(self, c, max_len: int, fused: bool = False):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, fused) for _ in range(c.num_hidden_layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=1e-5)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        d = c.hidden_size // c.num_attention_heads
        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2).float() / d))
        ang = torch.outer(torch.arange(max_len).float(), inv)
        self.register_buffer("cos", torch.cat((ang, ang), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((ang, ang), -1).sin(), persistent=False)
        self.max_len = max_len
        self.cache_shape = (1, c.num_key_value_heads, max_len, d)

    def step(self, token, pos, caches):
        """One decode step: token [1, 1], pos [1] (device int64) -> logits [1, vocab]."""
        x = self.embed(token)
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        mask = (torch.arange(self.max_len, device=x.device) <= pos).view(1, 1, 1, -1)
        for layer, (kc, vc) in zip(self.layers, caches):
            x = layer(x, cos, sin, kc, vc, pos, mask)
        return self.lm_head(self.norm(x))[:, -1]


def linear_weight_bytes(model) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, fp4cupy.NVFP4Linear):
            total += m.weight_nbytes()
    return total


def decode(model, new_tokens: int, prompt_len: int = 16, compile_step: bool = False):
    """Greedy decode of ``new_tokens`` after ``prompt_len`` teacher-forced tokens; each step replays
    one CUDA graph. Returns (tokens/s over the generated tokens, the tokens)."""
    dev = "cuda"
    caches = [(torch.zeros(model.cache_shape, device=dev, dtype=torch.bfloat16),
               torch.zeros(model.cache_shape, device=dev, dtype=torch.bfloat16)) for _ in model.layers]
    token = torch.zeros(1, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    step = torch.compile(model.step, fullgraph=True, dynamic=False) if compile_step else model.step
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step(token, pos, caches)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(token, pos, caches)
        prompt = torch.arange(1, prompt_len + 1, device=dev)
        for i in range(prompt_len):
            token.fill_(int(prompt[i])), pos.fill_(i)
            graph.replay()
        out = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(new_tokens):
            token.copy_(logits.argmax(-1).view(1, 1))
            pos.fill_(prompt_len + i)
            graph.replay()
            out.append(token.clone())
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return new_tokens / dt, torch.cat(out).view(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="torch.compile each step (both variants) before capture")
    ap.add_argument("--fused", action="store_true", help="q/k/v and gate/up as one Linear each (both variants), as in vLLM")
    args = ap.parse_args()
    cfg = llama3_8b_config(args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = Decoder(cfg, max_len=args.new + 32, fused=args.fused)
        torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.ones_(p)
    model.eval()
    bf16_bytes = linear_weight_bytes(model)
    tps_bf16, toks_bf16 = decode(model, args.new, compile_step=args.compile)
    t0 = time.perf_counter()
    report = fp4cupy.quantize_model(model, skip=(), progress=False)
    qtime = time.perf_counter() - t0
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    tps_fp4, toks_fp4 = decode(model, args.new, compile_step=args.compile)
    fp4_bytes = linear_weight_bytes(model)
    same = float((toks_bf16 == toks_fp4).float().mean())
    print(f"\n## benchmarks/e2e_decode.py on {card()} (torch {torch.__version__}, fp4cupy {fp4cupy.version()})\n")
    print(f"Llama-3-8B shapes, {args.layers} layers, random bf16 weights, batch 1, {args.new} new tokens, "
          f"static KV cache, one CUDA graph per step{', torch.compile(fullgraph=True) inside' if args.compile else ''}"
          f"{', q/k/v and gate/up fused as in vLLM' if args.fused else ''} (same code and settings for both).\n")
    print("| weights | tokens/s | speed-up | linear weight bytes on the GPU | vs bf16 |")
    print("|---|---|---|---|---|")
    print(f"| bf16 nn.Linear | {tps_bf16:.1f} | 1.00x | {bf16_bytes / 2**30:.2f} GiB | 1.00 |")
    print(f"| NVFP4 (fp4cupy) | {tps_fp4:.1f} | {tps_fp4 / tps_bf16:.2f}x | {fp4_bytes / 2**30:.2f} GiB "
          f"(the W4A16 repack only) | {fp4_bytes / bf16_bytes:.3f} |")
    print(f"\nquantize_model: {qtime:.1f} s for {len(report)} layers; greedy tokens equal to bf16's: {same:.0%} "
          f"(random weights: near-ties flip easily)")
    print(f"worst per-layer relative weight error {max(e['rel_error'] for e in report):.4f}; "
          f"ln tokens/s ratio {math.log(tps_fp4 / tps_bf16):.3f}")


if __name__ == "__main__":
    main()
