"""A weight prepared once for the fast W4A16 ``linear``: the canonical FP4Tensor plus its repacked copy.

``prepare(W)`` repacks an NVFP4 weight [N, K] into the layout that ``kernels_cu/w4a16.cu`` streams
(documented in ``kernels_cu/prepare.cu``; ``repack_codes`` / ``repack_scales`` below are its numpy
twin and ``emulate_linear`` replays the kernel's arithmetic, bit for bit up to FP32 summation order).
The canonical tensor stays in ``.weight`` for export; nothing is cached behind the caller's back.

Numerics of the fast path: every weight is decoded to e2m1 * s * 2^-14 in fp16 (or bf16), which is
exact (e2m1 * s has at most 6 significant bits in [2^-10, 2688]); products with x are summed in FP32
by the tensor cores; the sum is multiplied by g * 2^14, plus the bias, and rounded to x's dtype.
An MXFP4 weight runs as the NVFP4 tensor of the same values (``mxfp4_as_nvfp4``): its E8M0 block
scales 2^e become E4M3 powers of two 2^(e - r) and g = 2^r, exact where the exponents of its
nonzero blocks span at most 18 binades (E4M3 holds 2^-9 .. 2^8).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from . import arrays, reference
from .tensor import FP4Tensor

FAST_GROUP_SIZES = (16, 32, 64)
CHUNK = 64  # K per warp step; K must be a multiple of it


MX_BINADES = 18  # exponents of MXFP4 block scales one weight may span on the fast path: E4M3 2^-9 .. 2^8


def fast_path_reason(w: FP4Tensor) -> str | None:
    """Why ``w`` cannot use the mma kernel (None when it can; MXFP4 after ``mxfp4_as_nvfp4``)."""
    if w.fmt != "nvfp4":
        return f"fmt={w.fmt} (the fast kernel takes NVFP4; prepare() converts MXFP4)"
    if w.group_size not in FAST_GROUP_SIZES:
        return f"group_size={w.group_size} (the fast kernel takes {FAST_GROUP_SIZES})"
    if w.shape[1] % CHUNK or w.shape[1] != w.padded_shape[1]:
        return f"K={w.shape[1]} (the fast kernel needs K a multiple of {CHUNK})"
    return None


class PreparedWeight:
    """An FP4 weight [N, K] ready for ``fp4cupy.linear``.

    weight:  the canonical FP4Tensor (export it; ``linear`` reads ``codes``/``scale_codes`` instead).
    codes:   uint8 view of u32 [T/2, K/64, 2, 32, 4] repacked E2M1 codes, T = ceil(N/16) row tiles
             rounded up to a multiple of 4, in pairs (fast path only).
    scale_codes: uint8 [T/2, K/64, 2, 4, 8, 2] block scales as fp16 codes (fast path only).
    path:    'mma' (the W4A16 tensor-core kernel) or 'dequantize' (decode W each call, then a matmul).
    global_scale: the kernel's g where the codes live (the weight's own, or an MXFP4 weight's 2^r).
    """

    __slots__ = ("weight", "codes", "scale_codes", "path", "reason", "global_scale")

    def __init__(self, weight: FP4Tensor, codes, scale_codes, path: str, reason: str | None, global_scale=None):
        self.weight, self.codes, self.scale_codes, self.path, self.reason = weight, codes, scale_codes, path, reason
        self.global_scale = weight.global_scale_array if global_scale is None else global_scale

    @property
    def shape(self) -> tuple:
        return self.weight.shape

    @property
    def device(self) -> str:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        extra = 0 if self.codes is None else _nbytes(self.codes) + _nbytes(self.scale_codes)
        return self.weight.nbytes + extra

    def __repr__(self) -> str:
        why = f", because {self.reason}" if self.reason else ""
        return f"PreparedWeight(shape={self.shape}, fmt={self.weight.fmt}, device={self.device}, path={self.path}{why})"


def prepare(w: FP4Tensor) -> PreparedWeight:
    """Repack an FP4Tensor weight [N, K] once for ``fp4cupy.linear`` (keep the result; it holds both forms).

    Weights the fast kernel does not take (group size 8, K not a multiple of 64, MXFP4 whose block
    scales span more than 18 binades) get path='dequantize': still correct, decoded on each call.
    """
    if isinstance(w, PreparedWeight):
        return w
    if not isinstance(w, FP4Tensor) or len(w.shape) != 2:
        raise TypeError(f"prepare takes a 2-D FP4Tensor weight [N, K]; got {type(w).__name__} "
                        f"of shape {getattr(w, 'shape', '?')}")
    kw = mxfp4_as_nvfp4(w) if w.fmt == "mxfp4" else w  # the weight the kernel runs
    reason = kw if isinstance(kw, str) else fast_path_reason(kw)
    if reason is not None:
        return PreparedWeight(w, None, None, "dequantize", reason)
    if bool((kw.scales >= 128).any()):  # the sign bit of E4M3 (numpy, torch and CuPy alike)
        raise ValueError("prepare: the weight has negative E4M3 block scales; fp4cupy never writes them "
                         "and the fast kernel does not take them")
    if arrays.is_cuda(kw.data):
        from . import cuda_linear

        codes, scale_codes = cuda_linear.repack(kw)
    else:
        n, k = kw.shape
        data, scales = arrays.to_numpy(kw.data), arrays.to_numpy(kw.scales)
        codes = arrays.numpy_to(repack_codes(data, scales, n, k, kw.group_size).view(np.uint8), kw.library)
        scale_codes = arrays.numpy_to(repack_scales(scales, n, k, kw.group_size), kw.library)
    return PreparedWeight(w, codes, scale_codes, "mma", None, kw.global_scale_array)


def mxfp4_as_nvfp4(w: FP4Tensor) -> FP4Tensor | str:
    """The NVFP4 tensor (group 32) of exactly ``w``'s values, or why there is none.

    An E8M0 block scale 2^e (byte e + 127) becomes the E4M3 power of two 2^(e - r), r = (the largest
    e) - 8, and the global scale 2^r; the codes stay. Exact when the nonzero blocks' e span at most
    ``MX_BINADES``; a zero block (scale byte 0 and no nonzero code) gets scale 0, a NaN one (0xFF) 0x7F.
    """
    s = arrays.to_numpy(w.scales)
    nan, live = s == 0xFF, (s != 0) & (s != 0xFF)
    if (s == 0).any():  # 2^-127: a zero block, unless it holds codes (values below 2^-124)
        live |= (s == 0) & _blocks_with_codes(w.data, s.shape)
    e = s.astype(np.int32) - 127
    top = int(e[live].max()) if live.any() else 8  # none: g = 1
    span = top - int(e[live].min()) + 1 if live.any() else 1
    if span > MX_BINADES:
        return f"its MXFP4 block scales span {span} binades (the fast kernel takes up to {MX_BINADES})"
    p = np.where(live, e - (top - 8), 0)  # 2^p in [2^-9, 2^8]: exact in E4M3
    code = np.where(live, reference.e4m3_encode(np.ldexp(np.float32(1.0), p)), np.where(nan, 0x7F, 0)).astype(np.uint8)
    g = np.ldexp(np.float32(1.0), top - 8).astype(np.float32)
    scales = arrays.numpy_to(code, w.library, arrays.device_of(w.scales))
    return FP4Tensor(w.data, scales, g, w.shape, "nvfp4", 32)


def _blocks_with_codes(data, blocks: tuple) -> np.ndarray:
    """Whether each 32-value block (16 bytes of ``data``) holds a nonzero magnitude, worked out where
    ``data`` lives: only a flag a block comes to the host."""
    nonzero = (data.reshape(blocks + (16,)) & 0x77) != 0
    return arrays.to_numpy(nonzero.any(dim=-1) if arrays.is_torch(nonzero) else nonzero.any(axis=-1))


def mxfp4_scales_from_nvfp4(scales, g):
    """The E8M0 block scales that ``mxfp4_as_nvfp4`` turned into the E4M3 ``scales`` with global scale
    ``g`` (its inverse: 2^p * 2^r -> byte p + r + 127; 0 -> 0, NaN -> 0xFF), in ``scales``' library."""
    c = arrays.to_numpy(scales)
    r = int(np.log2(float(arrays.to_numpy(g).reshape(()))))  # g is a power of two
    v = reference.e4m3_decode(c & 0x7F)
    p = np.log2(np.where(v > 0, v, 1)).astype(np.int32)
    b = np.where(c == 0x7F, 0xFF, np.where(c == 0, 0, p + r + 127)).astype(np.uint8)
    return arrays.numpy_to(b, arrays.library_of(scales), arrays.device_of(scales))


def _nbytes(a) -> int:
    return int(a.numel() * a.element_size()) if arrays.is_torch(a) else int(a.nbytes)


# ----------------------------------------------------------------------------- numpy twin of prepare.cu
def _tiles(n: int) -> int:
    """Row tiles of 16, allocated in multiples of 4 (the largest tiles-per-block of w4a16.cu)."""
    return -(-n // 64) * 4


def _padded_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return a if a.shape[0] == rows else np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)])


PAIR = 2  # row tiles a pair in the repack (W4_PAIR in kernels_cu/w4a16_decode.cuh)


def _in_pairs(a: np.ndarray) -> np.ndarray:
    """[tiles, chunks, ...] -> [tiles/2, chunks, 2, ...]: chunk c of tiles 2p and 2p + 1 side by side
    (the repack's order, ``w4_slot`` in kernels_cu/w4a16_decode.cuh)."""
    t, c = a.shape[:2]
    return np.ascontiguousarray(a.reshape((t // PAIR, PAIR, c) + a.shape[2:]).swapaxes(1, 2))


def _tile_major(a: np.ndarray) -> np.ndarray:
    """The inverse of ``_in_pairs``."""
    p, c = a.shape[:2]
    return a.swapaxes(1, 2).reshape((PAIR * p, c) + a.shape[3:])


def repack_codes(data: np.ndarray, scales: np.ndarray, n: int, k: int, gs: int) -> np.ndarray:
    """u32 [tiles/2, K/64, 2, 32, 4]: see kernels_cu/prepare.cu."""
    codes = reference.unpack_nibbles(data).astype(np.uint32)  # [N, K]
    zero = np.repeat(scales & 0x7F, gs, axis=1)[:, :k] == 0
    codes[zero] = 0
    tiles = _tiles(n)
    codes = _padded_rows(codes, tiles * 16).reshape(tiles, 2, 8, k // 64, 4, 4, 4)  # tile, half, g, chunk, q, t, i
    a, b = codes[:, 0], codes[:, 1]  # rows r = 16*tile + g and r + 8: [tile, g, chunk, q, t, i]
    word = (a[..., 0] | a[..., 1] << 16 | b[..., 0] << 8 | b[..., 1] << 24
            | a[..., 2] << 4 | a[..., 3] << 20 | b[..., 2] << 12 | b[..., 3] << 28)  # [tile, g, chunk, q, t]
    return _in_pairs(word.transpose(0, 2, 1, 3, 4).reshape(tiles, k // 64, 32, 4).astype(np.uint32))


def f16_code(scales: np.ndarray) -> np.ndarray:
    """E4M3 bits -> bits 7..14 of the same value as an fp16 (NaN stays NaN)."""
    s = reference.e4m3_decode(scales & 0x7F).astype(np.float16)
    code = ((s.view(np.uint16) >> 7) & 0xFF).astype(np.uint8)
    return np.where((scales & 0x7F) == 0x7F, np.uint8(0xFF), code)


def repack_scales(scales: np.ndarray, n: int, k: int, gs: int) -> np.ndarray:
    """u8 [tiles/2, K/64, 2, 4, 8, 2]: the fp16 code of the scale of rows (16*tile + g, + 8) per 16
    columns (chunk, q), in the codes' tile pairs."""
    tiles = _tiles(n)
    per16 = np.repeat(f16_code(scales), gs // 16, axis=1)[:, : k // 16]
    per16 = _padded_rows(per16, tiles * 16).reshape(tiles, 2, 8, k // 64, 4)  # tile, half, g, chunk, q
    return _in_pairs(per16.transpose(0, 3, 4, 2, 1))


def unpack_codes(codes: np.ndarray, n: int, k: int) -> np.ndarray:
    """The inverse of ``repack_codes``: packed uint8 [N, K/2] (zero-scale blocks come back as 0)."""
    words = _tile_major(codes.view(np.uint32).reshape(-1, k // 64, PAIR, 32, 4)).reshape(-1, k // 64, 8, 4, 4)
    regs = [(words >> s) & 15 for s in (0, 16, 8, 24, 4, 20, 12, 28)]  # a0 a1 b0 b1 a2 a3 b2 b3
    a = np.stack([regs[0], regs[1], regs[4], regs[5]], -1)  # row r:   cols 4t + 0..3
    b = np.stack([regs[2], regs[3], regs[6], regs[7]], -1)  # row r+8
    rows = np.stack([a, b], 1)  # tile, half, chunk, g, q, t, i
    full = rows.transpose(0, 1, 3, 2, 4, 5, 6).reshape(-1, k)[:n]
    return reference.pack_nibbles(full.astype(np.uint8))


def unpack_scales(scale_codes: np.ndarray, n: int, k: int, gs: int) -> np.ndarray:
    """The inverse of ``repack_scales``: E4M3 bits [N, K/gs]."""
    sc = _tile_major(scale_codes.reshape(-1, k // 64, PAIR, 4, 8, 2))  # tile, chunk, q, g, half
    per16 = sc.transpose(0, 4, 3, 1, 2).reshape(-1, k // 16)[:n]  # rows (tile, half, g)
    code = per16[:, :: gs // 16].astype(np.uint16)
    s = (code << 7).view(np.float16).astype(np.float32)
    return np.where(code == 0xFF, np.uint8(0x7F), reference.e4m3_encode(s)).astype(np.uint8)


# ----------------------------------------------------------------------------- numpy replay of w4a16.cu
def decode_f16_words(u: np.ndarray) -> np.ndarray:
    """The fp16 decode of w4a16.cu: u32 words -> u32 [..., 4] registers {H0, H1, H2, H3}."""
    u = u.astype(np.uint32)
    lo = ((u << 1) & 0x0E0E0E0E) | ((u << 4) & 0x80808080)
    hi = ((u >> 3) & 0x0E0E0E0E) | (u & 0x80808080)

    def perm(v, b1, b3):  # __byte_perm(v, 0, 0x?4?4): zero bytes 0 and 2
        return (((v >> (8 * b1)) & 0xFF) << 8) | (((v >> (8 * b3)) & 0xFF) << 24)

    return np.stack([perm(lo, 0, 2), perm(lo, 1, 3), perm(hi, 0, 2), perm(hi, 1, 3)], -1).astype(np.uint32)


def decode_bf16_words(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.uint32)
    regs = [(((u >> s) & 0x000F000F) * 0x1040) & 0x81C081C0 for s in (0, 8, 4, 12)]
    return np.stack(regs, -1).astype(np.uint32)


def _halves(reg: np.ndarray, dtype) -> np.ndarray:
    """u32 registers -> their (lo, hi) 16-bit halves as float32 values of ``dtype``."""
    bits = np.stack([reg & 0xFFFF, reg >> 16], -1).astype(np.uint16)
    return bits.view(dtype).astype(np.float32)


def emulate_linear(x: np.ndarray, codes: np.ndarray, scale_codes: np.ndarray, g: float, n: int,
                   bf16: bool) -> np.ndarray:
    """y = x @ W^T computed from the prepared layout exactly as w4a16.cu decodes it (float64 sums)."""
    m, k = x.shape
    words = _tile_major(codes.view(np.uint32).reshape(-1, k // 64, PAIR, 32, 4))
    tiles = words.shape[0]
    words = words.reshape(tiles, k // 64, 8, 4, 4)  # tile, chunk, g, q, t
    regs = (decode_bf16_words if bf16 else decode_f16_words)(words)  # ..., 4 registers
    dt = ml_dtypes.bfloat16 if bf16 else np.float16
    vals = _halves(regs, dt)  # tile, chunk, g, q, t, reg, half
    sc = _tile_major(scale_codes.reshape(-1, k // 64, PAIR, 4, 8, 2)).astype(np.uint32)  # tile, chunk, q, g, (r, r+8)
    pair = sc * 0x00100010 + 0x70007000 if bf16 else sc * 0x00800080
    s = _halves(pair.astype(np.uint32), dt)[..., 0]  # tile, chunk, q, g, row-half
    # registers: H0 = row r cols +0,+1; H1 = row r+8; H2 = row r cols +2,+3; H3 = row r+8
    w = np.empty((tiles, 2, 8, k // 64, 4, 4, 4), np.float32)  # tile, half, g, chunk, q, t, i
    v = vals.transpose(0, 2, 1, 3, 4, 5, 6)  # tile, g, chunk, q, t, reg, half
    s = s.transpose(0, 3, 1, 2, 4)  # tile, g, chunk, q, row-half
    for reg, (half, i0) in enumerate(((0, 0), (1, 0), (0, 2), (1, 2))):
        prod = v[..., reg, :] * s[..., half][..., None, None]  # exact in fp16/bf16 by construction
        w[:, half, :, :, :, :, i0:i0 + 2] = _round(prod, dt)
    wf = w.reshape(tiles * 16, k)[:n].astype(np.float64)
    return (x.astype(np.float64) @ wf.T) * (np.float64(g) * 2.0 ** 14)


def _round(a: np.ndarray, dt) -> np.ndarray:
    return a.astype(dt).astype(np.float32)
