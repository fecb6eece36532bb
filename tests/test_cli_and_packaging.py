"""The command line, the wheel's contents, and the README's commands."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fp4cupy import cli

ROOT = Path(__file__).resolve().parent.parent


def test_demo_prints_table(capsys):
    rows = cli.demo("cpu", ((256, 512), (128, 1024)))
    out = capsys.readouterr().out
    assert "CPU reference" in out and "256x512" in out and "SQNR dB" in out
    assert all(abs(r["fp16_bytes"] / r["fp4_bytes"] - 3.55) < 0.05 for r in rows)
    assert all(0.05 < r["rel_err"] < 0.12 and 18 < r["sqnr_db"] < 23 for r in rows)


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fp4cupy.cli", "demo", "--device", "cpu", "--shape", "64x128"],
                         capture_output=True, text=True, check=True).stdout
    assert "64x128" in out
    bad = subprocess.run([sys.executable, "-m", "fp4cupy.cli", "demo", "--shape", "64by128"], capture_output=True, text=True)
    assert bad.returncode == 2 and "shape must look like" in bad.stderr


@pytest.mark.parametrize("cc,target,want", [
    (None, "", "CPU reference"), ((7, 0), "sm_70", "dequantize + cuBLAS (the W4A16 kernels need sm_75)"),
    ((7, 5), "sm_75", "fp16 x: mma.sync 1-32 tokens, tiled mma.sync 33-128 (from 65 on weights of <= 4 Mi values), "
                      "dequantize + cuBLAS above 128 (each MMA as two m16n8k8); bf16 x: dequantize + cuBLAS (no bf16 "
                      "MMA before sm_80)"),
    ((8, 9), "sm_89", "mma.sync 1-32 tokens, tiled mma.sync 33-128 (from 65 on weights of <= 4 Mi values), "
                      "dequantize + cuBLAS above 128"),
    ((9, 0), "sm_90a", "mma.sync 1-32 tokens, warpgroup-MMA 33-128 on weights of > 8 Mi values (from 17 on large "
                       "weights), else tiled mma.sync 33-128 (from 65 on weights of <= 4 Mi values); 129-256 in "
                       "slices of warpgroup-MMA on weights of > 32 Mi values, else dequantize + cuBLAS above 128"),
    ((12, 0), "sm_120a", "tiled mma.sync 33-128")])
def test_info_says_which_kernels_linear_runs(cc, target, want, capsys, monkeypatch):
    from fp4cupy import cuda_linear, runtime

    assert want in cuda_linear.w4a16_paths(cc, target)
    monkeypatch.setattr(runtime, "compute_capability", lambda device=None: cc)
    monkeypatch.setattr(runtime, "target_for", lambda c: target)
    assert cli.main(["info"]) in (0, None)
    assert f"linear (W4A16): {cuda_linear.w4a16_paths(cc, target)}" in capsys.readouterr().out


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    assert "fp4cupy demo" in blocks[0]
    test_cmd = blocks[1].strip().splitlines()[-1]
    assert test_cmd.startswith("python -m pytest") and test_cmd in ci


@pytest.mark.slow
def test_wheel_ships_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True)
    (whl,) = tmp_path.glob("fp4cupy-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    kernels = sorted(f"fp4cupy/kernels_cu/{p.name}" for p in (ROOT / "kernels_cu").iterdir() if p.suffix in (".cu", ".cuh"))
    assert "fp4cupy/kernels_cu/hopper.cuh" in kernels  # every source and header the runtime compiles
    for f in (*kernels, "fp4cupy/reference.py", "fp4cupy/runtime.py"):
        assert f in names, f"{f} missing from the wheel"
