"""Older GPUs' paths, run on the GPU at hand through FP4CUPY_EMULATE_CC, each in a process of its
own (the runtime's caches hold one GPU's modules and plans): sm_75's (Turing) W4A16 and MoE paths
(tests/workers/turing_paths.py), the tiled kernel's tests in fp16 (test_gpu_tiled.py at 7.5: its
copies through registers), and the quantize / dequantize kernels' E4M3 encoder without the
hardware cvt (before sm_89), bit for bit against the reference (test_gpu_kernels.py at 7.5)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("torch")
WORKER = Path(__file__).parent / "workers" / "turing_paths.py"


def as_sm75(*args):
    """``python *args`` with FP4CUPY_EMULATE_CC=7.5 and the checkout on the path."""
    from fp4cupy import runtime

    if runtime.compute_capability(0) < (7, 5):
        pytest.skip("a GPU older than sm_75 cannot run sm_75 code")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), FP4CUPY_EMULATE_CC="7.5")
    r = subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout


def test_turing_runs_fp16_through_the_mma_sync_kernels_and_bf16_through_cublas():
    out = as_sm75(str(WORKER))
    assert "checks passed" in out, out[-2000:]
    print(out.strip())


def test_the_tiled_kernel_copying_through_registers_matches_float64():
    out = as_sm75("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu_tiled.py")
    assert " passed" in out and "failed" not in out and "skipped" not in out and "error" not in out, out[-2000:]
    print(out.strip().splitlines()[-1])


def test_quantize_kernels_without_the_hardware_e4m3_cvt_match_the_reference():
    out = as_sm75("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu_kernels.py")
    assert " passed" in out and "failed" not in out and "skipped" not in out, out[-2000:]
