"""Stand-ins for the GPU in the CPU tests of the launch plans (test_plans.py, test_routing.py): a
recording launcher and an H200's SM count and occupancy."""
import sys
from pathlib import Path

from fp4cupy import cuda_linear, mma_plan

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import plan_replay  # noqa: E402  (an H200's occupancy, as the driver reported it)


class Recorder:
    """A stand-in for a runtime.Launcher: records (name, grid, threads, shared, args)."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __call__(self, grid, threads, shared, stream, *args):
        self.calls.append((self.name, grid, threads, shared, stream, args))

    def after(self, grid, threads, shared, stream, *args):  # a programmatic dependent launch
        self.calls.append((self.name + "+after", grid, threads, shared, stream, args))


def fake_gpu(monkeypatch, sms):
    """plan() on a GPU of ``sms`` SMs whose occupancy is an H200's: the two-tile M <= 8 kernel two
    blocks of 8 warps a SM (four of 4), the uncapped one-tile kernel six blocks of 4 warps in fp16,
    five in bf16 (three and two of 8 warps), the capped one seven; the two-tile 9-16 token kernel
    four blocks of 8 warps (two of 16), the one-tile 9-16 and 17-32 token ones four and five of 4
    warps (two of 8)."""
    monkeypatch.setattr(cuda_linear, "_sm_count", lambda device: sms)  # uses_warpgroup_kernel
    monkeypatch.setattr(mma_plan, "_sm_count", lambda device: sms)
    monkeypatch.setattr(mma_plan.runtime, "launcher", lambda *a: None)
    monkeypatch.setattr(mma_plan, "_blocks_per_sm", plan_replay.h200_blocks_per_sm)
    mma_plan.plan.cache_clear()
