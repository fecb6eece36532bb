"""benchmarks/sass_counts.py reads ptxas's log: registers, spills, and the performance advisories
(such as serialized warpgroup MMAs) matched to the kernel they name, wherever they appear."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import sass_counts  # noqa: E402

LOG = """\
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'wg_kernel'
ptxas info    : Compiling entry function 'wg_kernel' for 'sm_90a'
ptxas info    : Function properties for wg_kernel
    56 bytes stack frame, 100 bytes spill stores, 100 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers
ptxas info    : Compiling entry function 'plain' for 'sm_90a'
ptxas info    : Function properties for plain
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
"""


def test_ptxas_log_gives_registers_spills_and_advisories_per_kernel():
    info = sass_counts.ptxas_info(LOG)
    assert info["plain"] == (32, "", [])
    regs, spill, advisories = info["wg_kernel"]
    assert regs == 96 and spill.startswith("56 bytes stack frame, 100 bytes spill stores")
    assert advisories == ["(C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
                          "insufficient register resources"]
