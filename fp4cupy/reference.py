"""The numpy reference: this file *is* the spec that every GPU kernel matches bit for bit.

All arithmetic is IEEE float32 with round-to-nearest-even, in this order:

NVFP4 (group g_s, decode global scale g):
    amax = max|x| (fp32);  g = amax / 2688  (2688 = 6 * 448), or 1 when that is 0
    s    = E4M3_RNE(min(blockamax / (6 * g), 448))                 # scale byte
    d    = fp32(s) * g                                             # one fp32 rounding
    code = E2M1_RNE(clip(x / d, -6, 6)), sign = sign bit of x;  d == 0 -> code 0
    value = (e2m1(code) * fp32(s)) * g                             # exact product, then one rounding
MXFP4 (block 32, no global scale):
    floor: e = floor(log2(blockamax)) - 2;  rceil: e = ceil(log2(blockamax / 6))
    round: e = floor(log2(blockamax rounded to 1 mantissa bit, ties up)) - 2, i.e. floor's e + 1
           where blockamax's significand is 1.75 or more (compressed-tensors / llm-compressor)
    e clamped to [-127, 127] (blockamax == 0 -> -127); scale byte = e + 127
    code = E2M1_RNE(clip(x * 2**-e, -6, 6));  value = e2m1(code) * 2**e (exact)

E2M1 ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
NaN or +-Inf anywhere in the input raises ValueError (never a finite code).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .formats import E2M1_MAX, E4M3_MAX, Format, get_format

F32 = np.float32
_TWO688 = F32(6.0 * 448.0)


# ----------------------------------------------------------------------------- element and scale codecs
def e2m1_encode(r: np.ndarray) -> np.ndarray:
    """E2M1 codes (uint8, 0..15) of float32 ``r``: RNE, saturating at +-6, sign from the sign bit.

    ml_dtypes' float4_e2m1fn cast rounds to nearest even and saturates, but maps NaN to 0x8,
    so NaN is rejected here first.
    """
    r = np.asarray(r, dtype=F32)
    if np.isnan(r).any():
        raise ValueError("e2m1_encode: NaN has no E2M1 code")
    return np.clip(r, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)


# code -> float32 value, all 16 codes (signed; formats.E2M1_VALUES lists the 8 magnitudes)
E2M1_DECODE = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(F32)


def e2m1_decode(codes: np.ndarray) -> np.ndarray:
    """float32 values of E2M1 codes (low 4 bits of each uint8), looked up in ``E2M1_DECODE``
    (ml_dtypes' decode of the 16 codes; a lookup is ~3x faster than its cast)."""
    return E2M1_DECODE[np.asarray(codes, np.uint8) & 0xF]


def e4m3_encode(v: np.ndarray) -> np.ndarray:
    """E4M3 bits (uint8) of non-negative finite float32 ``v``: RNE, saturating at 448.

    ml_dtypes' float8_e4m3fn cast gives NaN above 464, so values are clamped to 448 first.
    """
    v = np.asarray(v, dtype=F32)
    return np.minimum(v, F32(E4M3_MAX)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def e4m3_decode(bits: np.ndarray) -> np.ndarray:
    """float32 values of E4M3 bits (0x7F / 0xFF decode to NaN)."""
    return np.asarray(bits, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(F32)


def e8m0_decode(bits: np.ndarray) -> np.ndarray:
    """float32 2**(bits - 127); 0xFF decodes to NaN."""
    return np.asarray(bits, np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(F32)


def _floor_log2(v: np.ndarray) -> np.ndarray:
    """floor(log2(v)) of positive float32 v (subnormals included), as int32."""
    _, ex = np.frexp(v)
    return (ex - 1).astype(np.int32)


def _ceil_log2(v: np.ndarray) -> np.ndarray:
    """ceil(log2(v)) of positive float32 v, as int32."""
    m, ex = np.frexp(v)
    return np.where(m == 0.5, ex - 1, ex).astype(np.int32)


# ----------------------------------------------------------------------------- packing
def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack codes [..., K] (K even) into bytes [..., K/2]: element 2i low nibble, 2i+1 high."""
    codes = np.asarray(codes, np.uint8)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_nibbles(data: np.ndarray) -> np.ndarray:
    """Inverse of pack_nibbles: bytes [..., K/2] -> codes [..., K]."""
    data = np.asarray(data, np.uint8)
    out = np.empty(data.shape[:-1] + (data.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = data & 0xF
    out[..., 1::2] = data >> 4
    return out


# ----------------------------------------------------------------------------- input checks
def check_finite(x: np.ndarray) -> None:
    """Raise ValueError naming how many NaN/Inf values there are and the index of the first."""
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), x.shape))
        raise ValueError(
            f"input has {int(bad.sum())} NaN/Inf value(s), the first at index {first} "
            f"(value {x[first]}); FP4 has no encoding for them"
        )


def global_scale_from_amax(amax) -> np.float32:
    """The NVFP4 decode global scale: amax / (6 * 448) in float32, or 1 when that is 0."""
    g = F32(amax) / _TWO688
    return F32(1.0) if g == 0 else g


# ----------------------------------------------------------------------------- scale rules
def _nvfp4_rtn(blockamax: np.ndarray, g: np.float32):
    """E4M3 scale bits and the fp32 divisor d = fp32(s) * g of each block."""
    bits = e4m3_encode(blockamax / (F32(6.0) * g))
    return bits, e4m3_decode(bits) * g


def _mx_scale(e: np.ndarray):
    e = np.clip(e, -127, 127)
    return (e + 127).astype(np.uint8), e


def _mxfp4_floor(blockamax: np.ndarray, g):
    e = np.where(blockamax > 0, _floor_log2(np.where(blockamax > 0, blockamax, 1)) - 2, -127)
    return _mx_scale(e)


def _mxfp4_rceil(blockamax: np.ndarray, g):
    d = blockamax / F32(E2M1_MAX)
    e = np.where(d > 0, _ceil_log2(np.where(d > 0, d, 1)), -127)
    return _mx_scale(e)


def _mxfp4_round(blockamax: np.ndarray, g):
    """The float32 bits plus half the E2M1 mantissa step (2^21): the exponent field carries where the
    significand is 1.75 or more (an amax that would round past 6 * 2^e stays in range)."""
    bits = np.ascontiguousarray(blockamax, F32).view(np.uint32).astype(np.int64)
    return _mx_scale(((bits + (1 << 21)) >> 23) - 127 - 2)


# (scale_type, mode) -> rule(blockamax, g) -> (scale bits, divisor); for e8m0 the divisor is the exponent.
SCALE_RULES = {
    ("e4m3", "rtn"): _nvfp4_rtn,
    ("e8m0", "floor"): _mxfp4_floor,
    ("e8m0", "rceil"): _mxfp4_rceil,
    ("e8m0", "round"): _mxfp4_round,
}


def _pow2(e: np.ndarray) -> np.ndarray:
    """Exact float32 2**e for integer e in [-149, 127]."""
    return np.ldexp(F32(1.0), e.astype(np.int32)).astype(F32)


# ----------------------------------------------------------------------------- quantize / dequantize
def quantize(x, fmt="nvfp4", group_size=None, scale_mode=None, global_scale=None, nonfinite="raise"):
    """Quantize ``x`` [..., K] (K a multiple of the group) along its last axis.

    Returns ``(data uint8 [..., K/2], scales uint8 [..., K/group], global_scale float32)``.
    ``global_scale`` (NVFP4 only) is the decode scale to use instead of amax / 2688; blocks that
    then overflow the E4M3 range saturate at 448 and their codes at +-6.
    ``nonfinite="raise"`` rejects NaN/Inf; ``"mark"`` gives a block holding any a NaN scale byte
    (0x7F E4M3, 0xFF E8M0) and zero codes, leaves it out of amax, and so decodes it to NaN.
    """
    f: Format = get_format(fmt)
    gs = f.check_group_size(group_size)
    mode = f.check_scale_mode(scale_mode)
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        x32 = x.astype(F32)
    if x.dtype == np.float64 and np.isfinite(x).all() and not np.isfinite(x32).all():
        raise ValueError("input has values beyond the float32 range (|x| > 3.4e38); quantization runs in float32")
    if nonfinite == "raise":
        check_finite(x32)
    elif nonfinite != "mark":
        raise ValueError(f"nonfinite must be 'raise' or 'mark'; got {nonfinite!r}")
    if x.ndim == 0 or x.shape[-1] % gs:
        raise ValueError(f"last dimension must be a multiple of group_size={gs}; got shape {x.shape}")
    blocks = x32.reshape(x.shape[:-1] + (x.shape[-1] // gs, gs))
    bad = ~np.isfinite(blocks).all(axis=-1)
    if bad.any():  # "mark": amax and block scales come from the finite values
        blocks = np.where(np.isfinite(blocks), blocks, F32(0.0))
    blockamax = np.abs(blocks).max(axis=-1) if blocks.size else np.zeros(blocks.shape[:-1], F32)
    if not f.global_scale:
        g = F32(1.0)
    elif global_scale is None:
        g = global_scale_from_amax(blockamax.max() if blockamax.size else 0)
    else:
        g = F32(global_scale)
    scales, div = SCALE_RULES[(f.scale_type, mode)](blockamax, g)
    if f.scale_type == "e8m0":
        r = blocks * _pow2(-div)[..., None]
        zero = np.zeros_like(div, dtype=bool)
    else:
        zero = div == 0
        r = blocks / np.where(zero, F32(1.0), div)[..., None]
    codes = e2m1_encode(r)
    codes[zero | bad] = 0
    scales[bad] = 0x7F if f.scale_type == "e4m3" else 0xFF
    return pack_nibbles(codes.reshape(x.shape)), scales, F32(g)


def block_scale_values(scales: np.ndarray, fmt="nvfp4") -> np.ndarray:
    """float32 values of stored scale bytes for ``fmt``."""
    f = get_format(fmt)
    return e4m3_decode(scales) if f.scale_type == "e4m3" else e8m0_decode(scales)


def dequantize(data, scales, global_scale=1.0, fmt="nvfp4", group_size=None, dtype=np.float32):
    """Decode packed codes: value = (e2m1(code) * scale) * global_scale in float32, then cast to dtype."""
    f = get_format(fmt)
    gs = f.check_group_size(group_size)
    data = np.asarray(data, np.uint8)
    codes = unpack_nibbles(data)
    k = codes.shape[-1]
    vals = e2m1_decode(codes).reshape(codes.shape[:-1] + (k // gs, gs))
    sv = block_scale_values(np.asarray(scales, np.uint8), f)
    out = (vals * sv[..., None]).reshape(codes.shape)
    if f.global_scale:
        out = out * F32(global_scale)
    return out.astype(dtype)


# ----------------------------------------------------------------------------- swizzled scale layout
def swizzle_offsets(rows: int, cols: int) -> np.ndarray:
    """Offset of scale (m, k) in the 128x4-tile layout of CUTLASS / vLLM / torch._scaled_mm:
    ``(m//128 * ceil(cols/4) + k//4) * 512 + (m%32)*16 + (m%128)//32*4 + k%4``."""
    m = np.arange(rows)[:, None]
    k = np.arange(cols)[None, :]
    ktiles = -(-cols // 4)
    return (m // 128 * ktiles + k // 4) * 512 + (m % 32) * 16 + (m % 128) // 32 * 4 + k % 4


def swizzled_size(rows: int, cols: int) -> int:
    """Bytes of the swizzled buffer: rows padded to 128, columns to 4."""
    return (-(-rows // 128) * 128) * (-(-cols // 4) * 4)


def swizzle_scales(scales: np.ndarray) -> np.ndarray:
    """Linear scales [..., cols] (leading dims flattened into rows) -> flat swizzled uint8, zero padded."""
    s = np.asarray(scales, np.uint8)
    s2 = s.reshape(-1, s.shape[-1])
    out = np.zeros(swizzled_size(*s2.shape), np.uint8)
    out[swizzle_offsets(*s2.shape)] = s2
    return out


def unswizzle_scales(buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Flat swizzled buffer -> linear scales [rows, cols]."""
    buf = np.asarray(buf, np.uint8).reshape(-1)
    need = swizzled_size(rows, cols)
    if buf.size != need:
        raise ValueError(f"swizzled buffer for {rows}x{cols} scales must hold {need} bytes; got {buf.size}")
    return buf[swizzle_offsets(rows, cols)]
