import zlib

import numpy as np
import pytest


def _has_gpu() -> bool:
    from fp4cupy import runtime

    return runtime.device_count() > 0


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with the device tool: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    # a fresh stream per test, the same in every run (str hash() is salted per process)
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poison(monkeypatch):
    """Every buffer fp4cupy allocates on the GPU starts as 0xAB bytes (0-d ones as NaN), so an
    element a kernel fails to write shows up: those of cuda_ops._Lib and the y of the host-lean
    torch path (cuda_linear._new_output)."""
    from fp4cupy import cuda_linear, cuda_ops

    real = cuda_ops._Lib.empty

    def poisoned(self, shape, dtype):
        out = real(self, shape, dtype)
        if out.ndim == 0:
            out.fill_(float("nan")) if self.torch else out.fill(np.nan)
        elif self.torch:
            out.view(self.mod.uint8).fill_(0xAB)
        else:
            out.view(np.uint8).fill(0xAB)
        return out

    monkeypatch.setattr(cuda_ops._Lib, "empty", poisoned)
    real_output = cuda_linear._new_output

    def poisoned_output(x, lead, n):  # the host-lean torch path's y
        import torch

        y = real_output(x, lead, n)
        y.view(torch.uint8).fill_(0xAB)
        return y

    monkeypatch.setattr(cuda_linear, "_new_output", poisoned_output)
