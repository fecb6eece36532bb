"""fp4cupy's kernels under compute-sanitizer (memcheck, racecheck, synccheck, initcheck), where the
CUDA toolkit's compute-sanitizer is installed (run on a GPU: pytest -m gpu). torch's caching
allocator is off in the worker: inside its pooled segments an out-of-bounds read goes unseen (a
launch told twice the weight's rows: 0 errors with the cache, 364 without)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("torch")
WORKER = Path(__file__).parent / "workers" / "sanitize_kernels.py"
SANITIZER = shutil.which("compute-sanitizer") or next(
    (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)


@pytest.mark.skipif(SANITIZER is None, reason="compute-sanitizer (CUDA toolkit) is not installed")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_kernels_under_compute_sanitizer(tool):
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    r = subprocess.run([SANITIZER, "--tool", tool, "--error-exitcode", "3", sys.executable, str(WORKER)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "ERROR SUMMARY: 0 errors" in r.stdout or "0 hazards displayed (0 errors" in r.stdout, r.stdout[-2000:]
