"""Why does (or doesn't) an aggregate of per-task Hessians serve every task? Cheap diagnosis from a store.

From a ``HessianStore`` of calibrated tasks (e.g. the one ``benchmarks/quality.py`` leaves in
``WORK/hessians``) and the fp base weights, per layer group (qkv, o, gate_up, down):

1. **Scale spread**: mean diagonal ``tr(H_t)/d`` of each task's H; max/min over tasks; which task owns the
   element-wise max's diagonal (share of channels) and the share of the sample-weighted mean's trace.
2. **Indefiniteness of the element-wise max**: ``λ_min / λ_max`` of ``max_t H_t`` (negative = not PSD).
3. **Proxy loss** (what GPTQ minimizes) on a few layers: for each aggregate's GPTQ result ``Ŵ`` and every
   task t, ``tr(ΔW H_t ΔWᵀ) / tr(W H_t Wᵀ)``; reported as the mean over tasks, and as the mean over tasks of
   the ratio to per-task GPTQ's (``gptq-single``, the unshareable bound: 1.00 = as good as per-task).

The proxy screens aggregation variants at a fraction of the cost of the full evaluation. Variants screened
beyond the CLI methods: ``mean-equal`` (unnormalized, every task weight 1: separates weighting from scale
normalization) and ``norm-wloss`` (each H_t divided by ``tr(W H_t Wᵀ)`` of the weight itself: the exact
minimizer target of the summed relative proxy, not an aggregation method since it needs W).

    PYTHONPATH=. python benchmarks/hessian_stats.py --store /tmp/qcpu/work/hessians \\
        --out benchmarks/results/hessian_stats.md            # add --quick for 2 layers, a few methods
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
logger = logging.getLogger("hessian_stats")

GROUP_RELS = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o": ["self_attn.o_proj"],
              "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}  # fmt: skip
METHODS = ["gptq-mixed", "mlgptq", "mlgptq-diag", "mlgptq-norm", "mlgptq-normdiag", "mlgptq-rowmax",
           "mean-equal", "norm-wloss", "rtn"]  # fmt: skip


def scale_stats(loaded: dict[str, tuple[torch.Tensor, int]]) -> dict[str, Any]:
    """Per-task mean diagonal, who owns the max's diagonal and the mean's trace, and the max's λmin/λmax."""
    from inlaid.quant.hessian import aggregate

    names = sorted(loaded)
    diag = torch.stack([torch.diagonal(loaded[t][0]).double() for t in names])  # [T, d]
    mdiag = diag.mean(1)
    owner = torch.bincount(diag.argmax(0), minlength=len(names)).double() / diag.shape[1]
    n = torch.tensor([float(loaded[t][1]) for t in names], dtype=torch.float64)
    share = n * mdiag / (n * mdiag).sum()
    hmax = aggregate(loaded, "max").double()
    ev = torch.linalg.eigvalsh((hmax + hmax.t()) / 2)
    return {"mean_diag": dict(zip(names, mdiag.tolist())), "max_diag_owner": dict(zip(names, owner.tolist())),
            "mean_trace_share": dict(zip(names, share.tolist())), "max_lmin_over_lmax": float(ev[0] / ev[-1]),
            "max_neg_eigs": int((ev < 0).sum()), "dim": int(diag.shape[1])}  # fmt: skip


def screen_hessians(loaded: dict[str, tuple[torch.Tensor, int]], w: torch.Tensor, methods: list[str]
                    ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The Hessian each screened method gives GPTQ (``rtn`` excluded)."""
    from inlaid.quant.hessian import normalize
    from inlaid.quant.quantize_model import aggregate_loaded

    out: dict[str, torch.Tensor] = {}
    for m in methods:
        if m == "mean-equal":
            out[m] = torch.stack([h.double() for h, _ in loaded.values()]).mean(0).float()
        elif m == "norm-wloss":
            wd = w.double()
            parts = [h.double() / float(torch.einsum("oi,ij,oj->", wd, h.double(), wd)) for h, _ in loaded.values()]
            out[m] = normalize(torch.stack(parts).sum(0)).float()
        elif m != "rtn":
            out[m] = aggregate_loaded(loaded, m)
    return out


def proxy_losses(loaded: dict[str, tuple[torch.Tensor, int]], w: torch.Tensor, methods: list[str], bits: int,
                 gs: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """``{method: {task: tr(ΔW H_t ΔWᵀ)/tr(W H_t Wᵀ)}}`` incl. ``gptq-single`` (each task its own H)."""
    from inlaid.quant.gptq_batched import gptq_quantize_many
    from inlaid.quant.rtn import rtn_quantize

    names = sorted(loaded)
    hs = screen_hessians(loaded, w, methods)
    keys = list(hs) + [f"single:{t}" for t in names]
    results = gptq_quantize_many(w, torch.stack(list(hs.values()) + [loaded[t][0] for t in names]), bits, gs,
                                 max_retries=8)  # fmt: skip
    deq = {k: r.weight for k, r in zip(keys, results)}
    if "rtn" in methods:
        deq["rtn"] = rtn_quantize(w, bits, gs, True).dequantize()
    wd = w.double()
    energy = {t: float(torch.einsum("oi,ij,oj->", wd, loaded[t][0].double(), wd)) for t in names}

    def rel(q: torch.Tensor, t: str) -> float:
        dw = wd - q.double()
        return float(torch.einsum("oi,ij,oj->", dw, loaded[t][0].double(), dw)) / energy[t]

    out = {m: {t: rel(deq[m], t) for t in names} for m in methods}
    out["gptq-single"] = {t: rel(deq[f"single:{t}"], t) for t in names}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from inlaid.model.loader import load_weights, resolve_model_path
    from inlaid.quant.hessian import HessianStore

    store = HessianStore(args.store)
    names = store.tasks()
    layers = store.layers(names[0])
    proxy_layers = [int(x) for x in args.proxy_layers.split(",")]
    stat_layers = proxy_layers if args.quick else layers
    want = {f"model.layers.{i}.{r}.weight" for i in proxy_layers for rels in GROUP_RELS.values() for r in rels}
    state = {k: v.float() for k, v in load_weights(resolve_model_path(args.model)) if k in want}
    data: dict[str, Any] = {"args": vars(args), "tasks": names, "stats": {}, "proxy": {}}
    for i in stat_layers:
        t0 = time.perf_counter()
        for g, rels in GROUP_RELS.items():
            loaded = {t: store.load(t, i, g) for t in names}
            data["stats"][f"{i}|{g}"] = scale_stats(loaded)
            if i in proxy_layers:
                w = torch.cat([state[f"model.layers.{i}.{r}.weight"] for r in rels])
                data["proxy"][f"{i}|{g}"] = proxy_losses(loaded, w, args.methods.split(","), args.bits,
                                                         args.group_size)  # fmt: skip
        logger.info("layer %d: %.1f s", i, time.perf_counter() - t0)
    return data


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _task_table(data: dict[str, Any]) -> list[str]:
    """Per task, over all (layer, group): relative scale, share of the max's diagonal, share of the mean."""
    rows = ["| task | mean diag / all-task mean (avg) | channels where it is the max | share of mixed-mean trace |",
            "|---|---|---|---|"]  # fmt: skip
    stats = list(data["stats"].values())
    for t in data["tasks"]:
        rel = _mean([s["mean_diag"][t] / _mean(list(s["mean_diag"].values())) for s in stats])
        own = _mean([s["max_diag_owner"][t] for s in stats])
        share = _mean([s["mean_trace_share"][t] for s in stats])
        rows.append(f"| {t} | {rel:.2f} | {100 * own:.1f}% | {100 * share:.1f}% |")
    return rows


def _group_table(data: dict[str, Any]) -> list[str]:
    head = ("| group | layers | task scale spread max/min (median) | λmin/λmax of element-wise max: median / "
            "worst | negative eigenvalues (mean share) |")
    rows = [head, "|---|---|---|---|---|"]
    for g in GROUP_RELS:
        ss = [s for k, s in data["stats"].items() if k.endswith(f"|{g}")]
        spread = sorted(max(s["mean_diag"].values()) / min(s["mean_diag"].values()) for s in ss)
        ratio = sorted(s["max_lmin_over_lmax"] for s in ss)
        neg = _mean([s["max_neg_eigs"] / s["dim"] for s in ss])
        rows.append(f"| {g} | {len(ss)} | {spread[len(spread) // 2]:.2f} | {ratio[len(ratio) // 2]:+.3f} / "
                    f"{ratio[0]:+.3f} | {100 * neg:.1f}% |")  # fmt: skip
    return rows


def _proxy_table(data: dict[str, Any]) -> list[str]:
    """Per method: mean relative proxy, mean and worst ratio to per-task GPTQ, and per group mean ratio."""
    proxy = data["proxy"]
    methods = list(next(iter(proxy.values())))
    rows = ["| method | mean rel. proxy loss | ratio to per-task GPTQ: mean | worst task | " + " | ".join(
        f"{g} ratio" for g in GROUP_RELS) + " |", "|---" * (4 + len(GROUP_RELS)) + "|"]  # fmt: skip
    for m in sorted(methods, key=lambda m: _mean([_mean(_ratios(p, m)) for p in proxy.values()])):
        rel = _mean([_mean(list(p[m].values())) for p in proxy.values()])
        per_task = {t: _mean([p[m][t] / p["gptq-single"][t] for p in proxy.values()]) for t in data["tasks"]}
        worst = max(per_task, key=per_task.__getitem__)
        by_group = [_mean([_mean(_ratios(p, m)) for k, p in proxy.items() if k.endswith(f"|{g}")]) for g in GROUP_RELS]
        rows.append(f"| {m} | {rel:.5f} | {_mean(list(per_task.values())):.3f} | {per_task[worst]:.3f} ({worst}) | "
                    + " | ".join(f"{x:.3f}" for x in by_group) + " |")  # fmt: skip
    return rows


def _ratios(p: dict[str, dict[str, float]], m: str) -> list[float]:
    return [p[m][t] / p["gptq-single"][t] for t in p[m]]


def to_markdown(data: dict[str, Any]) -> str:
    a = data["args"]
    proxy_layers = sorted({int(k.split("|")[0]) for k in data["proxy"]})
    n_layers = len({k.split("|")[0] for k in data["stats"]})
    store = (f"Store: {len(data['tasks'])} tasks, {n_layers} layers (SmolLM2-135M with its demo adapters unless the "
             f"command says otherwise). Proxy: {a['bits']}-bit g{a['group_size']} symmetric GPTQ (percdamp 0.01, "
             f"retries x10 up to 8) of the stacked weights of each group on layers {proxy_layers}.")
    legend = ("Per task t: tr(ΔW H_t ΔWᵀ) / tr(W H_t Wᵀ); `ratio to per-task GPTQ` divides by the same quantity "
              "of GPTQ run on H_t alone (1.000 = as good as the unshareable per-task model), averaged over tasks "
              "and the screened (layer, group) pairs; `worst task`: the task with the largest mean ratio. Sorted "
              "by the mean ratio.")
    lines = ["# Per-task Hessians: scale spread, indefiniteness of the max, proxy loss of each aggregate", "",
             f"Command: `{a['command']}`", "",
             store, "",
             "## Scale of each task's Hessian (all layers and groups)", "", *_task_table(data), "",
             "## Per group", "", *_group_table(data), "",
             "## Proxy loss (what GPTQ minimizes) of each aggregate", "",
             legend, "", *_proxy_table(data), ""]  # fmt: skip
    if data.get("notes"):
        lines += [data["notes"].rstrip(), ""]
    lines.append(f"Time: {data.get('seconds', float('nan')):.0f} s.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="Hessian store directory (index.json)")
    p.add_argument("--model", default="default", help="the fp base the store was calibrated on")
    p.add_argument("--proxy-layers", default="0,10,20,29", help="layers whose groups are GPTQ-screened")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="statistics on the proxy layers only")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default=None, help="results JSON (default: --out with .json)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hessian_stats.md"))
    p.add_argument("--notes", default=None, help="markdown appended under the tables (the reading)")
    p.add_argument("--from-json", default=None, help="only regenerate --out from this JSON")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        args.command = "PYTHONPATH=. python benchmarks/hessian_stats.py " + " ".join(sys.argv[1:])
        t0 = time.perf_counter()
        data = run(args)
        data["seconds"] = time.perf_counter() - t0
        Path(args.json or Path(args.out).with_suffix(".json")).write_text(json.dumps(data, indent=1))
    if args.notes:
        data["notes"] = Path(args.notes).read_text()
    Path(args.out).write_text(to_markdown(data))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
