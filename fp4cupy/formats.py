"""The FP4 formats as data.

Every format shares the element type, FP4 E2M1 (sign bit 3, magnitudes
{0, 0.5, 1, 1.5, 2, 3, 4, 6}), packed two to a byte with element 2i in the low
nibble. Formats differ in the block-scale type, the block sizes they allow,
whether a per-tensor FP32 global scale exists and how a block's scale is chosen.

Adding a format is one entry in ``FORMATS`` plus its scale rule in
``reference.SCALE_RULES`` (and the matching ``scale_rule`` in the CUDA kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class Format:
    """One FP4 block format.

    name:          the public name, e.g. ``"nvfp4"``.
    scale_type:    ``"e4m3"`` (FP8 E4M3, finite, max 448) or ``"e8m0"`` (power of two, bias 127).
    group_sizes:   block sizes allowed along the last axis.
    default_group: the block size used when none is given.
    global_scale:  True when a per-tensor FP32 decode scale multiplies every value.
    scale_modes:   how a block scale is rounded; the first is the default.
    """

    name: str
    scale_type: str
    group_sizes: tuple[int, ...]
    default_group: int
    global_scale: bool
    scale_modes: tuple[str, ...]

    def check_group_size(self, group_size: int | None) -> int:
        """Return the block size to use, or raise ValueError naming the allowed ones."""
        if group_size is None:
            return self.default_group
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in self.group_sizes:
            raise ValueError(
                f"group_size={group_size!r} is not allowed for {self.name}; "
                f"allowed: {', '.join(map(str, self.group_sizes))}"
            )
        return group_size

    def check_scale_mode(self, scale_mode: str | None) -> str:
        """Return the scale mode to use, or raise ValueError naming the allowed ones."""
        if scale_mode is None:
            return self.scale_modes[0]
        if scale_mode not in self.scale_modes:
            raise ValueError(
                f"scale_mode={scale_mode!r} is not allowed for {self.name}; "
                f"allowed: {', '.join(self.scale_modes)}"
            )
        return scale_mode


FORMATS: dict[str, Format] = {
    # NVFP4: E4M3 block scale chosen by round-to-nearest-even ("rtn"), FP32 global decode scale.
    "nvfp4": Format("nvfp4", "e4m3", (8, 16, 32, 64), 16, True, ("rtn",)),
    # MXFP4 (OCP Microscaling v1.0): E8M0 shared exponent; "floor" is the OCP rule,
    # "rceil" rounds blockamax/6 up to a power of two (torchao's RCEIL), "round" rounds blockamax
    # to one mantissa bit first (compressed-tensors / llm-compressor's MXFP4).
    "mxfp4": Format("mxfp4", "e8m0", (32,), 32, False, ("floor", "rceil", "round")),
}


def get_format(fmt: str | Format) -> Format:
    """Look a format up by name (case-insensitive); ValueError lists the known names."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str) and fmt.lower() in FORMATS:
        return FORMATS[fmt.lower()]
    raise ValueError(f"unknown FP4 format {fmt!r}; known formats: {', '.join(FORMATS)}")
