"""Decode attention as a CUDA-graphed decode step runs it (issue 8): RoPE + KV write + paged attention.

Per (batch, context) point, Llama-2-7B attention shapes (32 heads, head_dim 128; ``--kv-heads 8`` for GQA), fp16,
every sequence at the same context, the kernel given the graphs' ``max_seq_len`` bound (``--bound``, 4096 like a
Llama-2 engine) rather than the context:

- ``two_launches``: ``rotary_kv.rotary_and_write_kv`` then ``paged_decode_attention`` (plus its combine launch
  when it splits the context), as the model ran before the fused path;
- ``fused``: ``paged_decode_attention(..., rope=DecodeRope(...))``, one launch (plus the combine).

TB/s = the K/V bytes of the whole context (``batch * context * kv_heads * 128 * 2 * 2``) over the time; at short
contexts both rows are launch- and latency-bound, so us matter there, not TB/s. On a tree without
``DecodeRope`` only ``two_launches`` runs (same-call comparisons against older trees).

Timing: ``inlaid.bench.graph_timing`` (one CUDA graph; 8 copies of the inputs per graph so a replay is not one
launch, distinct caches so the L2 holds at most a few of them at long contexts).

    python benchmarks/decode_attention_bench.py --out benchmarks/results/decode_attention_h100
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.bench.pages import write_results
from inlaid.kernels import paged_attention_triton as pk  # noqa: E402
from inlaid.kernels import rotary_kv  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 32, 128, 16
POINTS = ((1, 64), (1, 512), (1, 2048), (4, 1024), (8, 512), (32, 64), (32, 512), (32, 2048))


def step_inputs(batch: int, ctx: int, kv_heads: int, gen: torch.Generator) -> dict:
    """One decode step's tensors: caches with ``ctx - 1`` keys per sequence, the new token's q/k/v/cos/sin/slot."""
    blocks = -(-ctx // BLOCK)
    cache = torch.randn(2, batch * blocks + 1, BLOCK, kv_heads, HEAD_DIM, generator=gen, device="cuda",
                        dtype=torch.float16)
    tables = torch.randperm(batch * blocks, generator=gen, device="cuda").reshape(batch, blocks).to(torch.int32)
    pos = ctx - 1
    slots = tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK
    angles = torch.rand(batch, 1, HEAD_DIM // 2, generator=gen, device="cuda") * 6.3
    angles = torch.cat((angles, angles), dim=-1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float16)

    return {"q": rnd(batch, HEADS, HEAD_DIM), "k": rnd(batch, kv_heads, HEAD_DIM), "v": rnd(batch, kv_heads, HEAD_DIM),
            "cos": angles.cos().half(), "sin": angles.sin().half(),
            "cache": cache, "tables": tables, "lens": torch.full((batch,), ctx, device="cuda", dtype=torch.int32),
            "slots": slots}


def two_launches(s: dict, bound: int) -> torch.Tensor:
    q, _ = rotary_kv.rotary_and_write_kv(s["q"], s["k"], s["v"], s["cos"], s["sin"], s["cache"], s["slots"])
    return pk.paged_decode_attention(q, s["cache"], s["tables"], s["lens"], bound, HEAD_DIM**-0.5)


def fused(s: dict, bound: int) -> torch.Tensor:
    rope = pk.DecodeRope(s["k"], s["v"], s["cos"], s["sin"], s["slots"])
    return pk.paged_decode_attention(s["q"], s["cache"], s["tables"], s["lens"], bound, HEAD_DIM**-0.5, rope=rope)


def time_point(batch: int, ctx: int, kv_heads: int, bound: int, copies: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(batch * 7919 + ctx)
    steps = [step_inputs(batch, ctx, kv_heads, gen) for _ in range(copies)]
    row = {"batch": batch, "context": ctx, "kv_heads": kv_heads, "bound": bound,
           "splits": pk.default_num_splits(batch, kv_heads, bound)}
    kv_bytes = batch * ctx * kv_heads * HEAD_DIM * 2 * 2
    impls = {"two_launches": two_launches}
    if hasattr(pk, "DecodeRope"):
        impls["fused"] = fused
        ref = two_launches(steps[0], bound)  # same inputs (the new key lands in the same slot both ways)
        got = fused(steps[0], bound)
        row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
    for name, fn in impls.items():
        us = graph_time_us([lambda s=s, fn=fn: fn(s, bound) for s in steps])
        row[f"{name}_us"] = round(us, 2)
        row[f"{name}_TBps"] = round(kv_bytes / (us * 1e-6) / 1e12, 3)
    if "fused_us" in row:
        row["two_launches_over_fused"] = round(row["two_launches_us"] / row["fused_us"], 3)
    print(json.dumps(row), flush=True)
    return row


SWEEP_POINTS = ((1, 64), (1, 2048), (4, 1024), (32, 64), (32, 512), (32, 2048))


def sweep_point(batch: int, ctx: int, kv_heads: int, bound: int, copies: int) -> dict:
    """The fused launch at every ``DecodeConfig`` of a small grid, at the default split count and twice it."""
    gen = torch.Generator(device="cuda").manual_seed(batch * 7919 + ctx)
    steps = [step_inputs(batch, ctx, kv_heads, gen) for _ in range(copies)]
    default = pk.default_num_splits(batch, kv_heads, bound)
    rows = []
    for splits in (default, 2 * default):
        for bt in (32, 64):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    cfg = pk.DecodeConfig(bt, warps, stages)

                    def call(s: dict, cfg=cfg, splits=splits) -> torch.Tensor:
                        rope = pk.DecodeRope(s["k"], s["v"], s["cos"], s["sin"], s["slots"])
                        return pk.paged_decode_attention(s["q"], s["cache"], s["tables"], s["lens"], bound,
                                                         HEAD_DIM**-0.5, num_splits=splits, rope=rope, config=cfg)

                    us = graph_time_us([lambda s=s: call(s) for s in steps])
                    rows.append({"splits": splits, "block_t": bt, "warps": warps, "stages": stages, "us": round(us, 2)})
    installed = pk.default_config(HEAD_DIM, bound)
    base = next(r["us"] for r in rows if r["splits"] == default
                and pk.DecodeConfig(r["block_t"], r["warps"], r["stages"]) == installed)
    best = min(rows, key=lambda r: r["us"])
    out = {"batch": batch, "context": ctx, "default_us": base, "best": best, "default_over_best": round(base / best["us"], 3),
           "configs": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "configs"}), flush=True)
    return out


def markdown(res: dict) -> str:
    cols = ["batch", "context", "splits", "two_launches_us", "fused_us", "two_launches_over_fused",
            "two_launches_TBps", "fused_TBps", "max_abs_diff"]
    lines = [f"# Decode attention with RoPE + KV write, Llama-2-7B heads ({res['device']}, torch {res['torch']}, "
             f"triton {res['triton']})", "",
             f"Command: `{res['command']}` ({res['seconds']:.0f} s). us per decode step's attention of one layer "
             f"(graph-timed), fp16, {res['kv_heads']} KV heads, kernel given the graphs' bound {res['bound']} as "
             "max_seq_len; `two_launches` = rotary_and_write_kv + paged_decode_attention, `fused` = one launch "
             "with `rope=` (both plus the combine launch when `splits` > 1); TB/s of the context's K/V bytes.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if res.get("sweep"):
        lines += ["", "Sweep of the fused launch (`--sweep`: block_t 32/64, warps 2/4/8, stages 1/2/3, the default "
                  "split count and twice it), us:", "",
                  "| batch | context | default | best | default / best | best config |", "|---|---|---|---|---|---|"]
        for r in res["sweep"]:
            b = r["best"]
            lines.append(f"| {r['batch']} | {r['context']} | {r['default_us']} | {b['us']} | {r['default_over_best']} | "
                         f"splits {b['splits']}, block_t {b['block_t']}, warps {b['warps']}, stages {b['stages']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--bound", type=int, default=4096, help="max_seq_len given to the kernel (a graph's bound)")
    ap.add_argument("--copies", type=int, default=8, help="input copies per graph")
    ap.add_argument("--points", default=",".join(f"{b}:{c}" for b, c in POINTS), help="batch:context pairs")
    ap.add_argument("--sweep", action="store_true", help="also time the fused launch over a grid of DecodeConfigs")
    ap.add_argument("--sweep-points", default=",".join(f"{b}:{c}" for b, c in SWEEP_POINTS),
                    help="batch:context pairs of --sweep")
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_attention_bench needs CUDA", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = [time_point(int(b), int(c), args.kv_heads, args.bound, args.copies)
            for b, c in (p.split(":") for p in args.points.split(","))]
    sweep = ([sweep_point(int(b), int(c), args.kv_heads, args.bound, args.copies)
              for b, c in (p.split(":") for p in args.sweep_points.split(","))] if args.sweep else [])
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "command": "python " + " ".join(sys.argv), "seconds": time.time() - t0, "kv_heads": args.kv_heads,
           "bound": args.bound, "rows": rows, "sweep": sweep}
    write_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
