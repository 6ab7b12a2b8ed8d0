"""Fused per-layer ops vs their torch references (issue 8): time and exactness at Llama-2-7B shapes.

Ops (``inlaid/kernels``): ``rms_norm`` with the residual add (x2 per layer), ``silu_mul`` (x1),
``rotary_and_write_kv`` (x1); the reference of each is what the model ran before (torch ops).
Shapes: hidden 4096, intermediate 11008, 32 heads of 128, 32 KV heads (Llama-2-7B), T = 1 and 32 (decode)
and 2048 (prefill), fp16. Exactness is checked in fp16 and bf16 at every T.

Timing on CUDA: one CUDA graph holding ``--calls`` calls of the op (activations stay in L2, as in a decode
step), replayed 5 times, best replay / calls: the op's GPU time with no launch overhead, like a graphed
decode step. On CPU (``--device cpu --quick``, a smoke test of this script) the kernels run in Triton's
interpreter and the times are wall-clock of the interpreter: meaningless as speed, reported as such.

    python benchmarks/fused_ops_bench.py --out benchmarks/results/fused_ops_h200     # GPU, < 60 s
    python benchmarks/fused_ops_bench.py --device cpu --quick --out /tmp/fused_ops    # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from inlaid.bench.pages import write_results

LAYERS = 32  # Llama-2-7B: per-layer savings x 32 = per decode step


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.md and PREFIX.json")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--calls", type=int, default=50, help="op calls per CUDA graph")
    return p.parse_args(argv)


def shapes(quick: bool) -> dict:
    if quick:
        return dict(hidden=96, inter=200, heads=4, kv_heads=2, head_dim=32, ts=[1, 7])
    return dict(hidden=4096, inter=11008, heads=32, kv_heads=32, head_dim=128, ts=[1, 32, 2048])


def graph_us(fn: Callable[[], object], calls: int, reps: int = 5) -> float:
    """GPU us per call: a CUDA graph of ``calls`` calls, replayed ``reps`` times, best replay / calls."""
    from inlaid.bench.graph_timing import graph_time_us

    return graph_time_us([fn] * calls, reps, warmup=3)


def wall_us(fn: Callable[[], object], reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e6)
    return best


def ulp_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max ulp distance and number of differing elements (ordered-integer view of the floats)."""
    bits = a.element_size() * 8
    itype = {16: torch.int16, 32: torch.int32}[bits]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(itype).long()
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)

    d = (ordered(a) - ordered(b)).abs()
    return {"equal": bool(torch.equal(a, b)), "max_ulp": int(d.max().item()), "differing": int((d > 0).sum().item()),
            "elements": d.numel()}


def inputs(sh: dict, t: int, dtype: torch.dtype, dev: str) -> dict:
    g = torch.Generator().manual_seed(t)
    h, d, nh, kvh = sh["hidden"], sh["head_dim"], sh["heads"], sh["kv_heads"]
    blocks = -(-t // 16) + 1
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.randint(0, 4000, (t,), generator=g)
    emb = torch.cat((pos[:, None] * inv, pos[:, None] * inv), dim=-1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dev, dtype)  # noqa: E731
    return dict(x=rnd(t, h), res=rnd(t, h), w=(torch.rand(h, generator=g) + 0.5).to(dev, dtype),
                gate=rnd(t, sh["inter"], scale=4.0), up=rnd(t, sh["inter"]),
                q=rnd(t, nh, d), k=rnd(t, kvh, d), v=rnd(t, kvh, d),
                cos=emb.cos().to(dev, dtype)[:, None], sin=emb.sin().to(dev, dtype)[:, None],
                cache=torch.zeros(2, blocks, 16, kvh, d, device=dev, dtype=dtype),
                slots=torch.randperm(blocks * 16, generator=g)[:t].to(dev))


def ops(m: dict, on_cuda: bool) -> dict:
    """name -> (fused call, reference call) taking the inputs dict."""
    rn, sm, rk = m["rms_norm"], m["silu_mul"], m["rotary_kv"]
    if on_cuda:  # the dispatchers, as the model calls them (they pick the kernels on CUDA fp16/bf16)
        norm, silu, rope = rn.rms_norm, sm.silu_mul, rk.rotary_and_write_kv
    else:  # CPU: the dispatchers would pick the references; call the kernels (interpreter) directly
        norm, silu, rope = rn.rms_norm_triton, sm.silu_mul_triton, rk.rotary_and_write_kv_triton
    return {
        "rms_norm+residual": (lambda a: norm(a["x"], a["w"], 1e-5, a["res"]),
                              lambda a: rn.rms_norm_ref(a["x"], a["w"], 1e-5, a["res"])),
        "silu_mul": (lambda a: silu(a["gate"], a["up"]), lambda a: sm.silu_mul_ref(a["gate"], a["up"])),
        "rotary+write_kv": (lambda a: rope(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["cache"], a["slots"]),
                            lambda a: rk.rotary_and_write_kv_ref(a["q"], a["k"], a["v"], a["cos"], a["sin"],
                                                                 a["cache"], a["slots"])),
    }


PER_LAYER = {"rms_norm+residual": 2, "silu_mul": 1, "rotary+write_kv": 1}


def check(name: str, fused: Callable, ref: Callable, a: dict) -> dict:
    """Exactness of one op: output(s) and, for the rotary op, the cache contents."""
    if name == "rotary+write_kv":
        a2 = dict(a, cache=a["cache"].clone())
        (qf, kf), (qr, kr) = fused(a), ref(a2)
        return {"q_rot": ulp_stats(qf, qr), "k_rot": ulp_stats(kf, kr), "cache": ulp_stats(a["cache"], a2["cache"])}
    got, want = fused(a), ref(a)
    if isinstance(got, tuple):
        return {"out": ulp_stats(got[0], want[0]), "new_residual": ulp_stats(got[1], want[1])}
    return {"out": ulp_stats(got, want)}


def run(args: argparse.Namespace, m: dict) -> list[dict]:
    sh, on_cuda = shapes(args.quick), args.device == "cuda"
    rows = []
    for t in sh["ts"]:
        for dtype in (torch.float16, torch.bfloat16):
            a = inputs(sh, t, dtype, args.device)
            for name, (fused, ref) in ops(m, on_cuda).items():
                row = {"op": name, "T": t, "dtype": str(dtype).split(".")[-1], "check": check(name, fused, ref, a)}
                if dtype == torch.float16:  # timed in fp16 only
                    calls = args.calls if t <= 64 else 10  # prefill: the reference's temporaries fill the graph pool
                    timer = (lambda f: graph_us(lambda: f(a), calls)) if on_cuda else (lambda f: wall_us(lambda: f(a)))
                    row["fused_us"], row["ref_us"] = timer(fused), timer(ref)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _word(v: dict) -> str:
    if v["equal"]:
        return "equal"
    return f"{v['differing']}/{v['elements']} differ, max {v['max_ulp']} ulp"


def exact_word(c: dict) -> str:
    return ", ".join(f"{k}: {_word(v)}" for k, v in c.items())


def write(args: argparse.Namespace, rows: list[dict], meta: dict) -> None:
    unit = "GPU us per call (CUDA-graph replay)" if args.device == "cuda" else "CPU wall us (Triton INTERPRETER: not a speed)"
    lines = [f"# Fused per-layer ops vs torch references ({meta['device']})", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}. Times: {unit}, fp16.", "",
             "| op | T | fused | torch ref | speed-up |", "|---|---|---|---|---|"]
    for r in rows:
        if "fused_us" in r:
            lines.append(f"| {r['op']} | {r['T']} | {r['fused_us']:.1f} | {r['ref_us']:.1f} | "
                         f"{r['ref_us'] / max(r['fused_us'], 1e-9):.2f}x |")
    lines += ["", "Per decoder layer (2 norms with residual add, 1 silu*up, 1 rotary + KV write), x 32 layers:", "",
              "| T | fused us/layer | ref us/layer | saved per 32-layer step (us) |", "|---|---|---|---|"]
    for t in sorted({r["T"] for r in rows}):
        tr = [r for r in rows if r["T"] == t and "fused_us" in r]
        f = sum(PER_LAYER[r["op"]] * r["fused_us"] for r in tr)
        rf = sum(PER_LAYER[r["op"]] * r["ref_us"] for r in tr)
        lines.append(f"| {t} | {f:.1f} | {rf:.1f} | {(rf - f) * LAYERS:.0f} |")
    lines += ["", "Exactness vs the torch reference (ulp = units in the last place of the dtype):", ""]
    lines += [f"- {r['op']} T={r['T']} {r['dtype']}: {exact_word(r['check'])}" for r in rows]
    json_path, md_path = write_results(args.out, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n", echo=False)
    print(f"wrote {md_path} and {json_path}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    elif not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: use --device cpu --quick for the smoke test")
    import triton

    from inlaid.kernels import rms_norm, rotary_kv, silu_mul

    t0 = time.time()
    m = {"rms_norm": rms_norm, "silu_mul": silu_mul, "rotary_kv": rotary_kv}
    rows = run(args, m)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    cmd = "python benchmarks/fused_ops_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"device": device, "command": cmd, "torch": torch.__version__,
            "triton": triton.__version__, "seconds": round(time.time() - t0, 1), "shapes": shapes(args.quick),
            "calls_per_graph": args.calls}
    write(args, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
