"""Simulator predictions next to the serving sweep's GPU measurements (issue 9), and the load choice.

Owns:
- ``simulate_run``: one recorded engine-driver run (``policy_sweep`` JSON) replayed in the simulator
  (``inlaid.sim``: the SAME core scheduler, a fake runner, a step-cost model) on the run's own trace
  (regenerated from its recorded workload config and checked against its records);
- ``prediction_rows`` / ``prediction_table``: for every measured point (model, quant, adapters, rate) the
  simulated inlaid/fifo, inlaid/mlfq and inlaid/ablation ratios next to the measured ones, whether the
  simulator ranks the policies as the GPU did (same best; same full order), and the error of each ratio;
- ``rate_choice``: the simulated FIFO and inlaid SLO attainment of the sweep's workload at several
  multiples of the measured saturation rate (how the sweep's top load was chosen), and ``main``, which
  writes it as JSON + markdown.

The SLO is the sweep's: latency <= ``slo_scale`` x isolated time, with the isolated-time fit the engine run
recorded (``isolated`` in its JSON) so the simulated and measured deadlines are the same; the cost model's
``isolated_time`` only when a run recorded none. Pure Python (no torch): cheap enough for the page step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inlaid.bench.metrics import RequestRecord, summarize
from inlaid.bench.serve_client import IsolatedFit
from inlaid.bench.workload import WorkloadConfig, generate_workload
from inlaid.sim.cost_model import StepCostModel, load_cost_model
from inlaid.sim.serving_replay import load_run, run_variant
from inlaid.sim.simulator import EngineShape, RequestSpec

logger = logging.getLogger(__name__)
METRICS = ("throughput_tps", "latency_mean", "jct_mean", "slo_attainment")
HIGHER_BETTER = {"throughput_tps": True, "latency_mean": False, "jct_mean": False, "slo_attainment": True}


def simulate_specs(specs: Sequence[RequestSpec], variant: str, cost: StepCostModel, shape: EngineShape,
                   iso: IsolatedFit | None, slo_scale: float = 5.0, max_num_seqs: int = 64,
                   max_num_batched_tokens: int = 2048) -> dict[str, float]:
    """``summarize`` metrics of ``variant`` simulated on ``specs`` (SLO deadlines from ``iso`` when given)."""
    res = run_variant(specs, variant, shape, cost, max_num_seqs, max_num_batched_tokens)
    recs = []
    for r in res.requests:
        s = res.specs[r.request_id]
        t_iso = iso.time(s.prompt_len, r.num_output_tokens) if iso is not None else \
            cost.isolated_time(s.prompt_len, r.num_output_tokens, max_num_batched_tokens, s.adapter is not None)
        recs.append(RequestRecord(r.arrival_time, r.first_token_time or r.finished_time or 0.0,
                                  r.finished_time or 0.0, r.num_output_tokens, s.job_id, t_iso))
    m = summarize(recs, num_submitted=len(specs), slo_scale=slo_scale)
    m["steps"] = float(res.stats.steps)
    return m


def simulate_run(path: Path, cost: StepCostModel, shape: EngineShape, max_num_seqs: int = 64) -> dict[str, float]:
    """The simulator's metrics for the recorded run ``path`` (its trace, variant, isolated fit, SLO scale)."""
    d = json.loads(path.read_text())
    iso = IsolatedFit(**d["isolated"]) if d.get("isolated") else None
    run = load_run(path)
    return simulate_specs(run.specs, run.variant, cost, shape, iso, float(d["config"].get("slo_scale", 5.0)),
                          max_num_seqs)


def _ratio(metric: str, ours: float | None, other: float | None) -> float | None:
    """> 1 means ``ours`` is better (throughput, SLO: ours/other; latency, JCT: other/ours)."""
    if not ours or not other:
        return None
    return ours / other if HIGHER_BETTER[metric] else other / ours


def _rank(by_variant: dict[str, dict[str, Any]], metric: str) -> list[str]:
    sign = -1.0 if HIGHER_BETTER[metric] else 1.0
    return sorted(by_variant, key=lambda v: sign * float(by_variant[v].get(metric) or 0.0))


def prediction_rows(points: dict[tuple, dict[str, tuple[Path, dict[str, Any]]]], cost: StepCostModel,
                    shape: EngineShape) -> list[dict[str, Any]]:
    """One row per measured engine-driver point with fifo and inlaid: measured and simulated metrics per
    variant, ratios vs fifo/mlfq, ranking agreement per metric (fifo/mlfq/inlaid) and relative errors."""
    rows = []
    for key, pol in sorted(points.items()):
        if key[3] != "engine" or "inlaid" not in pol or "fifo" not in pol:
            continue
        if any(not r["config"].get("complete", True) for _, r in pol.values()):
            continue  # a run cut by its wall cap served fewer requests than its trace
        meas = {v: r["summary"] for v, (_, r) in pol.items()}
        sim = {}
        for v, (p, r) in pol.items():
            try:
                sim[v] = simulate_run(p, cost, shape, int(r["config"]["extra"].get("max_num_seqs", 64)))
            except (ValueError, KeyError) as e:  # an HTTP-schema file or a trace that does not regenerate
                logger.warning("no simulation of %s: %s", p.name, e)
        if "inlaid" not in sim or "fifo" not in sim:
            continue
        row: dict[str, Any] = {"point": key, "measured": meas, "simulated": sim, "ratios": {}, "rank_agrees": {},
                               "best_agrees": {}}
        for other in ("fifo", "mlfq", *sorted(v for v in sim if v.startswith("inlaid-"))):
            if other in sim:
                for m in METRICS:
                    mr = _ratio(m, meas["inlaid"].get(m), meas[other].get(m))
                    sr = _ratio(m, sim["inlaid"].get(m), sim[other].get(m))
                    err = (sr - mr) / mr if mr and sr is not None else None
                    row["ratios"][f"{m}/{other}"] = {"measured": mr, "simulated": sr, "rel_error": err}
        base = {v: meas[v] for v in ("fifo", "mlfq", "inlaid") if v in sim}
        for m in METRICS:
            meas_rank, sim_rank = _rank(base, m), _rank({v: sim[v] for v in base}, m)
            row["rank_agrees"][m] = meas_rank == sim_rank
            row["best_agrees"][m] = meas_rank[0] == sim_rank[0]
        rows.append(row)
    return rows


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.0f}%"


def prediction_table(rows: list[dict[str, Any]], cost_name: str) -> list[str]:
    """Markdown: measured vs simulated inlaid/fifo ratios per point, errors and ranking agreement."""
    if not rows:
        return ["(no engine-driver point with both inlaid and fifo runs to simulate)", ""]
    head = ("| model | quant | adapters | rate | metric | inlaid/fifo measured | simulated | error | "
            "inlaid/mlfq measured | simulated | error | same best | same order fifo/mlfq/inlaid |")
    out = [f"Simulator: the same core scheduler on each run's own trace, step costs from `{cost_name}`, SLO "
           "deadlines from the run's recorded isolated-time fit (same definition as measured). Ratios > 1 favour "
           "inlaid; error = (simulated - measured) / measured.", "", head, "|---" * 13 + "|"]
    agree = best = total = 0
    for r in rows:
        model, quant, n, _, rate = r["point"]
        for m in METRICS:
            f, g = r["ratios"].get(f"{m}/fifo", {}), r["ratios"].get(f"{m}/mlfq", {})
            ok, top = r["rank_agrees"][m], r["best_agrees"][m]
            agree, best, total = agree + ok, best + top, total + 1
            out.append(f"| {model} | {quant} | {n} | {rate:g} | {m} | {_x(f.get('measured'))} | "
                       f"{_x(f.get('simulated'))} | {_pct(f.get('rel_error'))} | {_x(g.get('measured'))} | "
                       f"{_x(g.get('simulated'))} | {_pct(g.get('rel_error'))} | {'yes' if top else 'no'} | "
                       f"{'yes' if ok else 'no'} |")
    errs = [abs(v["rel_error"]) for r in rows for k, v in r["ratios"].items()
            if k.endswith("/fifo") and v.get("rel_error") is not None]
    mean = f"{100 * sum(errs) / len(errs):.0f}%" if errs else "-"
    return out + ["", f"Ranking agreement over (point, metric) pairs: same best policy {best}/{total}, same full "
                      f"order of fifo/mlfq/inlaid {agree}/{total}; mean |error| of the inlaid/fifo ratios: {mean} "
                      f"over {len(errs)} ratios.", ""] + ablation_table(rows)


def ablation_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: inlaid vs each ablation, measured and simulated (> 1: the ingredient helps)."""
    out = ["| model | quant | adapters | rate | ablation | throughput inlaid/abl measured | simulated | "
           "latency abl/inlaid measured | simulated | SLO inlaid/abl measured | simulated |", "|---" * 11 + "|"]
    for r in rows:
        model, quant, n, _, rate = r["point"]
        for k in sorted({k.split("/", 1)[1] for k in r["ratios"] if "/inlaid-" in k}):
            c = [r["ratios"][f"{m}/{k}"] for m in ("throughput_tps", "latency_mean", "slo_attainment")]
            out.append(f"| {model} | {quant} | {n} | {rate:g} | {k} | "
                       + " | ".join(f"{_x(x.get('measured'))} | {_x(x.get('simulated'))}" for x in c) + " |")
    return (["Ablations, measured vs simulated:", ""] + out + [""]) if len(out) > 2 else []


def rate_choice(cost: StepCostModel, wl: WorkloadConfig, sat_rps: float, xs: Sequence[float],
                iso: IsolatedFit | None, shape: EngineShape, variants: Sequence[str] = ("fifo", "inlaid", "mlfq"),
                slo_scale: float = 5.0, max_num_seqs: int = 64) -> list[dict[str, Any]]:
    """Simulated metrics of each variant at ``x * sat_rps`` for every x (the same trace per x)."""
    rows = []
    for x in xs:
        specs = generate_workload(dataclasses.replace(wl, rate=round(x * sat_rps, 3)))
        for v in variants:
            m = simulate_specs(specs, v, cost, shape, iso, slo_scale, max_num_seqs)
            rows.append({"rate_x": x, "rate": round(x * sat_rps, 3), "variant": v,
                         **{k: m.get(k) for k in (*METRICS, "steps")}})
    return rows


def rate_choice_markdown(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| x saturation | req/s | variant | throughput tok/s | latency mean (s) | JCT mean (s) | SLO attainment |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['rate_x']:g} | {r['rate']:g} | {r['variant']} | {r['throughput_tps']:.0f} | "
                   f"{r['latency_mean']:.2f} | {r['jct_mean']:.2f} | {r['slo_attainment']:.2f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the rate-choice study (JSON + markdown) for the sweep's workload."""
    ap = argparse.ArgumentParser(description="simulated SLO attainment of the serving sweep's workload vs load")
    ap.add_argument("--cost-model", type=Path, default=Path("benchmarks/results/cost_model_h200_w4_7b.json"))
    ap.add_argument("--probe", type=Path, default=Path("benchmarks/results/serving/json/"
                                                         "llama2-7b-shapes_w4_100a_engine_probe.json"),
                    help="a sweep probe JSON: saturation rate and isolated-time fit of the measured engine")
    ap.add_argument("--rate-x", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0])
    ap.add_argument("--num-requests", type=int, nargs="+", default=[300])
    ap.add_argument("--adapters", type=int, nargs="+", default=[100])
    ap.add_argument("--num-blocks", type=int, default=15352)
    ap.add_argument("--out", type=Path, required=True, help="JSON output (markdown next to it, .md)")
    ap.add_argument("--noise-run", type=Path, default=None, help="instead: the step-time jitter study on this "
                    "recorded sweep run's trace (its isolated fit), every inlaid variant and fifo")
    ap.add_argument("--noise-cv", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    ap.add_argument("--seeds", type=int, default=8)
    a = ap.parse_args(argv)
    cost, _ = load_cost_model(a.cost_model)
    if a.noise_run is not None:
        return noise_main(a, cost, argv)
    probe = json.loads(a.probe.read_text())
    iso = IsolatedFit(**probe["isolated"]) if probe.get("isolated") else None
    shape = EngineShape(num_blocks=a.num_blocks, block_size=16, num_adapter_slots=32, max_model_len=4096)
    import sys

    cmd = "PYTHONPATH=. python -m inlaid.bench.sim_predict " + " ".join(sys.argv[1:] if argv is None else argv)
    md, data = ["# Simulated load choice for the serving sweep (issue 9)", "", f"Generated by `{cmd}`.", "",
                "Simulator: the core scheduler with a fake runner; SLO = latency <= 5 x isolated time (isolated-time "
                "fit of the measured engine, as the sweep uses). Rates are multiples of the engine's measured "
                "saturation probe (all requests at t=0 under fifo), as in the sweep.", "",
                f"Cost model `{a.cost_model}`, saturation {probe['probe']['rps']:.3f} req/s and isolated fit from "
                f"`{a.probe}`; workload: suite lengths, jobs of 4, power-law alpha 1, output <= 512, prompt <= 1024.", ""], []
    for n in a.num_requests:
        for t in a.adapters:
            wl = WorkloadConfig(num_requests=n, num_tasks=t, job_size=4, lengths="suite", max_tokens=512,
                                max_prompt=1024)
            rows = rate_choice(cost, wl, probe["probe"]["rps"], a.rate_x, iso, shape)
            data.append({"num_requests": n, "adapters": t, "rows": rows})
            md += [f"**{n} requests, {t} adapters**", ""] + rate_choice_markdown(rows) + [""]
    a.out.write_text(json.dumps({"cost_model": str(a.cost_model), "probe": str(a.probe), "runs": data}, indent=1))
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    sys.stdout.write("\n".join(md) + "\n")
    return 0


class NoisyCost:
    """A step-cost model whose every step time is multiplied by a lognormal factor (mean 1, coefficient of
    variation ``cv``; seeded): GPU step-time jitter, which the prefill-batching estimator also observes."""

    def __init__(self, cost: StepCostModel, cv: float, seed: int) -> None:
        import math
        import random

        self.cost, self.rng = cost, random.Random(seed)
        self.sigma = math.sqrt(math.log(1.0 + cv * cv))
        self.mu = -self.sigma * self.sigma / 2

    def step_time(self, out: Any) -> float:
        return self.cost.step_time(out) * self.rng.lognormvariate(self.mu, self.sigma)

    def isolated_time(self, *args: Any, **kw: Any) -> float:
        return self.cost.isolated_time(*args, **kw)


def noise_spread(specs: Sequence[RequestSpec], variants: Sequence[str], cost: StepCostModel, shape: EngineShape,
                 iso: IsolatedFit | None, cv: float, seeds: Sequence[int]) -> dict[str, list[dict[str, float]]]:
    """Per variant, its metrics on one trace under ``len(seeds)`` draws of step-time jitter of ``cv``: how far
    two runs of the SAME policy land apart, against which a measured ablation difference can be read."""
    out: dict[str, list[dict[str, float]]] = {}
    for v in variants:
        out[v] = [simulate_specs(specs, v, NoisyCost(cost, cv, s), shape, iso) for s in seeds]  # type: ignore[arg-type]
    return out


def noise_markdown(spread: dict[str, list[dict[str, float]]], cv: float) -> list[str]:
    """Markdown: min / mean / max of throughput and mean latency per variant, and the largest ratio between
    two jitter draws of inlaid itself."""
    rows = [f"Step-time jitter cv {cv:g}, {len(next(iter(spread.values())))} draws per variant:", "",
            "| variant | throughput tok/s min / mean / max | latency mean s min / mean / max | SLO min / max |",
            "|---|---|---|---|"]
    for v, ms in spread.items():
        t = [m["throughput_tps"] for m in ms]
        lat = [m["latency_mean"] for m in ms]
        slo = [m["slo_attainment"] for m in ms]
        rows.append(f"| {v} | {min(t):.0f} / {sum(t) / len(t):.0f} / {max(t):.0f} | {min(lat):.2f} / "
                    f"{sum(lat) / len(lat):.2f} / {max(lat):.2f} | {min(slo):.2f} / {max(slo):.2f} |")
    if "inlaid" in spread:
        t = [m["throughput_tps"] for m in spread["inlaid"]]
        lat = [m["latency_mean"] for m in spread["inlaid"]]
        rows += ["", f"Two draws of inlaid itself differ by up to {max(t) / min(t):.2f}x in throughput and "
                     f"{max(lat) / min(lat):.2f}x in mean latency."]
    return rows + [""]


def noise_main(a: argparse.Namespace, cost: StepCostModel, argv: list[str] | None) -> int:
    """``--noise-run``: write the jitter study (JSON + markdown) for one recorded run's trace."""
    import sys

    d = json.loads(a.noise_run.read_text())
    iso = IsolatedFit(**d["isolated"]) if d.get("isolated") else None
    specs = load_run(a.noise_run).specs
    shape = EngineShape(num_blocks=a.num_blocks, block_size=16, num_adapter_slots=32, max_model_len=4096)
    cmd = "PYTHONPATH=. python -m inlaid.bench.sim_predict " + " ".join(sys.argv[1:] if argv is None else argv)
    md = ["# Step-time jitter vs the ablation differences (simulated)", "", f"Generated by `{cmd}`.", "",
          f"Trace of `{a.noise_run}` ({len(specs)} requests, rate {d['config']['rate']:g} req/s); cost model "
          f"`{a.cost_model}` with every step time multiplied by a lognormal factor (mean 1, the given cv); the "
          "prefill-batching estimator sees the jittered times, as on the GPU. Same trace, same policy, only the "
          "jitter draw differs between the runs of a row.", ""]
    data = {}
    variants = ["inlaid", "inlaid-nopred", "inlaid-nogroup", "inlaid-noaging", "fifo"]
    for cv in a.noise_cv:
        spread = noise_spread(specs, variants, cost, shape, iso, cv, range(a.seeds))
        data[str(cv)] = spread
        md += noise_markdown(spread, cv)
    a.out.write_text(json.dumps({"run": str(a.noise_run), "cost_model": str(a.cost_model), "spread": data}))
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    sys.stdout.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
