"""SASS instruction count of a W4A16 kernel's main loop, compiled offline for sm_90 (no GPU needed).

Compiles the M = 1 GEMV kernel (``m1``) or the tensor-core small-M kernel (``tc``) with Triton's own ptxas for
an H100/H200 target, with the 16-divisibility a real launch specializes on (else loads look scalar),
disassembles it with the bundled ``nvdisasm`` and counts the instructions of the longest loop body (from the
loop label to its backward branch). Per element = loop instructions x threads / elements per step.

    python benchmarks/sass_count.py m1                    # the M = 1 kernel's fp32 tile
    python benchmarks/sass_count.py m1 --half2 --block-n 128 --block-k 128 --warps 2 --stages 4   # its half2 tile
    python benchmarks/sass_count.py tc --block-n 256      # w4a16_tc's M <= 16 kernel
    python benchmarks/sass_count.py tc --natural --block-m 64 --block-n 128 --warps 8   # its M > 16 kernel
    python benchmarks/sass_count.py tc --swap --natural --block-m 32 --block-n 128      # swapped operands
    python benchmarks/sass_count.py tcl --block-m 32 --block-n 64       # the tensor-core layout's step (w4a16_tcl)
    python benchmarks/sass_count.py tcl1 --block-n 256 --stages 2      # its M = 1 GEMV
    python benchmarks/sass_count.py tcl1 --block-n 128 --stages 1 [--xpairs | --xhalf | --silu] [--bf16]   # its steps
    PYTHONPATH=<other checkout> python benchmarks/sass_count.py m1 --root <other checkout>   # another tree

Needs a Triton with the NVIDIA backend (the CPU wheel ships ptxas and nvdisasm).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

POINTERS = ("x_ptr", "qw_ptr", "qz_ptr", "sc_ptr", "out_ptr", "ws_ptr", "lock_ptr")
TYPES = {"x_ptr": "*fp16", "qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16", "out_ptr": "*fp16",
         "ws_ptr": "*fp32", "lock_ptr": "*i32", "a_ptr": "*fp16", "slots_ptr": "*i32", "sws_ptr": "*fp32",
         "u_ptr": "*fp16", "h_ptr": "*fp16"}


def loop_body(sass: str) -> list[str]:
    """Instruction lines of the longest loop: from a label to the last backward branch to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\(\.(L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.search(r"/\*[0-9a-f]{4}\*/\s", x)]
            best = max(best, body, key=len)
    return best


def opcode(line: str) -> str:
    return re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line).group(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=("m1", "tc", "tcl", "tcl1"))
    ap.add_argument("--block-n", type=int, default=256)
    ap.add_argument("--block-k", type=int, default=64, help="m1 only (tc, tcl and tcl1 step 128 rows)")
    ap.add_argument("--block-m", type=int, default=16, help="tc only: rows per program")
    ap.add_argument("--natural", action="store_true", help="tc only: the one-dot-per-step kernel (M > 16)")
    ap.add_argument("--swap", action="store_true", help="tc only: out^T = W^T x^T (weights as MMA operand A)")
    ap.add_argument("--top", type=int, default=8, help="how many opcodes to list")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--half2", action="store_true", help="m1 only: the half2 PTX tile (fp16/bf16 x on a GPU)")
    ap.add_argument("--xpairs", action="store_true", help="tcl1 only: the fp16-x step that loads x as 32-bit pairs")
    ap.add_argument("--xhalf", action="store_true", help="tcl1 only: the step that reads the norm's fp16 copy x * 2**-7 "
                    "as pairs (XPAIRS 2)")
    ap.add_argument("--silu", action="store_true", help="tcl1 only: the SwiGLU step (x = silu(gate) * up, stored)")
    ap.add_argument("--bf16", action="store_true", help="tcl1 and tcl: bf16 activations (default fp16)")
    ap.add_argument("--dump", type=Path, default=None, help="also write the loop body's SASS to this file")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="tree to import")
    args = ap.parse_args()
    if args.swap and not args.natural:
        ap.error("--swap needs --natural (swapped operands exist for the natural-order step only)")
    sys.path.insert(0, str(args.root))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if args.kernel == "m1":
        from inlaid.kernels.w4a16_gemv import _w4_gemv_m1_kernel as fn
        ints = ("N", "K", "k_per_split", "n_split", "stride_qk", "stride_zg", "stride_sg", "stride_om")
        const = {"GROUP_SIZE": 128, "BLOCK_N": args.block_n, "BLOCK_K": args.block_k, "MODE": 4,
                 "NUM_STAGES": args.stages, "HALF2": args.half2}
        elems = args.block_n * args.block_k
    elif args.kernel == "tcl":
        from inlaid.kernels.w4a16_tcl import _w4_tcl_kernel as fn
        ints = ("M", "N", "K", "k_per_split", "n_split", "stride_xm", "stride_zg", "stride_sg", "stride_om", "nt_all",
                "R", "k_per_s", "n_s", "stride_as", "stride_ar", "stride_wsp", "stride_wt")
        const = {"GROUP_SIZE": 128, "BLOCK_M": args.block_m, "BLOCK_N": args.block_n, "MODE": 3,
                 "NUM_STAGES": args.stages, "WARPS": args.warps, "BF16": args.bf16,
                 "MAGIC": 0x4300 if args.bf16 else 0x6400, "PTX": True, "SHRINK": False, "BLOCK_R": 16,
                 "BLOCK_K": 64, "ROUNDS": 1, "PRELOAD": True, "PDL": 2}
        elems = args.block_n * 128
    elif args.kernel == "tcl1":
        from inlaid.kernels.w4a16_tcl import _w4_tcl_m1_kernel as fn
        ints = ("N", "K", "k_per_split", "n_split", "stride_zg", "stride_sg", "stride_om", "nt_all", "R", "k_per_s",
                "n_s", "stride_as", "stride_ar", "stride_wsp")
        const = {"GROUP_SIZE": 128, "BLOCK_N": args.block_n, "MODE": 3, "NUM_STAGES": args.stages, "PTX": True,
                 "SHRINK": False, "BLOCK_R": 16, "BLOCK_K": 64, "ROUNDS": 1, "SILU": args.silu, "STORE_H": args.silu,
                 "PDL": 2, "XPAIRS": 2 if args.xhalf else int(args.xpairs)}
        elems = args.block_n * 128
    else:
        from inlaid.kernels import w4a16_tc

        fn = w4a16_tc._w4_tc_kernel
        ints = ("M", "N", "K", "k_per_split", "n_split", "stride_xm", "stride_qk", "stride_zg", "stride_sg",
                "stride_om")
        const = {"GROUP_SIZE": 128, "BLOCK_M": args.block_m, "BLOCK_N": args.block_n, "MODE": 4,
                 "NUM_STAGES": args.stages, "BF16": False, "MAGIC": 0x6400, "NATURAL": args.natural, "SWAP": args.swap}
        elems = args.block_n * 128
    types = {a: t.replace("fp16", "bf16") for a, t in TYPES.items()} if args.bf16 else TYPES
    sig = {**types, **{a: "i32" for a in ints}, **{c: "constexpr" for c in const}}
    sig = {a: sig[a] for a in fn.arg_names}  # the kernel's own argument order
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(sig)
             if a in POINTERS or (a in ints and a not in ("M", "n_split"))}
    kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": args.warps})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(nvdisasm), "-c", cubin], capture_output=True, text=True, check=True).stdout
    body = loop_body(sass)
    if args.dump:
        args.dump.write_text("\n".join(body) + "\n")
        args.dump.with_suffix(".ptx").write_text(kernel.asm["ptx"])
    per_elem = len(body) * args.warps * 32 / elems
    ops = collections.Counter(opcode(x) for x in body).most_common(args.top)
    regs = max(map(int, re.findall(r"\bR(\d+)\b", sass))) + 1
    spills = len(re.findall(r"\b[LS]TL(?:\.\w+)*\s", sass))
    print(f"{args.kernel} {const} warps={args.warps}: loop {len(body)} instructions, {per_elem:.2f} per element; "
          f"~{regs} registers, {spills} local-memory (spill) instructions; top: {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
