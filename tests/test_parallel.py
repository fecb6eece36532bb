"""Tensor-parallel layers: shard helpers here, the layers across two processes (torchrun, gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fp4cupy  # noqa: E402
from fp4cupy.parallel import shard_k, shard_rows  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "tp_check.py"


def test_shards_rebuild_the_tensor():
    t = fp4cupy.quantize(torch.randn(32, 128))
    rows = [shard_rows(t, 4, i) for i in range(4)]
    cols = [shard_k(t, 2, i) for i in range(2)]
    assert all(r.global_scale == t.global_scale for r in rows + cols)
    np.testing.assert_array_equal(torch.cat([r.dequantize() for r in rows]).numpy(), t.dequantize().numpy())
    np.testing.assert_array_equal(torch.cat([c.dequantize() for c in cols], 1).numpy(), t.dequantize().numpy())
    with pytest.raises(ValueError, match="output rows"):
        shard_rows(t, 3, 0)
    with pytest.raises(ValueError, match="multiple of group_size=16"):
        shard_k(t, 16, 0)


def _torchrun(*args):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_gloo():
    r = _torchrun()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(": ok") == 2, r.stdout


@pytest.mark.gpu
def test_two_processes_on_one_gpu():
    """The sharded layers' CUDA path (W4A16 kernel, fp16), collectives through gloo."""
    r = _torchrun("--one-gpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.gpu
def test_two_gpu_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (NCCL)")
    r = _torchrun("--cuda")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
