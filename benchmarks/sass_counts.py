"""Registers, spills and the main loop's instruction mix of fp4cupy's kernels, with no GPU.

    FP4CUPY_PTXAS=/path/to/ptxas FP4CUPY_NVDISASM=/path/to/nvdisasm \\
        python3 benchmarks/sass_counts.py w4a16.cu w4a16_rt2_nt1_u2_f16 [more kernel names] [--arch sm_90a]

NVRTC writes PTX (runtime.compile_source for a compute_* target), ptxas assembles it (-v gives
registers and spills, and its performance advisories, such as "wgmma.mma_async instructions are
serialized", are printed too) and nvdisasm lists the SASS. The "main loop" is the shortest backward
branch whose body holds the most MMA instructions (HMMA / HGMMA), or without any, the most global
loads; a MEMBAR inside it is called out (see NOTES.md, sessions 7 and 9).
NVRTC 12's cubins are rejected by nvdisasm 13 ("invalid ELF"), hence the PTX route. ptxas and nvdisasm come with the
CUDA toolkit, or with the triton wheel (triton/backends/nvidia/bin: ptxas-blackwell, nvdisasm).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fp4cupy import runtime  # noqa: E402


def assemble(source: str, arch: str, workdir: str) -> tuple[str, dict]:
    """(SASS text, ``ptxas_info`` of its log) of one kernels_cu source."""
    ptx = runtime.compile_source(source, arch.replace("sm_", "compute_"))
    ptx_path, cubin = os.path.join(workdir, "k.ptx"), os.path.join(workdir, "k.cubin")
    with open(ptx_path, "wb") as f:
        f.write(ptx.rstrip(b"\0"))
    ptxas = os.environ.get("FP4CUPY_PTXAS", "ptxas")
    log = subprocess.run([ptxas, "-v", f"-arch={arch}", "-o", cubin, ptx_path], capture_output=True, text=True,
                         check=True).stderr
    sass = subprocess.run([os.environ.get("FP4CUPY_NVDISASM", "nvdisasm"), "-c", cubin], capture_output=True,
                          text=True, check=True).stdout
    return sass, ptxas_info(log)


def ptxas_info(log: str) -> dict:
    """{kernel: (registers, spill line or '', [advisories])} from ``ptxas -v``'s log. An advisory
    ("(C7512) Potential Performance Loss: ... for the function 'name'") may come before or after
    the kernel's own lines, so it is matched by the name it gives."""
    info, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            info.setdefault(name, [0, "", []])
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            info[name][0] = int(m.group(1))
        if "spill" in line and name and " 0 bytes spill stores" not in line:
            info[name][1] = line.strip()
        m = re.search(r"(\(C\d+\) Potential Performance Loss: .*?)(?: for the function|in the function)? '(\w+)'", line)
        if m:
            info.setdefault(m.group(2), [0, "", []])[2].append(m.group(1).rstrip())
    return {k: tuple(v) for k, v in info.items()}


def main_loop(function_sass: str):
    """(instructions, MMA instructions, opcode counts) of the function's main loop, or None."""
    labels, seq = {}, []
    for line in function_sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(seq)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            seq.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)))
    loops = []
    for i, ins in enumerate(seq):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = seq[labels[m.group(1)]: i + 1]
            mma = sum(b.startswith(("HMMA", "HGMMA")) for b in body)
            loads = sum(b.startswith("LDG") for b in body)
            loops.append((mma, loads, len(body), body))
    loops = [t for t in loops if t[0] or t[1]]  # (the self-branch after EXIT has neither)
    if not loops:
        return None
    # the innermost loop with the most MMAs, else the innermost with the most global loads
    mma, _, n, body = max(loops, key=lambda t: (t[0], -t[2]) if t[0] else (0, t[1], -t[2]))
    return n, mma, collections.Counter(b.split()[0].split(".")[0] for b in body)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a kernels_cu file, e.g. w4a16.cu")
    ap.add_argument("kernels", nargs="+", help="kernel names (extern \"C\")")
    ap.add_argument("--arch", default="sm_90a")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sass, info = assemble(args.source, args.arch, tmp)
    functions = {f.split(":")[0]: f for f in re.split(r"\n\s*\.text\.", sass)[1:]}
    for name in args.kernels:
        if name not in functions:
            print(f"{name}: not in {args.source}")
            continue
        regs, spill, advisories = info.get(name, (0, "", []))
        loop = main_loop(functions[name])
        text = f"{name}: {regs} registers" + (f" ({spill})" if spill else "")
        text += "".join(f"; ptxas: {a}" for a in advisories)
        if loop:
            n, mma, ops = loop
            per = f", {n / mma:.1f} per MMA" if mma else ""
            text += f"; main loop {n} instructions, {mma} MMA{per}: " + " ".join(f"{k} {v}" for k, v in ops.most_common(8))
            if ops["MEMBAR"]:  # a fence in the loop waits for the thread's memory operations in flight
                text += f"; MEMBAR {ops['MEMBAR']} in the loop"
        print(text)


if __name__ == "__main__":
    main()
