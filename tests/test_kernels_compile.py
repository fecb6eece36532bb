"""Every kernel source (the package's, a test's and the benchmarks') compiles for every target fp4cupy
claims, with no GPU (NVRTC and headers from the [cuda12] / [cuda13] extras' wheels). CI runs it with
NVRTC 12 and NVRTC 13."""
import os
import struct
from pathlib import Path

import pytest

from fp4cupy import runtime

if not os.environ.get("CI"):
    pytest.importorskip("cupy", reason="compiling needs CuPy's NVRTC: pip install 'fp4cupy[cuda12]'")

SOURCES = (sorted(p.name for p in runtime.KERNEL_DIR.glob("*.cu"))
           + [str(Path(__file__).parent / "kernels" / "fp4_api_check.cu")]
           + sorted(str(p) for p in (Path(__file__).parents[1] / "benchmarks").glob("*.cu")))


def cubin_target(cubin: bytes) -> str:
    """'sm_90a'-style name from a cubin's ELF header. e_flags (at 0x30) hold the SM number: bits 0-7
    in the old ELF ABI (51), bits 8-15 in the newer one. The arch-specific 'a' is flag 0x800 (old
    ABI), flag 0x8 (CUDA 12, newer ABI), or attribute 9 = 1 of the .nv.compat section (CUDA 13)."""
    assert cubin[:4] == b"\x7fELF"
    flags = struct.unpack_from("<I", cubin, 0x30)[0]
    if cubin[7] == 51:
        return f"sm_{flags & 0xFF}" + ("a" if flags & 0x800 else "")
    specific = bool(flags & 0x8) or _compat_attributes(cubin).get(9) == 1
    return f"sm_{(flags >> 8) & 0xFF}" + ("a" if specific else "")


def _compat_attributes(cubin: bytes) -> dict:
    """{attribute: value} of the .nv.compat section: records of (format, attribute, value), where
    format 4 carries a 16-bit size and that many bytes, the others one 16-bit value."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    strtab = headers[names][4]
    for name, _type, _flags, _addr, offset, size in headers:
        if cubin[strtab + name : cubin.index(b"\0", strtab + name)] == b".nv.compat":
            section, attrs, pos = cubin[offset : offset + size], {}, 0
            while pos + 4 <= len(section):
                fmt, attr, value = section[pos], section[pos + 1], struct.unpack_from("<H", section, pos + 2)[0]
                attrs[attr] = section[pos + 4 : pos + 4 + value] if fmt == 4 else value
                pos += 4 + (value if fmt == 4 else 0)
            return attrs
    return {}


@pytest.mark.parametrize("target", runtime.CI_TARGETS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: Path(s).name)
def test_compiles_for_target(source, target, tmp_path, monkeypatch):
    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    cubin = runtime.compile_source(source, target)
    assert cubin_target(cubin) == target


def test_arch_table_targets():
    assert runtime.target_for((9, 0)) == "sm_90a"
    assert runtime.target_for((8, 6)) == "sm_86"
    assert runtime.target_for((12, 0)) == "sm_120a"
    assert set(runtime.ARCH_TABLE.values()) >= {"sm_75", "sm_90a", "sm_100a", "sm_121a"}


def test_compile_error_carries_log_options_and_numbered_source(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "bad.cu"
    bad.write_text('#include <fp4.cuh>\nextern "C" __global__ void k() { undefined_thing(); }\n')
    with pytest.raises(runtime.CompileError) as e:
        runtime.compile_source(str(bad), "sm_80")
    msg = str(e.value)
    assert "undefined_thing" in msg and "-arch=sm_80" in msg and "    2 extern" in msg


def test_cache_is_reused_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    src = tmp_path / "k.cu"
    src.write_text('extern "C" __global__ void k(float* x) { x[0] = 1.0f; }\n')
    runtime.compile_source(str(src), "sm_80")
    assert len(list(tmp_path.glob("k-sm_80-*.bin"))) == 1
    runtime.compile_source(str(src), "sm_80")
    assert len(list(tmp_path.glob("k-sm_80-*.bin"))) == 1
    src.write_text('extern "C" __global__ void k(float* x) { x[0] = 2.0f; }\n')
    runtime.compile_source(str(src), "sm_80")
    assert len(list(tmp_path.glob("k-sm_80-*.bin"))) == 2


def test_every_quantize_kernel_the_host_names_is_in_the_module(tmp_path, monkeypatch):
    from fp4cupy import cuda_ops
    from fp4cupy.formats import FORMATS

    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    cubin = runtime.compile_source("quantize.cu", "sm_80")
    names = [cuda_ops.quantize_kernel_name(f, gs, mode, suffix) for f in FORMATS.values() for gs in f.group_sizes
             for mode in f.scale_modes for suffix in cuda_ops._DTYPE_SUFFIX.values()]
    names += [f"fp4_amax_{suffix}" for suffix in cuda_ops._DTYPE_SUFFIX.values()]
    assert len(names) == 24  # 4 NVFP4 groups + 3 MXFP4 modes, x 3 dtypes, + 3 amax
    missing = [n for n in names if n.encode() + b"\0" not in cubin]
    assert not missing, missing


def test_every_warpgroup_kernel_the_host_names_is_in_the_module(tmp_path, monkeypatch):
    from fp4cupy import cuda_wgmma

    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    cubin = runtime.compile_source("w4a16_wgmma.cu", "sm_90a")
    names = [cuda_wgmma.wg_kernel_name(nt, bf16, loop) for nt in cuda_wgmma.WG_TOKEN_TILES
             for bf16 in (False, True) for loop in cuda_wgmma.WG_LOOPS]
    assert len(names) == 6 * len(cuda_wgmma.WG_TOKEN_TILES) and len(set(names)) == len(names)
    missing = [n for n in names + ["w4a16_wg_xprep"] if n.encode() + b"\0" not in cubin]
    assert not missing, missing


def test_every_mma_sync_kernel_the_host_names_is_in_the_module(tmp_path, monkeypatch):
    from fp4cupy import mma_plan

    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    cubin = runtime.compile_source("w4a16.cu", "sm_90a")
    names = [mma_plan.kernel_name(*v, bf16) for v in mma_plan.VARIANTS for bf16 in (False, True)]
    names += [mma_plan.kernel_name(*v, bf16, s) for v in mma_plan.SPLIT_VARIANTS.values()
              for s in mma_plan.SPLITS for bf16 in (False, True)]
    assert len(set(names)) == len(names) == 2 * (len(mma_plan.VARIANTS) + len(mma_plan.SPLIT_VARIANTS) * len(mma_plan.SPLITS))
    missing = [n for n in names if n.encode() + b"\0" not in cubin]
    assert not missing, missing


def test_every_tiled_kernel_the_host_names_is_in_the_module(tmp_path, monkeypatch):
    from fp4cupy import cuda_tiled

    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    cubin = runtime.compile_source("w4a16_tiled.cu", "sm_80")
    names = [name(bf16) for name in (cuda_tiled.kernel_name, cuda_tiled.finish_kernel_name) for bf16 in (False, True)]
    missing = [n for n in names if n.encode() + b"\0" not in cubin]
    assert len(set(names)) == 4 and not missing, missing


def _ptx_entries(ptx: str) -> dict[str, str]:
    """{kernel name: its PTX body} of a PTX module."""
    parts = ptx.split(".entry ")[1:]
    return {part.split("(", 1)[0].strip(): part for part in parts}


def test_turing_builds_of_the_mma_sync_kernels_run_fp16_as_m16n8k8_and_trap_on_bf16(tmp_path, monkeypatch):
    """sm_75 has mma.sync m16n8k8 but neither m16n8k16 nor bf16 MMAs: plan()'s fp16 kernels (the
    ones cuda_linear runs there) split each MMA in two and have no trap; the bf16 ones only trap."""
    from fp4cupy import mma_plan

    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    entries = _ptx_entries(runtime.compile_source("w4a16.cu", "compute_75").rstrip(b"\0").decode())
    for variant in mma_plan.VARIANTS:
        f16, bf16 = (entries[mma_plan.kernel_name(*variant, b)] for b in (False, True))
        assert "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32" in f16 and "m16n8k16" not in f16, variant
        assert "trap;" not in f16 and "trap;" in bf16 and "mma.sync" not in bf16, variant
    sm80 = _ptx_entries(runtime.compile_source("w4a16.cu", "compute_80").rstrip(b"\0").decode())
    assert "m16n8k8" not in sm80["w4a16_rt2_nt2_u1_f16"] and "m16n8k16" in sm80["w4a16_rt2_nt2_u1_bf16"]


def test_turing_builds_of_the_tiled_kernels_copy_through_registers(tmp_path, monkeypatch):
    """w4a16_tiled.cu on sm_75 (no cp.async): its fp16 kernels stage each chunk through registers
    (plain loads, then 16-byte shared stores), MMAs as m16n8k8, no trap; the bf16 ones only trap;
    compute_80 keeps cp.async and m16n8k16."""
    monkeypatch.setenv("FP4CUPY_CACHE_DIR", str(tmp_path))
    sm75 = _ptx_entries(runtime.compile_source("w4a16_tiled.cu", "compute_75").rstrip(b"\0").decode())
    sm80 = _ptx_entries(runtime.compile_source("w4a16_tiled.cu", "compute_80").rstrip(b"\0").decode())
    for name in ("w4a16_tiled", "w4a16_tiled_grouped"):
        f16, bf16 = sm75[name + "_f16"], sm75[name + "_bf16"]
        assert "m16n8k8" in f16 and "st.shared.v4" in f16 and "cp.async" not in f16 and "trap;" not in f16, name
        assert "trap;" in bf16 and "mma.sync" not in bf16, name
        assert "cp.async.cg" in sm80[name + "_f16"] and "m16n8k16" in sm80[name + "_f16"], name


def test_emulated_compute_capability_lowers_the_gpus_own_and_compiles_ptx(monkeypatch):
    """FP4CUPY_EMULATE_CC: the compute capability fp4cupy plans for, when below the GPU's, and PTX
    of it for the driver to finish; not above it; a malformed value is an error that says what to give."""
    monkeypatch.setattr(runtime, "_real_cc", lambda device=None: (9, 0))
    monkeypatch.setattr(runtime, "nvrtc_targets", lambda: (75, 80, 86, 89, 90, 100, 120))
    for value, cc, target in [("7.5", (7, 5), "compute_75"), ("8.9", (8, 9), "compute_89"),
                              ("9.0", (9, 0), "sm_90a"), ("12.0", (9, 0), "sm_90a"), ("", (9, 0), "sm_90a")]:
        monkeypatch.setenv("FP4CUPY_EMULATE_CC", value)
        runtime.emulated_cc.cache_clear()
        assert (runtime.compute_capability(0), runtime.module_target(0)) == (cc, target), value
    for bad in ("75", "sm_75", "7.x", "7.50"):
        monkeypatch.setenv("FP4CUPY_EMULATE_CC", bad)
        runtime.emulated_cc.cache_clear()
        with pytest.raises(ValueError, match="such as 7.5"):
            runtime.compute_capability(0)
    monkeypatch.delenv("FP4CUPY_EMULATE_CC")
    runtime.emulated_cc.cache_clear()
