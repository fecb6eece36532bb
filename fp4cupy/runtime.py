"""The one place that turns ``kernels_cu/*.cu`` into loaded GPU modules.

- Compile on first use (never at import) with NVRTC through CuPy's low-level binding, for the
  target in ``ARCH_TABLE`` (e.g. sm_90a on an H100), capped at what the installed NVRTC knows.
- Cubins are cached on disk in ``$FP4CUPY_CACHE_DIR`` (default ``~/.cache/fp4cupy``), keyed by
  package version, target, options, NVRTC version and the text of every kernel source, so an
  upgrade or an edit recompiles. Loaded modules are memoized per (source, device).
- No ``-ftz``: decode tricks rely on IEEE subnormals, and the reference's fp32 division is IEEE.
- A failed compile raises ``CompileError`` carrying the NVRTC log, the options and the numbered source.
- ``FP4CUPY_EMULATE_CC=7.5`` (any compute capability below the GPU's) runs an older GPU's paths on
  a newer one: fp4cupy plans for that compute capability and compiles PTX for it (``compute_75``),
  which the driver finishes for the GPU at hand. For tests of the paths of GPUs not at hand.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import struct
import tempfile
import threading
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Installed wheel: fp4cupy/kernels_cu; source checkout: ../kernels_cu.
KERNEL_DIR = _HERE / "kernels_cu" if (_HERE / "kernels_cu").is_dir() else _HERE.parent / "kernels_cu"

# compute capability -> NVRTC target. Arch-specific ("a") targets where fp4cupy uses their features:
# wgmma on sm_90a, the FP4 cvt / tensor cores on Blackwell.
ARCH_TABLE = {
    (7, 5): "sm_75", (8, 0): "sm_80", (8, 6): "sm_86", (8, 7): "sm_87", (8, 9): "sm_89",
    (9, 0): "sm_90a", (10, 0): "sm_100a", (10, 3): "sm_103a", (12, 0): "sm_120a", (12, 1): "sm_121a",
}
FP4_HARDWARE_TARGETS = {"sm_100a", "sm_103a", "sm_120a", "sm_121a"}
# Every target CI compiles every kernel for.
CI_TARGETS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100a", "sm_120a", "sm_121a")
BASE_OPTIONS = ("-std=c++17", "-default-device")


class CompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds the log, the options and the source."""


# ----------------------------------------------------------------------------- devices
def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@functools.lru_cache(maxsize=None)
def device_count() -> int:
    cp = _cupy()
    if cp is None:
        return 0
    try:
        return cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver / no device: treat as CPU-only
        return 0


def compute_capability(device: int | None = None):
    """(major, minor) of ``device`` (default: current), or None without a GPU; the emulated one
    where ``FP4CUPY_EMULATE_CC`` names a lower one."""
    real = _real_cc(device)
    return emulated_cc() if _emulating(real) else real


def _real_cc(device: int | None):
    if device_count() == 0:
        return None
    cp = _cupy()
    cc = (cp.cuda.Device(device) if device is not None else cp.cuda.Device()).compute_capability
    return int(cc[:-1]), int(cc[-1])


def _emulating(real) -> bool:
    emulated = emulated_cc()
    return real is not None and emulated is not None and emulated < real


@functools.lru_cache(maxsize=None)
def emulated_cc() -> tuple[int, int] | None:
    """The compute capability ``FP4CUPY_EMULATE_CC`` names ("7.5", "8.9"), or None when unset."""
    text = os.environ.get("FP4CUPY_EMULATE_CC", "").strip()
    if not text:
        return None
    major, dot, minor = text.partition(".")
    if not (dot and major.isdigit() and minor.isdigit() and len(minor) == 1):
        raise ValueError(f"FP4CUPY_EMULATE_CC={text!r}: give a compute capability such as 7.5 or 8.9")
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def nvrtc_targets() -> tuple[int, ...]:
    from cupy.cuda import nvrtc

    return tuple(nvrtc.getSupportedArchs())


def target_for(cc: tuple[int, int]) -> str:
    """NVRTC target for a compute capability: the table's entry, else plain sm_XY; capped at the
    newest target the installed NVRTC supports (then PTX for the driver to finish)."""
    target = ARCH_TABLE.get(tuple(cc), f"sm_{cc[0]}{cc[1]}")
    num = int(target[3:].rstrip("af"))
    supported = nvrtc_targets()
    if num not in supported:
        return f"compute_{max(a for a in supported if a <= num)}"
    return target


def module_target(device: int | None = None) -> str:
    """The target ``load`` compiles for on ``device``: ``target_for`` its compute capability, or
    PTX of the emulated one (``FP4CUPY_EMULATE_CC``), which the driver finishes for the GPU."""
    real = _real_cc(device)
    if not _emulating(real):
        return target_for(real)
    return "compute_" + target_for(emulated_cc())[3:].rstrip("af")


def has_fp4_hardware(device: int | None = None) -> bool:
    cc = compute_capability(device)
    return cc is not None and target_for(cc) in FP4_HARDWARE_TARGETS


# ----------------------------------------------------------------------------- compiling
@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> str | None:
    """Folder with cuda_fp16.h / cuda_bf16.h (from the nvidia-cuda-runtime wheel or a CUDA toolkit)."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            return str(found)
    except Exception:  # noqa: BLE001 - fall back to the usual places
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "include", "cuda_fp16.h").is_file():
            return str(Path(root, "include"))
    return None


def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(KERNEL_DIR.glob("*.cu*")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def options_for(target: str, extra=()) -> tuple[str, ...]:
    from . import __version__

    inc = cuda_include_dir()
    opts = BASE_OPTIONS + (f"-arch={target}", f"-I{KERNEL_DIR}", f"-DFP4CUPY_VERSION=\"{__version__}\"")
    return opts + ((f"-I{inc}",) if inc else ()) + tuple(extra)


def cache_dir() -> Path:
    return Path(os.environ.get("FP4CUPY_CACHE_DIR") or Path.home() / ".cache" / "fp4cupy")


def compile_source(filename, target: str, extra_options=()) -> bytes:
    """Compile ``kernels_cu/<filename>`` (or a .cu file at an absolute path) for ``target`` with no GPU
    needed; cubin (sm_*) or PTX (compute_*). Results are cached on disk; CompileError on failure."""
    from cupy.cuda import nvrtc

    path = Path(filename) if Path(filename).is_absolute() else KERNEL_DIR / filename
    src, filename = path.read_text(), path.name
    opts = options_for(target, extra_options)
    key = hashlib.sha256("\0".join((*opts, str(nvrtc.getVersion()), _sources_digest(), src)).encode())
    cached = cache_dir() / f"{Path(filename).stem}-{target}-{key.hexdigest()[:24]}.bin"
    if cached.is_file():
        return cached.read_bytes()
    prog = nvrtc.createProgram(src, filename, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(opts))
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            numbered = "\n".join(f"{i + 1:5d} {line}" for i, line in enumerate(src.splitlines()))
            raise CompileError(
                f"NVRTC failed to compile {filename} for {target}: {e}\n--- log ---\n{log}\n"
                f"--- options ---\n{' '.join(opts)}\n--- source ---\n{numbered}"
            ) from None
        binary = nvrtc.getCUBIN(prog) if target.startswith("sm_") else _as_bytes(nvrtc.getPTX(prog)) + b"\0"
    finally:
        nvrtc.destroyProgram(prog)
    _write_atomic(cached, binary)
    return binary


def _as_bytes(text) -> bytes:
    return text if isinstance(text, bytes) else text.encode()


def _write_atomic(path: Path, payload: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a recompile next time


# ----------------------------------------------------------------------------- loading
@functools.lru_cache(maxsize=None)
def load(filename, device: int):
    """The CuPy ``Module`` of ``kernels_cu/<filename>`` (or an absolute .cu path) for ``device``, memoized."""
    cp = _cupy()
    if cp is None or device_count() == 0:
        raise RuntimeError("fp4cupy's GPU path needs CuPy and a CUDA GPU: pip install 'fp4cupy[cuda12]' (or [cuda13])")
    binary = compile_source(filename, module_target(device))
    with cp.cuda.Device(device):
        mod = cp.cuda.function.Module()
        mod.load(binary)  # a cubin, or PTX (NUL-terminated) that the driver finishes for this GPU
    return mod


@functools.lru_cache(maxsize=None)
def kernel(filename: str, name: str, device: int):
    """One kernel by name, e.g. ``kernel("quantize.cu", "nvfp4_quantize_g16_bf16", 0)``."""
    return load(filename, device).get_function(name)


# ----------------------------------------------------------------------------- launching
class Launcher:
    """One kernel with a fixed argument signature, launched by ``cuLaunchKernel`` from a reused,
    per-thread argument block: a few microseconds per launch instead of CuPy's per-call argument
    conversion. ``signature`` uses struct codes: P pointer, q int64, i int32, f float32.

        launch = Launcher("w4a16.cu", "w4a16_rt1_nt1_u2_f16", 0, "PPPPPPiii")
        launch((grid_x, grid_y), threads, shared_bytes, stream_ptr, *args)  # or (x, y, z), or x
        launch.after((grid_x, grid_y), threads, shared_bytes, stream_ptr, *args)  # see after()
    """

    def __init__(self, filename: str, name: str, device: int, signature: str):
        self.name, self.device, self.signature = name, device, signature
        self.fn = kernel(filename, name, device)
        self._ptr = self.fn.ptr
        cupy = _cupy()
        self._launch, self._get_device = cupy.cuda.driver.launchKernel, cupy.cuda.runtime.getDevice
        self._fmt = "@" + signature
        self._offsets = [struct.calcsize("@" + signature[: i + 1]) - struct.calcsize(c) for i, c in enumerate(signature)]
        self._size = max(struct.calcsize(self._fmt), 8)
        self._local = threading.local()
        cc = compute_capability(device)
        self._launch_ex = _cu_function("cuLaunchKernelEx") if cc is not None and cc >= (9, 0) else None

    def allow_shared(self, nbytes: int) -> "Launcher":
        """Let launches use ``nbytes`` of dynamic shared memory (above 48 KiB needs this opt-in)."""
        driver = _cupy().cuda.driver
        with _cupy().cuda.Device(self.device):
            driver.funcSetAttribute(self._ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(nbytes))
        return self

    def max_active_clusters(self, cluster: int, threads: int, shared: int) -> int:
        """How many clusters of ``cluster`` blocks (the kernel's compile-time cluster size) of
        ``threads`` threads and ``shared`` bytes of dynamic shared memory run at once on the
        device (cuOccupancyMaxActiveClusters); 0 where the driver cannot say."""
        fn = _cu_function("cuOccupancyMaxActiveClusters")
        if fn is None or self._launch_ex is None:
            return 0
        config = _LaunchConfig(gridDimX=cluster, gridDimY=1, gridDimZ=1, blockDimX=threads, blockDimY=1,
                               blockDimZ=1, sharedMemBytes=shared)
        count = ctypes.c_int(0)
        rc = self._on_device(fn, ctypes.byref(count), self._ptr, ctypes.addressof(config))
        return count.value if rc == 0 else 0

    def max_active_blocks(self, threads: int, shared: int) -> int:
        """How many blocks of ``threads`` threads and ``shared`` bytes of dynamic shared memory run
        at once on one SM (cuOccupancyMaxActiveBlocksPerMultiprocessor: registers, shared memory
        and warp limits); 0 where the driver cannot say."""
        fn = _cu_function("cuOccupancyMaxActiveBlocksPerMultiprocessor")
        if fn is None:
            return 0
        count = ctypes.c_int(0)
        rc = self._on_device(fn, ctypes.byref(count), self._ptr, threads, shared)
        return count.value if rc == 0 else 0

    def _block(self):
        b = getattr(self._local, "block", None)
        if b is None:
            buf = ctypes.create_string_buffer(self._size)
            base = ctypes.addressof(buf)
            params = (ctypes.c_void_p * len(self._offsets))(*[base + o for o in self._offsets])
            b = self._local.block = (buf, params, ctypes.addressof(params))
        return b

    def __call__(self, grid, threads: int, shared: int, stream_ptr: int, *args):
        block = getattr(self._local, "block", None) or self._block()
        struct.pack_into(self._fmt, block[0], 0, *args)
        gx, gy, gz = (grid, 1, 1) if isinstance(grid, int) else (*grid, 1) if len(grid) == 2 else grid
        self._on_device(self._launch, self._ptr, gx, gy, gz, threads, 1, 1, shared, stream_ptr, block[2], 0)

    def _on_device(self, fn, *args):
        """``fn(*args)`` with this launcher's device current."""
        if self._get_device() != self.device:
            with _cupy().cuda.Device(self.device):
                return fn(*args)
        return fn(*args)

    def after(self, grid, threads: int, shared: int, stream_ptr: int, *args):
        """Launch as a programmatic dependent of the kernel before it in the stream (sm_90+): its
        blocks may start while that kernel finishes, so the kernel must call
        grid_dependency_wait() (common.cuh) before it touches what that kernel writes. Elsewhere,
        or without cuLaunchKernelEx, a plain launch."""
        if self._launch_ex is None:
            return self(grid, threads, shared, stream_ptr, *args)
        block = getattr(self._local, "block", None) or self._block()
        struct.pack_into(self._fmt, block[0], 0, *args)
        config = getattr(self._local, "config", None)
        if config is None:
            config = self._local.config = _LaunchConfig()
            self._local.attr = attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            config.gridDimZ = config.blockDimY = config.blockDimZ = 1
            config.attrs, config.numAttrs = ctypes.addressof(attr), 1
        config.gridDimX, config.gridDimY = (grid, 1) if isinstance(grid, int) else grid
        config.blockDimX, config.sharedMemBytes, config.hStream = threads, shared, stream_ptr
        rc = self._on_device(self._launch_ex, ctypes.addressof(config), self._ptr, block[2], None)
        if rc:
            raise RuntimeError(f"cuLaunchKernelEx of {self.name} failed: CUresult {rc}")


# cuLaunchKernelEx's structs (cuda.h, CUDA 12+): CUlaunchConfig, and CUlaunchAttribute (an id, then
# a 64-byte value union; 72 bytes) carrying CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION.
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("_pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("_rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("numAttrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=None)
def _cu_function(name: str):
    """A driver function through ctypes (CUresult back), or None where the driver has none
    (cuLaunchKernelEx and cuOccupancyMaxActiveClusters: CUDA 12.0+)."""
    try:
        fn = getattr(ctypes.CDLL("libcuda.so.1"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = {"cuLaunchKernelEx": [ctypes.c_void_p] * 4, "cuOccupancyMaxActiveClusters": [ctypes.c_void_p] * 3,
                   "cuOccupancyMaxActiveBlocksPerMultiprocessor": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                                   ctypes.c_size_t]}[name]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=None)
def launcher(filename: str, name: str, device: int, signature: str) -> Launcher:
    """The memoized ``Launcher`` of one kernel on one device."""
    return Launcher(filename, name, device, signature)
