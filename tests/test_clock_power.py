"""benchmarks/clock_power.py's reading of nvidia-smi's samples (no GPU needed)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import clock_power  # noqa: E402


def test_summarizes_the_settled_samples():
    lines = ["1980, 300.5, 0x0000000000000000", "1650, 695.1, 0x0000000000000004",
             "1600, 699.0, 0x0000000000000004", "1700, 690.2, 0x0000000000000004", ""]
    # the first third (the clock before the load) is left out
    assert clock_power.summarize(lines) == (1650.0, 1600.0, 695.1, ["0x0000000000000004"])


def test_no_samples_is_an_error():
    with pytest.raises(RuntimeError, match="no samples"):
        clock_power.summarize(["", " "])


def test_energy_of_a_call():
    # 37.3 us at 694 W is 25.9 mJ
    assert clock_power.energy_mj(37.3, 694.0) == pytest.approx(25.886, abs=1e-3)
    assert clock_power.settled(list(range(9))) == [3, 4, 5, 6, 7, 8]
