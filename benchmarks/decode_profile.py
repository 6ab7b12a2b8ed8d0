"""Where a decode step's GPU time goes (issue 8's profile evidence): kernel time per step by category.

Builds the dummy Llama-2-7B-shaped W4 g128 engine of ``e2e_decode.py`` (random GPTQ tensors, rank-16 adapters on
all 7 projections), runs the prefill and a few warm-up decode steps, then records ``--steps`` decode steps
(CUDA graphs on, as served) under ``torch.profiler`` (CUPTI reports the kernels a graph replay launches).
Per step: the wall time, the summed kernel time, and the kernel time per category (W4 GEMV / tensor-core /
tiled / dequantize, cuBLAS, attention, fused norm/SwiGLU/RoPE, LoRA, sampling and the rest); the gap between
wall and kernel time is where the GPU waits for the host or between kernels.

    python benchmarks/decode_profile.py --out benchmarks/results/decode_profile_h200   # GPU, ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_baseline import MODELS  # noqa: E402
from e2e_decode import build_engine, make_w4  # noqa: E402

from inlaid.bench.pages import write_results
from inlaid.sampling import SamplingParams  # noqa: E402

CATEGORIES = (  # first match wins
    ("w4 tc-layout M=1 GEMV", r"_w4_tcl_m1_(group_)?kernel"),
    ("w4 tc-layout tensor-core", r"_w4_tcl_(group_)?kernel"),
    ("w4 split-K cast / reduce", r"_cast_sums_kernel|_splitk_reduce_kernel"),
    ("w4 gemv (M=1)", r"_w4_gemv_m1_(group_)?kernel"),
    ("w4 tensor-core", r"_w4_tc_(nat_|group_)?kernel"),
    ("w4 small-M / gemv", r"_w4_(small_m|gemv)_kernel"),
    ("w4 tiled gemm", r"_w4a16_kernel"),
    ("w4 dequantize", r"dequant"),
    ("lora", r"sgmv|segment|lora|shrink|expand"),
    ("attention", r"paged|attention|attn|_decode_kernel|_combine_kernel"),
    ("fused norm/swiglu/rope", r"rms|silu|rotary"),
    ("cuBLAS (lm_head, dense)", r"gemm|gemv|cutlass|sm90_|nvjet|cublas"),
    ("sampling / softmax / reductions", r"softmax|argmax|reduce|topk|sort|sampl"),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other (copies, elementwise, index)"


def profile_row(eng, batch: int, n_ad: int, steps: int, prompt_len: int = 32) -> dict:  # noqa: ANN001
    arch = eng.parts.arch
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(3, arch.vocab_size, (prompt_len,), generator=gen).tolist()
        eng.add_request(f"p{batch}-{n_ad}-{i}", prompt, params, f"a{i % n_ad}" if n_ad else None)
    for _ in range(4):  # prefill + warm-up decodes (compiles, graph capture)
        eng.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    while eng.has_unfinished_requests():
        eng.step()
    by_cat: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        cat = category(ev.name)
        by_cat[cat] = by_cat.get(cat, 0.0) + ev.device_time
        kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.device_time
    total = sum(by_cat.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"batch": batch, "adapters": n_ad, "prompt_len": prompt_len, "steps": steps,
            "wall_us_per_step": 1e6 * wall / steps,
            "kernel_us_per_step": total / steps,
            "by_category_us_per_step": {k: v / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels_us_per_step": {k[:90]: v / steps for k, v in top}}


def to_markdown(res: dict) -> str:
    lines = [f"# Decode step profile, Llama-2-7B shapes, W4 g128, CUDA graphs ({res['device']})", "",
             f"Command: `{res['command']}` ({res['seconds']:.0f} s). us per decode step, from torch.profiler (CUPTI) "
             "over the recorded steps; `idle` = wall - kernel time.", ""]
    for r in res["rows"]:
        lines += [f"## batch {r['batch']}, {r['adapters']} adapters, prompt {r.get('prompt_len', 32)}: wall {r['wall_us_per_step']:.0f} us, kernels "
                  f"{r['kernel_us_per_step']:.0f} us, idle {r['wall_us_per_step'] - r['kernel_us_per_step']:.0f} us",
                  "", "| category | us per step | share of kernel time |", "|---|---|---|"]
        lines += [f"| {c} | {v:.0f} | {v / r['kernel_us_per_step']:.1%} |" for c, v in r["by_category_us_per_step"].items()]
        lines += ["", "| top kernels | us per step |", "|---|---|"]
        lines += [f"| `{k}` | {v:.0f} |" for k, v in r["top_kernels_us_per_step"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rows", default="1:0,32:0,32:32",
                    help="batch:adapters[:prompt_len] (prompt_len default 32: contexts 33-56)")
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    t0 = time.time()
    eng = build_engine(MODELS["llama2-7b"], args.device, 1024, 32)
    make_w4(eng.parts.model, args.device, eng.parts.dtype)
    rows = []
    for pair in args.rows.split(","):  # adapter-free rows first: a loaded slot makes LoRA active
        batch, n_ad, *prompt = (int(v) for v in pair.split(":"))
        rows.append(profile_row(eng, batch, n_ad, args.steps, *prompt))
        print(json.dumps(rows[-1]), flush=True)
    res = {"device": torch.cuda.get_device_name(), "seconds": time.time() - t0, "rows": rows,
           "command": "python benchmarks/decode_profile.py " + " ".join(sys.argv[1:])}
    write_results(args.out, res, to_markdown(res), echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
