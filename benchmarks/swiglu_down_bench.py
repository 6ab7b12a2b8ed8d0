"""SwiGLU's product inside the down projection's W4 launch at batch 1 (issue 8): one launch instead of two.

Llama-2-7B down_proj (K = 11008, N = 4096, W4 g128, tensor-core layout), one decode token, fp16 by default:

- ``two_launches``: ``silu_mul(gate, up)`` then ``w4a16_tcl(product, W)``, as the model ran before;
- ``swiglu``: ``w4a16_tcl(gate, W, swiglu=SwiGLU(up))``: the GEMV's programs compute the product as they load
  their input;
- ``swiglu_store``: the same, column tile 0 also storing the product (``SwiGLU(up, out)``: what the model asks for
  whenever a LoRA hook is attached, so the hook can read it);
- ``*_lora``: the same with a rank-16 LoRA shrink of the product running inside the W4 launch (``LoRAShrink``),
  as a decode step with an adapter runs it.

Each row is checked against ``two_launches`` (max |diff|: split-K sums in another order, so not 0) and timed in
one CUDA graph over ``--copies`` weight copies (more bytes than the L2 holds); TB/s = the weight's bytes (words,
scales, zeros) over the time, against the device's copy bandwidth (``inlaid.bench.hardware``: 3.0 TB/s on an H100).

    python benchmarks/swiglu_down_bench.py --out benchmarks/results/swiglu_down_h100
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.bench.hardware import peak_bandwidth_tbps  # noqa: E402
from inlaid.bench.pages import write_results
from inlaid.bench.w4_inputs import random_w4  # noqa: E402
from inlaid.kernels import lora_sgmv_triton as lt  # noqa: E402
from inlaid.kernels import w4_layout  # noqa: E402
from inlaid.kernels.silu_mul import SwiGLU, silu_mul  # noqa: E402
from inlaid.kernels.w4a16_tcl import w4a16_tcl  # noqa: E402

K, N, GROUP = 11008, 4096, 128


def weight(dtype: torch.dtype) -> w4_layout.PackedW4:
    """A random W4 g128 weight [K, N] (``random_w4``) in the tensor-core layout, the served form of a 7B down_proj."""
    w = random_w4(K, N, GROUP)
    return w4_layout.prepare_w4(w["qweight"], w["qzeros"], w["scales"].to(dtype), None, GROUP, layout="tc")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=8, help="weight copies per graph")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("swiglu_down_bench needs CUDA", file=sys.stderr)
        return 2
    t0 = time.time()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [weight(dtype) for _ in range(args.copies)]
    copy_tbps = peak_bandwidth_tbps(torch.cuda.get_device_name())
    gate = torch.randn(1, K, generator=gen, device="cuda").mul(3).to(dtype)
    up = torch.randn(1, K, generator=gen, device="cuda").to(dtype)
    prod = torch.empty_like(gate)
    a = (torch.randn(4, 16, K, generator=gen, device="cuda") * 0.05).to(dtype)
    slots = torch.tensor([1], device="cuda", dtype=torch.int32)
    impls = {
        "two_launches": lambda w, s: w4a16_tcl(silu_mul(gate, up), w, shrink=s),
        "swiglu": lambda w, s: w4a16_tcl(gate, w, shrink=s, swiglu=SwiGLU(up)),
        "swiglu_store": lambda w, s: w4a16_tcl(gate, w, shrink=s, swiglu=SwiGLU(up, prod)),
    }
    w_bytes = sum(t.numel() * t.element_size() for t in (ws[0].qweight, ws[0].qzeros, ws[0].scales))
    ref = impls["two_launches"](ws[0], None).float()
    rows = []
    for lora in (False, True):
        base_us = None
        for name, fn in impls.items():
            diff = float((fn(ws[0], None).float() - ref).abs().max())
            us = graph_time_us([lambda w=w, fn=fn: fn(w, lt.LoRAShrink(a, slots) if lora else None) for w in ws])
            base_us = us if base_us is None else base_us
            row = {"row": name + ("_lora" if lora else ""), "us": round(us, 2), "two_launches_over_row":
                   round(base_us / us, 3), "TBps": round(w_bytes / (us * 1e-6) / 1e12, 3),
                   "share_of_copy": round(w_bytes / (us * 1e-6) / 1e12 / copy_tbps, 3), "max_abs_diff": diff}
            print(json.dumps(row), flush=True)
            rows.append(row)
    silu_us = graph_time_us([lambda: silu_mul(gate, up)] * args.copies)
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "command": "python " + " ".join(sys.argv), "seconds": time.time() - t0, "dtype": args.dtype,
           "weight_bytes": w_bytes, "copy_tbps": copy_tbps, "silu_mul_alone_us": round(silu_us, 2), "rows": rows}
    write_results(args.out, res, markdown(res))
    return 0


def markdown(res: dict) -> str:
    cols = ["row", "us", "two_launches_over_row", "TBps", "share_of_copy", "max_abs_diff"]
    lines = [f"# SwiGLU inside the 7B down_proj's W4 launch, batch 1 ({res['device']}, torch {res['torch']}, "
             f"triton {res['triton']})", "",
             f"Command: `{res['command']}` ({res['seconds']:.0f} s). us per call (graph-timed), {res['dtype']}, "
             f"K = {K}, N = {N}, W4 g{GROUP} tensor-core layout ({res['weight_bytes'] / 1e6:.1f} MB); TB/s of the "
             f"weight's bytes, share of a {res['copy_tbps']} TB/s device copy. `silu_mul` alone: "
             f"{res['silu_mul_alone_us']} us. Ratios against the `two_launches` row of the same block.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in res["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
