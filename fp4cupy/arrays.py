"""Array interop: which library an array belongs to, and moving data between numpy, torch and CuPy.

Nothing here imports torch or CuPy unless the caller's array is one of theirs, so
``import fp4cupy`` stays light. Conversions are zero-copy wherever the libraries allow
(numpy <-> torch CPU share memory; bfloat16 travels as int16 bits and is viewed back).
"""
from __future__ import annotations

import sys

import ml_dtypes
import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# output dtypes by name, as numpy (ml_dtypes for bfloat16) types
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _torch():
    return sys.modules.get("torch")


def _cupy():
    return sys.modules.get("cupy")


def is_torch(x) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def is_cupy(x) -> bool:
    cp = _cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def library_of(x) -> str:
    """'torch', 'cupy' or 'numpy' (anything else is read through numpy)."""
    return "torch" if is_torch(x) else "cupy" if is_cupy(x) else "numpy"


def is_cuda(x) -> bool:
    """True for CuPy arrays and CUDA torch tensors."""
    return is_cupy(x) or (is_torch(x) and x.is_cuda)


def device_of(x) -> str:
    """'cpu' or 'cuda:N'."""
    if is_cupy(x):
        return f"cuda:{x.device.id}"
    if is_torch(x):
        return f"cuda:{x.device.index}" if x.is_cuda else "cpu"
    return "cpu"


def dtype_name(x) -> str:
    """The element type as a plain name ('float32', 'bfloat16', 'uint8', ...)."""
    if is_torch(x):
        return str(x.dtype).removeprefix("torch.")
    return np.dtype(x.dtype).name


def as_array(x):
    """Accept numpy / torch / CuPy arrays as they are; read anything else through DLPack or numpy."""
    if isinstance(x, np.ndarray) or is_torch(x) or is_cupy(x):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError):
            pass
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - report what was given
        raise TypeError(
            f"expected a numpy, CuPy or torch array (or any __dlpack__/__array__ object); got {type(x).__name__}"
        ) from e


def to_numpy(x) -> np.ndarray:
    """A numpy view of a CPU array (zero-copy for torch CPU tensors); device arrays are copied to host."""
    if is_torch(x):
        x = x.detach()
        if x.is_cuda:
            x = x.cpu()
        if x.dtype == _torch().bfloat16:
            return x.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def numpy_to(a: np.ndarray, library: str, device: str = "cpu"):
    """Hand a numpy array to ``library`` on ``device`` (zero-copy for torch CPU)."""
    if library == "torch":
        torch = _torch() or __import__("torch")
        a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes a 0-d array 1-d
        if a.dtype == ml_dtypes.bfloat16:
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        return t if device == "cpu" else t.to(device)
    if library == "cupy":
        cp = _cupy() or __import__("cupy")
        with cp.cuda.Device(_device_index(device)):
            return cp.asarray(a)
    return a


def _device_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def move(x, device: str):
    """The same array on ``device`` ('cpu', 'cuda', 'cuda:N'), in the matching library
    (numpy <-> CuPy, torch CPU <-> torch CUDA). Returns ``x`` itself when it is already there."""
    device = normalize_device(device)
    if device_of(x) == device:
        return x
    if is_torch(x):
        return x.to(device)
    if device == "cpu":
        return to_numpy(x)
    return numpy_to(to_numpy(x), "cupy", device)


def normalize_device(device) -> str:
    """'cpu' / 'cuda' / 'cuda:N' / torch.device / int -> 'cpu' or 'cuda:N'; ValueError otherwise."""
    d = str(device) if not isinstance(device, int) else f"cuda:{device}"
    if d == "cpu":
        return d
    if d == "cuda":
        return "cuda:0"
    if d.startswith("cuda:") and d[5:].isdigit():
        return d
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
