"""The ``fp4cupy`` command: ``fp4cupy demo`` quantizes Llama-shaped matrices and prints a table."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

# Llama-3-8B projection shapes [N, K]: q/o, k/v, gate/up, down.
LLAMA_SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))


def _sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    noise = float(np.sum((x - y) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(x**2)) / noise)


def demo(device: str = "auto", shapes=LLAMA_SHAPES, fmt: str = "nvfp4", seed: int = 0) -> list[dict]:
    """Quantize random bf16-like weights of each shape; return and print one row per shape."""
    import fp4cupy
    from fp4cupy import arrays, runtime

    use_gpu = device == "gpu" or (device == "auto" and runtime.device_count() > 0)
    if device == "gpu" and runtime.device_count() == 0:
        raise SystemExit("fp4cupy demo: --device gpu asked for, but no CUDA GPU / CuPy was found")
    rng = np.random.default_rng(seed)
    where = f"GPU {runtime.compute_capability()}" if use_gpu else "CPU reference (numpy)"
    print(f"fp4cupy {fp4cupy.version()} demo: {fmt} on {where}")
    head = f"{'shape':>14} {'fp16 MiB':>9} {'fp4 MiB':>8} {'ratio':>6} {'rel err':>8} {'SQNR dB':>8} {'quant ms':>9}"
    print(head)
    print("-" * len(head))
    rows = []
    for n, k in shapes:
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float32)
        x = arrays.numpy_to(w, "cupy", "cuda:0") if use_gpu else w
        fp4cupy.quantize(x, fmt)  # warm-up (compiles kernels on first GPU use)
        _sync(use_gpu)
        t0 = time.perf_counter()
        t = fp4cupy.quantize(x, fmt)
        _sync(use_gpu)
        ms = (time.perf_counter() - t0) * 1e3
        back = arrays.to_numpy(t.dequantize())
        rel = float(np.linalg.norm(back - w) / np.linalg.norm(w))
        row = dict(shape=(n, k), fp16_bytes=2 * n * k, fp4_bytes=t.nbytes, rel_err=rel, sqnr_db=_sqnr_db(w, back), ms=ms)
        rows.append(row)
        print(f"{f'{n}x{k}':>14} {row['fp16_bytes'] / 2**20:9.1f} {t.nbytes / 2**20:8.2f} "
              f"{row['fp16_bytes'] / t.nbytes:6.2f} {rel:8.4f} {row['sqnr_db']:8.2f} {ms:9.2f}")
    return rows


def _sync(use_gpu: bool):
    if use_gpu:
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def _parse_shape(s: str):
    try:
        n, k = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096; got {s!r}") from None
    return n, k


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fp4cupy", description="NVFP4 / MXFP4 for every NVIDIA GPU and the CPU")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize Llama-shaped matrices and print size, error and time")
    d.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    d.add_argument("--fmt", choices=("nvfp4", "mxfp4"), default="nvfp4")
    d.add_argument("--shape", type=_parse_shape, action="append", help="NxK, repeatable (default: Llama-3-8B shapes)")
    sub.add_parser("info", help="print version, GPU, target and kernel cache")
    q = sub.add_parser("quantize", help="quantize a Hugging Face checkpoint directory into another")
    q.add_argument("src", help="a transformers model directory (config.json + weights)")
    q.add_argument("out", help="the directory to write")
    q.add_argument("--export", choices=("modelopt", "compressed-tensors", "nvfp4", "gpt-oss"), default="nvfp4")
    q.add_argument("--fmt", choices=("nvfp4", "mxfp4"), default="nvfp4")
    q.add_argument("--group-size", type=int, default=None, help="default: 16 for nvfp4, 32 for mxfp4")
    q.add_argument("--scale-mode", choices=("floor", "rceil", "round"), default=None,
                   help="MXFP4's block-scale rule (default floor, the OCP one; round: compressed-tensors')")
    q.add_argument("--skip", action="append", default=None, help="layer name or glob to keep in float (repeatable; "
                   "default: lm_head)")
    q.add_argument("--device", default="cpu", help="where to quantize ('cpu', 'cuda', 'cuda:N'; the float model stays "
                   "in CPU memory, a weight at a time goes to the GPU)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.device, tuple(args.shape) if args.shape else LLAMA_SHAPES, args.fmt)
    elif args.command == "quantize":
        return quantize_checkpoint(args.src, args.out, args.export, args.group_size, args.skip or ["lm_head"], args.device,
                                   args.fmt, args.scale_mode)
    else:
        _info()
    return 0


def quantize_checkpoint(src, out, export_format, group_size, skip, device="cpu", fmt="nvfp4", scale_mode=None) -> int:
    """``fp4cupy quantize``: load ``src`` whole into CPU memory, quantize its Linear layers and MoE
    experts on ``device`` a weight at a time, export; 2 on bad input (or a model whose experts no
    checkpoint format here holds)."""
    from pathlib import Path

    if not (Path(src) / "config.json").is_file():
        print(f"fp4cupy quantize: {src} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        import transformers

        import fp4cupy

        group_size = group_size or fp4cupy.get_format(fmt).default_group
        model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
        report = fp4cupy.quantize_model(model, fmt, group_size=group_size, skip=tuple(skip), scale_mode=scale_mode,
                                        device=device)
        fp4cupy.export(model, out, format=export_format, source_dir=src)
    except (OSError, ValueError, ImportError, NotImplementedError) as e:
        print(f"fp4cupy quantize: {e}", file=sys.stderr)
        return 2
    print(f"{report}; wrote {export_format} checkpoint to {out}")
    return 0


def _info():
    import fp4cupy
    from fp4cupy import runtime

    from fp4cupy.cuda_linear import w4a16_paths

    cc = runtime.compute_capability()
    target = runtime.module_target() if cc else ""
    print(f"fp4cupy {fp4cupy.version()}")
    print(f"GPU compute capability: {cc}" + (f", target {target}" if cc else " (none: CPU reference)"))
    print(f"FP4 hardware: {fp4cupy.has_hardware_acceleration()}")
    print(f"linear (W4A16): {w4a16_paths(cc, target)}")
    print(f"kernels: {runtime.KERNEL_DIR}\ncache:   {runtime.cache_dir()}")


if __name__ == "__main__":
    sys.exit(main())
