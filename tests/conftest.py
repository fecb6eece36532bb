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
    # a fresh, reproducible stream per test
    return np.random.default_rng(abs(hash(request.node.nodeid)) % 2**32)
