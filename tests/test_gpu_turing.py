"""sm_75 (Turing) paths, run on the GPU at hand through FP4CUPY_EMULATE_CC=7.5 (tests/workers/
turing_paths.py, in a process of its own: the runtime's caches hold one GPU's modules and plans)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("torch")
WORKER = Path(__file__).parent / "workers" / "turing_paths.py"


def test_turing_runs_fp16_through_the_mma_sync_kernels_and_bf16_through_cublas():
    from fp4cupy import runtime

    if runtime.compute_capability(0) < (7, 5):
        pytest.skip("a GPU older than sm_75 cannot run sm_75 code")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), FP4CUPY_EMULATE_CC="7.5")
    r = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "checks passed" in r.stdout, r.stdout[-2000:]
    print(r.stdout.strip())
