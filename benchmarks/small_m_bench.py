"""Small-batch W4A16 (M = 1..16, 32 for reference) on the GPU as a decode step sees it (issue 8): fp16 cuBLAS,
the installed dispatch (``w4a16_linear`` with the committed tuned table) and every candidate of the new
small-M kernel (``inlaid.kernels.w4a16_small_m.SMALL_M_CONFIGS``), on Llama-2-7B shapes, group 128, fp16.

Timing (as ``gemv_m1_bench.py``): one CUDA graph holding one call per weight copy, with more copies than 3x
the L2 so that every call reads its weights from DRAM, replayed 5 times; best replay / calls. Every candidate
is first checked against the torch reference (``gptq_linear`` in fp32, output NaN-poisoned, rel. error
< 1e-2); a candidate that fails is reported as wrong/failed and not timed. A time budget (``--budget-s``)
stops timing further candidates (reported as skipped) so one device call stays short.

    python benchmarks/small_m_bench.py --out benchmarks/results/small_m_h200    # CUDA, < 120 s on an H200
    python benchmarks/small_m_bench.py --out /tmp/sm --device cpu --quick       # interpreter: correctness only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
QUICK_SHAPES = [(256, 64), (576, 48)]
MS = (1, 2, 4, 8, 16, 32)
GS = 128
REL_TOL = 1e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json (every measurement) and <out>.md")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, correctness only (required with cpu)")
    ap.add_argument("--configs", default="", help="comma-separated SMALL_M_CONFIGS names (default: all)")
    ap.add_argument("--budget-s", type=float, default=105.0, help="stop timing candidates after this long")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        ap.error("--device cpu only checks correctness under the Triton interpreter: add --quick")
    return args


class Bench:
    """One run: the environment, the candidates and every result row (``rows``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from inlaid.kernels import w4a16_small_m as sm

        self.args, self.torch, self.sm = args, torch, sm
        self.dev = args.device
        names = [c for c in args.configs.split(",") if c] or list(sm.SMALL_M_CONFIGS)
        unknown = sorted(set(names) - set(sm.SMALL_M_CONFIGS))
        if unknown:
            raise ValueError(f"unknown --configs {unknown}; known: {sorted(sm.SMALL_M_CONFIGS)}")
        self.names = names
        self.rows: list[dict] = []
        self.t0 = time.time()

    def log(self, **kw) -> None:
        kw["t_s"] = round(time.time() - self.t0, 1)
        self.rows.append(kw)
        print(json.dumps(kw), flush=True)

    def random_w4(self, k: int, n: int) -> dict:
        torch = self.torch
        hi, g = 2**31 - 1, -(-k // GS)
        return {"qweight": torch.randint(-hi - 1, hi, (k // 8, n), dtype=torch.int32, device=self.dev),
                "qzeros": torch.randint(-hi - 1, hi, (g, n // 8), dtype=torch.int32, device=self.dev),
                "scales": (torch.rand(g, n, device=self.dev) * 0.002 + 0.0005).half(),
                "g_idx": torch.arange(k, device=self.dev, dtype=torch.int32) // GS}  # fmt: skip

    def reference(self, x, c: dict):  # noqa: ANN001, ANN201
        from inlaid.kernels import gptq_dequant

        return gptq_dequant.gptq_linear(x.float(), c["qweight"], c["qzeros"], c["scales"].float(), c["g_idx"], 4)

    def candidate_call(self, name: str, x, out):  # noqa: ANN001, ANN201
        sm = self.sm
        return lambda p: sm.w4a16_small_m(x, p.qweight, p.qzeros, p.scales, p.perm, p.group_size, name, out=out,
                                          locks=p.locks)  # fmt: skip

    def check(self, call, packed0, ref, out) -> float:  # noqa: ANN001
        out.fill_(float("nan"))
        call(packed0)
        if not bool(self.torch.isfinite(out).all()):
            return float("inf")
        return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def graph_time(torch, call, copies, reps: int = 5) -> float:  # noqa: ANN001
    """us per call: a CUDA graph of one call per weight copy (``inlaid.bench.graph_timing``); ``torch`` is
    unused here and kept so tests can swap in a host timer with the same signature."""
    from inlaid.bench.graph_timing import graph_time_us

    return graph_time_us([lambda c=c: call(c) for c in copies], reps)


def l2_bytes(torch) -> int:  # noqa: ANN001
    """The GPU's L2 size (60 MiB if torch does not report it)."""
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (60 << 20)


def w4_bytes(k: int, n: int) -> int:
    g = -(-k // GS)
    return k * n // 2 + g * n * 2 + g * n // 2


def run_quick(b: Bench) -> None:
    """Interpreter (or GPU) correctness of every candidate on tiny shapes; nothing timed."""
    from inlaid.kernels import w4a16_gemm as wk

    for k, n in QUICK_SHAPES:
        c = b.random_w4(k, n)
        packed = wk.prepare_w4(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], GS)
        for m in (1, 2, 4, 8, 16):
            x = b.torch.randn(m, k, device=b.dev, dtype=b.torch.float16)
            ref = b.reference(x, c)
            out = b.torch.empty(m, n, device=b.dev, dtype=b.torch.float16)
            for name in b.names:
                err = b.check(b.candidate_call(name, x, out), packed, ref, out)
                b.log(event="check" if err < REL_TOL else "wrong", shape=f"{k}x{n}", m=m, impl=name, err=err)


def run_cuda(b: Bench) -> None:
    from inlaid.kernels import w4a16_gemm as wk

    torch, dev = b.torch, b.dev
    l2 = l2_bytes(torch)
    for k, n in SHAPES:
        wb = w4_bytes(k, n)
        copies = [b.random_w4(k, n) for _ in range(max(2, -(-3 * l2 // wb)))]
        packed = [wk.prepare_w4(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], GS) for c in copies]
        dcopies = [torch.randn(k, n, device=dev, dtype=torch.float16) for _ in range(max(2, -(-3 * l2 // (2 * k * n))))]
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            out = torch.empty(m, n, device=dev, dtype=torch.float16)
            ref = b.reference(x, copies[0])
            t_cub = graph_time(torch, lambda d, x=x, out=out: torch.matmul(x, d, out=out), dcopies)
            shape = f"{k}x{n}"
            b.log(event="time", shape=shape, m=m, impl="cublas_fp16", us=t_cub, tbps=2 * k * n / t_cub / 1e6)
            time_one(b, shape, m, "installed", lambda p, x=x: wk.w4a16_linear(x, p), packed, ref, None, t_cub, wb)
            if m > b.sm.SMALL_M_MAX:
                continue
            for name in b.names:
                if time.time() - b.t0 > b.args.budget_s:
                    b.log(event="skipped", shape=shape, m=m, impl=name, reason="time budget")
                    continue
                time_one(b, shape, m, name, b.candidate_call(name, x, out), packed, ref, out, t_cub, wb)
        del copies, packed, dcopies
        torch.cuda.empty_cache()


def time_one(b: Bench, shape: str, m: int, impl: str, call, packed, ref, out, t_cub: float, wb: int) -> None:  # noqa: ANN001
    try:
        if out is None:  # the installed dispatch returns a fresh tensor
            y = call(packed[0])
            err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        else:
            err = b.check(call, packed[0], ref, out)
        if not err < REL_TOL:
            b.log(event="wrong", shape=shape, m=m, impl=impl, err=err)
            return
        t = graph_time(b.torch, call, packed)
        b.log(event="time", shape=shape, m=m, impl=impl, us=t, tbps=wb / t / 1e6, x_cublas=t_cub / t, err=err)
    except Exception as e:  # noqa: BLE001 - one failing candidate must not stop the others
        b.log(event="fail", shape=shape, m=m, impl=impl, err=repr(e)[:300])


def to_markdown(b: Bench, env: dict, seconds: float) -> str:
    times = {(r["shape"], r["m"], r["impl"]): r for r in b.rows if r["event"] == "time"}
    lines = [f"# Small-M W4A16 ({env['device']}, torch {env['torch']}, triton {env['triton']})", "",
             f"Command: `{env['command']}` ({seconds:.0f} s). "]
    if b.args.quick:
        lines[-1] += ("Correctness only (tiny shapes, fp16, group 128; on CPU under the Triton interpreter): "
                      "nothing is timed.")
        lines += ["", "| shape | M | impl | result | rel. err |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['m']} | {r['impl']} | {r['event']} | {r['err']:.1e} |" for r in b.rows
                  if r["event"] in ("check", "wrong")]  # fmt: skip
        return "\n".join(lines) + "\n"
    lines[-1] += (f"fp16, group 128. CUDA graph of one call per weight copy (copies > 3x L2: every call reads DRAM),"
                  f" best of 5 replays. x cuBLAS = fp16 cuBLAS time / this time; TB/s = packed weight + scales + "
                  f"zeros bytes / time (cuBLAS: fp16 weight bytes); % peak vs {env['peak_tbps']} TB/s "
                  "(`inlaid.bench.hardware`). `installed` = `w4a16_linear` with the committed tuned table; the "
                  "other names are `SMALL_M_CONFIGS` candidates (checked against the reference first).")
    lines += ["", "## Best per shape and M", "", "| shape | M | cuBLAS us | installed us (x) | best candidate | "
              "us | x cuBLAS | TB/s | % peak |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in times.values()):
        for m in MS:
            cub, inst = times.get((shape, m, "cublas_fp16")), times.get((shape, m, "installed"))
            cands = [r for (s, mm, i), r in times.items() if s == shape and mm == m and i in b.names]
            best = min(cands, key=lambda r: r["us"], default=None)
            if cub is None:
                continue
            inst_s = f"{inst['us']:.1f} ({inst['x_cublas']:.2f}x)" if inst else "-"
            best_s = (f"{best['impl']} | {best['us']:.1f} | {best['x_cublas']:.2f} | {best['tbps']:.2f} | "
                      f"{100 * best['tbps'] / env['peak_tbps']:.0f}%") if best else "- | - | - | - | -"
            lines.append(f"| {shape} | {m} | {cub['us']:.1f} | {inst_s} | {best_s} |")
    lines += ["", "## Every measurement", "", "| shape | M | impl | us | x cuBLAS | TB/s | % peak | rel. err |",
              "|---|---|---|---|---|---|---|---|"]
    for r in b.rows:
        if r["event"] == "time":
            lines.append(f"| {r['shape']} | {r['m']} | {r['impl']} | {r['us']:.2f} | {r.get('x_cublas', 1.0):.2f} | "
                         f"{r['tbps']:.2f} | {100 * r['tbps'] / env['peak_tbps']:.0f}% | {r.get('err', 0.0):.1e} |")
        elif r["event"] in ("wrong", "fail", "skipped"):
            why = r.get("reason") or (f"rel. err {r['err']:.2g}" if r["event"] == "wrong" else r.get("err", ""))
            lines.append(f"| {r['shape']} | {r['m']} | {r['impl']} | {r['event']}: {why} | | | | |")
    return "\n".join(lines) + "\n"


def environment(b: Bench, argv: list[str]) -> dict:
    import triton

    from inlaid.bench.hardware import peak_bandwidth_tbps

    torch = b.torch
    name = torch.cuda.get_device_name() if b.dev == "cuda" else "CPU (Triton interpreter)"
    return {"device": name, "peak_tbps": peak_bandwidth_tbps(name), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(["python benchmarks/small_m_bench.py", *argv]),
            "configs": {n: b.sm.SMALL_M_CONFIGS[n].to_dict() for n in b.names}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cpu":  # must precede the first `import triton`
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from inlaid.bench.pages import write_results

    b = Bench(args)
    if args.device == "cuda" and not b.torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU (use --device cpu --quick here)")
    env = environment(b, argv)
    print(json.dumps({"event": "env", **env}), flush=True)
    try:
        run_quick(b) if args.quick else run_cuda(b)
    finally:
        seconds = time.time() - b.t0
        write_results(args.out, {**env, "seconds": seconds, "rows": b.rows}, to_markdown(b, env, seconds), indent=0,
                      echo=False)
    bad = [r for r in b.rows if r["event"] in ("wrong", "fail")]
    print(f"done in {seconds:.0f} s; {len(bad)} wrong/failed", flush=True)
    return 1 if args.quick and bad else 0


if __name__ == "__main__":
    sys.exit(main())
