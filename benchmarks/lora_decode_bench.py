"""Multi-LoRA decode launches of one Llama-2-7B layer (issue 8's LoRA target): LoRA time vs the W4 base.

What ``LoRAPool``'s device path launches per layer at batch T (one adapter per token, all distinct, rank R on
all 7 projections): a shrink over the q/k/v group's shared A buffer, over o, over gate/up, over down, and the
expands. Rows, all in one run, timed over ``--layers`` layers of distinct weights (> 3x the L2 in total, so every
read is DRAM):

- ``w4_base``: the layer's 7 W4 g128 projections at M = T as the decode step runs them (``w4a16_linear_group``
  for q/k/v and gate/up, ``w4a16_linear`` for o and down; on CUDA the tensor-core layout);
- ``base+lora``: the base, then the 4 shrinks and 4 expand launches (``lora_expand_group`` for q/k/v
  and gate/up, ``lora_expand`` for o and down);
- ``base+lora, shrinks offered``: as the decode step runs it: every shrink offered to its base launch
  (``LoRAShrink``; the tensor-core-layout launches run them up to ``SHRINK_MAX_ROWS`` A rows), the expands as
  above;
- ``lora only`` (the LoRA launches alone) and, with ``--sweep``, their launch-parameter variants
  (``seven_expands`` is the layout before session 7: one expand per projection).

Every LoRA variant is checked against the default one (bit-identical sums are not expected across split counts:
rel. error < 1e-3).

    python benchmarks/lora_decode_bench.py --out benchmarks/results/lora_decode_h100   # GPU, ~20 s (--sweep ~1 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inlaid.bench.graph_timing import graph_time_us  # noqa: E402
from inlaid.bench.w4_inputs import random_w4  # noqa: E402
from inlaid.kernels import lora_sgmv_triton as lt  # noqa: E402
from inlaid.kernels import w4a16_gemm as wk  # noqa: E402

DEV = "cuda"
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
ROWS: list[dict] = []


def log(**kw) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def make_lora(slots: int, rank: int) -> dict:
    """A/B stacks laid out like the pool's (a group's A stacks share one [S, n*R, in] buffer)."""
    layer = {}
    for group in GROUPS:
        d_in = SHAPES[group[0]][0]
        layer[group] = {"a": torch.randn(slots, len(group) * rank, d_in, device=DEV, dtype=torch.float16) * 0.02,
                        "b": [torch.randn(slots, SHAPES[m][1], rank, device=DEV, dtype=torch.float16) * 0.02
                              for m in group],
                        "s": [torch.full((slots,), 2.0, device=DEV) for _ in group]}
    return layer


def make_base() -> dict:
    """The 7 W4 g128 weights of one layer, prepared as the server does (``serving_layout``)."""
    layer = {}
    for m, (k, n) in SHAPES.items():
        w = random_w4(k, n)
        layout = wk.serving_layout(w["qweight"], 128)
        layer[m] = wk.prepare_w4(w["qweight"], w["qzeros"], w["scales"], None, 128, layout=layout)
    return layer


def expand(group: tuple, g: dict, part: torch.Tensor, outs: dict, slots: torch.Tensor, rank: int, v: dict) -> None:
    """The group's expands from its shrink partials: one ``lora_expand_group`` launch, or one per projection."""
    kw = {"block_n": v.get("block_n", 128), "num_warps": v.get("expand_warps", 4)}
    if len(group) > 1 and not v.get("seven_expands"):
        lt.lora_expand_group(part, g["b"], g["s"], slots, [outs[m] for m in group], **kw)
    else:
        for j, m in enumerate(group):
            lt.lora_expand(part[:, :, j * rank:(j + 1) * rank], g["b"][j], g["s"][j], slots, outs[m], **kw)


def run_lora(lora: dict, xs: dict, outs: dict, slots: torch.Tensor, rank: int, v: dict) -> None:
    for group in GROUPS:
        g = lora[group]
        part = lt.lora_shrink_partials(xs[group], g["a"], slots, v.get("splits"), v.get("block_k", 128),
                                       v.get("shrink_warps", 4))
        expand(group, g, part, outs, slots, rank, v)


def base_group(base: dict, x: torch.Tensor, group: tuple, shrink: lt.LoRAShrink | None = None) -> dict:
    """One group's base projections as the decode step runs them (one grouped launch for q/k/v and gate/up), the
    launch offered ``shrink``."""
    if len(group) > 1:
        return dict(zip(group, wk.w4a16_linear_group(x, [base[m] for m in group], [None] * len(group),
                                                      shrink=shrink)))
    return {group[0]: wk.w4a16_linear(x, base[group[0]], shrink=shrink)}


def run_base(base: dict, xs: dict) -> dict:
    """The layer's base projections."""
    outs = {}
    for group in GROUPS:
        outs.update(base_group(base, xs[group], group))
    return outs


def run_separate(base: dict, lora: dict, xs: dict, slots: torch.Tensor, rank: int) -> dict:
    outs = run_base(base, xs)
    run_lora(lora, xs, outs, slots, rank, {})
    return outs


def run_offered(base: dict, lora: dict, xs: dict, slots: torch.Tensor, rank: int) -> dict:
    """As the decode step runs a layer: each shrink offered to its base launch (``LoRAShrink``; taken by the
    tensor-core-layout launches where it fits), else run by ``lora_shrink_partials``; then the expands."""
    outs = {}
    for group in GROUPS:
        g = lora[group]
        offer = lt.LoRAShrink(g["a"], slots)
        outs.update(base_group(base, xs[group], group, offer))
        part = offer.partials
        if part is None:  # not taken: the pool's own shrink launch
            part = lt.lora_shrink_partials(xs[group], g["a"], slots)
        expand(group, g, part, outs, slots, rank, {})
    return outs


def variants(sweep: bool) -> dict[str, dict]:
    out = {"lora only": {}}
    if sweep:
        out["seven_expands"] = {"seven_expands": True}
        for bn, ew, sp, bk in itertools.product((128, 256, 512), (4, 8), (None, 8, 32), (128, 256)):
            out[f"n{bn}_ew{ew}_sp{sp or 'auto'}_k{bk}"] = {"block_n": bn, "expand_warps": ew, "splits": sp,
                                                           "block_k": bk}
    return out


def _rel(got: dict, ref: dict) -> float:
    a = torch.cat([got[m].float() for m in SHAPES], dim=1)
    b = torch.cat([ref[m].float() for m in SHAPES], dim=1)
    return float((a - b).abs().max() / b.abs().max())


def run(batch: int, rank: int, n_layers: int, sweep: bool) -> None:
    from inlaid.kernels.w4a16_tcl import SHRINK_MAX_ROWS  # noqa: PLC0415 (the value main may have overridden)

    log(event="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        batch=batch, rank=rank, layers=n_layers, shrink_max_rows=SHRINK_MAX_ROWS)
    slots = torch.arange(batch, device=DEV, dtype=torch.int32)
    loras = [make_lora(batch, rank) for _ in range(n_layers)]
    bases = [make_base() for _ in range(n_layers)]
    log(event="layout", layouts={m: bases[0][m].layout for m in SHAPES})
    xs = {g: torch.randn(batch, SHAPES[g[0]][0], device=DEV, dtype=torch.float16) for g in GROUPS}
    outs = {m: torch.zeros(batch, o, device=DEV, dtype=torch.float16) for m, (_, o) in SHAPES.items()}
    lora_bytes = sum(batch * rank * (i + o) * 2 for i, o in SHAPES.values())
    ref = None
    for name, v in variants(sweep).items():
        try:
            for o in outs.values():
                o.zero_()
            run_lora(loras[0], xs, outs, slots, rank, v)
            got = {m: o.clone() for m, o in outs.items()}
            ref = got if ref is None else ref
            err = _rel(got, ref)
            if not err < 1e-3:
                log(event="wrong", variant=name, err=err)
                continue
            us = graph_time_us([lambda i=i, v=v: run_lora(loras[i], xs, outs, slots, rank, v) for i in range(n_layers)])
            log(event="time", variant=name, us_per_layer=us, TBps=lora_bytes / us / 1e6, err=err)
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the run
            log(event="fail", variant=name, err=repr(e)[:300])
    sep = run_separate(bases[0], loras[0], xs, slots, rank)
    log(event="check", lora_share=_rel(sep, run_base(bases[0], xs)),
        offered_vs_separate=_rel(run_offered(bases[0], loras[0], xs, slots, rank), sep))
    for name, fn in (("w4_base", lambda i: run_base(bases[i], xs)),
                     ("base+lora", lambda i: run_separate(bases[i], loras[i], xs, slots, rank)),
                     ("base+lora, shrinks offered", lambda i: run_offered(bases[i], loras[i], xs, slots, rank))):
        us = graph_time_us([lambda i=i, fn=fn: fn(i) for i in range(n_layers)])
        log(event="time", variant=name, us_per_layer=us)


def to_markdown(seconds: float) -> str:
    env = next(r for r in ROWS if r.get("event") == "env")
    t = {r["variant"]: r for r in ROWS if r.get("event") == "time"}
    base = t.get("w4_base", {}).get("us_per_layer")
    layout = next((r["layouts"] for r in ROWS if r.get("event") == "layout"), {})
    lines = [f"# Multi-LoRA decode launches of one Llama-2-7B layer ({env['gpu']}, torch {env['torch']}, triton "
             f"{env['triton']})", "",
             f"Command: `python benchmarks/lora_decode_bench.py ...` ({seconds:.0f} s). Batch {env['batch']}, "
             f"{env['batch']} distinct rank-{env['rank']} adapters on all 7 projections, fp16, CUDA graph over "
             f"{env['layers']} layers of distinct weights (us per layer). The base: the 7 W4 g128 projections at "
             f"M = {env['batch']} as the decode step runs them (layouts {sorted(set(layout.values()))}), "
             f"{base and f'{base:.1f}'} us per layer in this run. Shrinks inside a W4 launch up to "
             f"{env.get('shrink_max_rows', 64)} A rows.", ""]
    chk = next((r for r in ROWS if r.get("event") == "check"), {})
    if "base+lora" in t and base:
        lines.append(f"- `base+lora` (the base, then the LoRA launches): {t['base+lora']['us_per_layer']:.1f} us per "
                     f"layer: LoRA adds {t['base+lora']['us_per_layer'] / base - 1:.1%} to the base (its deltas move "
                     f"the outputs by {chk.get('lora_share', float('nan')):.1e} relative).")
    offered = t.get("base+lora, shrinks offered")
    if offered and base:
        lines.append(f"- `base+lora, shrinks offered` (every shrink offered to its base launch, as the decode step "
                     f"does; the tensor-core-layout launches take them up to {env.get('shrink_max_rows', 64)} A rows): "
                     f"{offered['us_per_layer']:.1f} us per layer, LoRA +{offered['us_per_layer'] / base - 1:.1%} "
                     f"(outputs vs `base+lora`: {chk.get('offered_vs_separate', float('nan')):.1e} relative).")
    lines += ["", "The LoRA launches alone (`vs W4 base` = their time / the base's):", "",
              "| variant | us per layer | TB/s | vs W4 base |", "|---|---|---|---|"]
    for name, r in sorted(((k, v) for k, v in t.items() if "TBps" in v), key=lambda kv: kv[1]["us_per_layer"]):
        ratio = "" if base is None else f"{r['us_per_layer'] / base:.1%}"
        lines.append(f"| {name} | {r['us_per_layer']:.1f} | {r['TBps']:.2f} | {ratio} |")
    bad = [r for r in ROWS if r.get("event") in ("wrong", "fail")]
    lines += ["", f"Rejected (wrong or failed): {len(bad)}" + ("" if not bad else f": {bad}")]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4, help="layers of distinct weights (4 x 190 MB at rank 16)")
    ap.add_argument("--sweep", action="store_true", help="also time the LoRA launches' parameter variants")
    ap.add_argument("--shrink-max-rows", type=int, default=None,
                    help="experiment: override w4a16_tcl.SHRINK_MAX_ROWS (the A rows a W4 launch's shrink may hold)")
    args = ap.parse_args()
    if args.shrink_max_rows is not None:
        from inlaid.kernels import w4a16_tcl

        w4a16_tcl.SHRINK_MAX_ROWS = args.shrink_max_rows
    t0 = time.time()
    try:
        run(args.batch, args.rank, args.layers, args.sweep)
    finally:
        Path(args.out + ".json").write_text(json.dumps(ROWS, indent=0))
        if any(r.get("event") == "env" for r in ROWS):
            Path(args.out + ".md").write_text(to_markdown(time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
