"""Replay a serving-sweep run (``inlaid.bench.policy_sweep`` JSON) in the simulator, with a refitted cost model.

Owns: regenerating a run's trace from its recorded workload config (checked
against the recorded arrivals/lengths), grid-fitting a ``StepCostModel``
(base, prefill_step, decode_seq, prefill_token, adapter_load) so the simulator
reproduces one engine run's per-request first-token and finish times, and
simulating every policy variant on that model to compare with the engine.

The JSONs hold per-request timelines, not step logs, so the fit matches
timelines (mean absolute error of first-token + finish times). Pure Python.

``fit_cost_model_file`` writes the fitted model (with where it came from) as a
cost-model JSON the scheduling study reads; ``prediction_check`` compares a
prediction with the measured inlaid/FIFO ratios of a later sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inlaid.bench.workload import WorkloadConfig, generate_workload
from inlaid.config import SchedulerConfig
from inlaid.core.inlaid_policy import InlaidPolicy
from inlaid.core.predictor import LengthPredictor
from inlaid.sim.cost_model import StepCostModel, cost_model_to_json
from inlaid.sim.simulator import EngineShape, RequestSpec, SimResult, simulate


@dataclass(frozen=True)
class ServingRun:
    """One recorded engine run: its trace, per-request records and summary."""

    variant: str
    specs: list[RequestSpec]
    records: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    workload: dict[str, Any]
    """The recorded workload config (rate, job size, lengths, ...)."""


def load_run(path: str | Path) -> ServingRun:
    """Read a sweep JSON and regenerate its trace; ``ValueError`` when the trace does not match the records."""
    d = json.loads(Path(path).read_text())
    w = dict(d["config"]["workload"])
    w["output_range"], w["prompt_range"] = tuple(w["output_range"]), tuple(w["prompt_range"])
    specs = generate_workload(WorkloadConfig(**w))
    recs = {r["request_id"]: r for r in d["records"]}
    for s in specs:
        r = recs.get(s.request_id)
        if r is not None and (abs(r["arrival"] - s.arrival) > 1e-6 or r["prompt_len"] != s.prompt_len
                              or r["output_len"] != s.output_len or r["task"] != s.adapter):
            raise ValueError(f"{path}: regenerated request {s.request_id} differs from the recorded one")
    return ServingRun(d["config"]["label"], specs, recs, d["summary"], d["config"]["workload"])


def sched_for(variant: str, max_num_seqs: int, max_num_batched_tokens: int, beta: int = 10,
              aging_s: float = 10.0) -> tuple[SchedulerConfig, InlaidPolicy | None, LengthPredictor]:
    """Scheduler config, explicit policy (inlaid ablations) and predictor of a sweep variant."""
    switches = {"inlaid-nopred": {"use_prediction": False}, "inlaid-nogroup": {"use_grouping": False},
                "inlaid-noaging": {"use_aging": False}, "inlaid-nobatch": {"prefill_batching": False}}
    policy = "inlaid" if variant.startswith("inlaid") else variant
    cfg = SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_adapters_per_step=beta, aging_s=aging_s, max_queue_len=1_000_000)
    pred = LengthPredictor()
    pol = InlaidPolicy(max_adapters_per_step=beta, aging_s=aging_s, predictor=pred, **switches[variant]) \
        if variant in switches else None
    return cfg, pol, pred


def run_variant(specs: Sequence[RequestSpec], variant: str, shape: EngineShape, cost: StepCostModel,
                max_num_seqs: int = 64, max_num_batched_tokens: int = 2048) -> SimResult:
    cfg, pol, pred = sched_for(variant, max_num_seqs, max_num_batched_tokens)
    return simulate(specs, cfg, shape, cost, policy=pol, predictor=pred)


def timeline_error(res: SimResult, records: dict[str, dict[str, Any]]) -> float:
    """Mean absolute difference (s) of first-token and finish times, simulated vs recorded."""
    errs = [abs((r.first_token_time or 0.0) - records[r.request_id]["first_token"])
            + abs((r.finished_time or 0.0) - records[r.request_id]["finish"])
            for r in res.requests if r.request_id in records]
    return sum(errs) / (2 * max(len(errs), 1))


DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "base": (0.008, 0.012, 0.016, 0.020, 0.024), "prefill_step": (0.0, 0.06, 0.08, 0.09, 0.10, 0.11),
    "decode_seq": (0.0, 0.0002), "prefill_token": (0.0, 2e-5, 4.8e-4), "adapter_load": (0.0, 0.01)}


def fit_to_runs(runs: Iterable[ServingRun], shape: EngineShape, grid: dict[str, Sequence[float]] = DEFAULT_GRID,
                max_num_seqs: int = 64) -> tuple[StepCostModel, float]:
    """The grid point whose simulation best reproduces ``runs`` (summed timeline error), and that error."""
    runs = list(runs)
    best: tuple[float, StepCostModel] | None = None
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        cost = StepCostModel(distinct_adapter=0.0, **dict(zip(keys, values)))
        err = sum(timeline_error(run_variant(r.specs, r.variant, shape, cost, max_num_seqs), r.records)
                  for r in runs)
        if best is None or err < best[0]:
            best = (err, cost)
    assert best is not None
    return best[1], best[0] / max(len(runs), 1)


def gpu_point_report(json_dir: str | Path, prefix: str, fit_variant: str = "fifo", slots: int = 32,
                     max_num_seqs: int = 64) -> tuple[str, dict[str, Any]]:
    """Markdown + data: fit on ``fit_variant``'s run, simulate every recorded variant and the new policy."""
    runs = {}
    for p in sorted(Path(json_dir).glob(f"{prefix}_*_r*.json")):
        r = load_run(p)
        if r.summary.get("unfinished", 0) == 0:
            runs[r.variant] = r
    shape = EngineShape(num_blocks=100_000, block_size=16, num_adapter_slots=slots, max_model_len=4096)
    cost, err = fit_to_runs([runs[fit_variant]], shape, max_num_seqs=max_num_seqs)
    rows, specs = [], runs[fit_variant].specs
    for v in ("fifo", "mlfq", "inlaid-nobatch", "inlaid-nopred", "inlaid"):
        res = run_variant(specs, v, shape, cost, max_num_seqs)
        lat = sum((r.finished_time or 0.0) - r.arrival_time for r in res.requests) / len(res.requests)
        eng = runs.get("inlaid" if v == "inlaid-nobatch" else v)
        rows.append({"variant": v, "sim_makespan": res.makespan, "sim_latency": lat, "sim_steps": res.stats.steps,
                     "engine_makespan": eng.summary["makespan"] if eng else None,
                     "engine_latency": eng.summary["latency_mean"] if eng else None,
                     "engine_steps": eng.summary["steps"] if eng else None,
                     "timeline_err": timeline_error(res, eng.records) if eng else None})
    f = next(r for r in rows if r["variant"] == "fifo")
    md = [(f"Cost model fitted on the engine's `{fit_variant}` run: {cost} (mean |first-token, finish| error "
           f"{err * 1000:.0f} ms)."), "",
          ("| variant | sim makespan | engine makespan | sim steps | engine steps | sim latency | engine latency "
           "| timeline err (s) | sim thr / fifo | sim latency reduction vs fifo |"),
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['sim_makespan']:.2f} | {_g(r['engine_makespan'])} | {r['sim_steps']} | "
                  f"{_g(r['engine_steps'])} | {r['sim_latency']:.3f} | {_g(r['engine_latency'])} | "
                  f"{_g(r['timeline_err'])} | {f['sim_makespan'] / r['sim_makespan']:.2f} | "
                  f"{1 - r['sim_latency'] / f['sim_latency']:.2f} |")
    return "\n".join(md) + "\n", {"cost": cost.__dict__, "fit_error_s": err, "rows": rows}


def _g(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


log = logging.getLogger(__name__)

WIDE_GRID: dict[str, tuple[float, ...]] = {
    "base": (0.012, 0.016, 0.020, 0.024, 0.028, 0.032),
    "prefill_step": (0.06, 0.07, 0.08, 0.09, 0.10, 0.11, 0.12, 0.14),
    "decode_seq": (0.0, 0.0002, 0.0004), "prefill_token": (0.0, 2e-5, 1e-4), "adapter_load": (0.0,)}
"""Grid of ``fit_cost_model_file``: DEFAULT_GRID widened where the session-3 fit landed on its edge (base 24 ms,
prefill step 110 ms); adapter_load fixed at 0 (every recorded run loads each of its adapters exactly once)."""


def complete_runs(json_dir: str | Path, prefix: str) -> dict[str, ServingRun]:
    """``{"<variant>_r<rate>": run}`` of every run under ``json_dir`` with no unfinished request."""
    out = {}
    for p in sorted(Path(json_dir).glob(f"{prefix}_*_r*.json")):
        r = load_run(p)
        if r.summary.get("unfinished", 0) == 0:
            out[p.stem[len(prefix) + 1:]] = r
    if not out:
        raise ValueError(f"no complete run matches {Path(json_dir) / prefix}_*_r*.json")
    return out


def engine_of(json_dir: str | Path, prefix: str) -> dict[str, Any]:
    """Engine shape and limits of a sweep, from its probe JSON's and runs' configs (slots, seqs, blocks)."""
    probe = json.loads((Path(json_dir) / f"{prefix}_probe.json").read_text()) \
        if (Path(json_dir) / f"{prefix}_probe.json").is_file() else {}
    return {"slots": 32, "max_num_seqs": 64, "max_num_batched_tokens": 2048, **probe.get("extra", {}),
            "saturation_rps": probe.get("probe", {}).get("rps")}


def fit_cost_model_file(json_dir: str | Path, prefix: str, out: str | Path, num_blocks: int,
                        grid: dict[str, Sequence[float]] = WIDE_GRID, slots: int = 32,
                        max_num_seqs: int = 64) -> tuple[StepCostModel, dict[str, Any]]:
    """Fit one ``StepCostModel`` to every complete run of a sweep (all policies) and write it as JSON."""
    runs = complete_runs(json_dir, prefix)
    shape = EngineShape(num_blocks=num_blocks, block_size=16, num_adapter_slots=slots, max_model_len=4096)
    cost, err = fit_to_runs(runs.values(), shape, grid, max_num_seqs)
    per_run = {k: timeline_error(run_variant(r.specs, r.variant, shape, cost, max_num_seqs), r.records)
               for k, r in runs.items()}
    meta = {"device": "NVIDIA H200 (serving sweep, engine driver)", "source": f"{json_dir}/{prefix}_*_r*.json",
            "fitted_on": sorted(runs), "workload": json.loads(json.dumps(next(iter(runs.values())).workload)),
            "engine": {**engine_of(json_dir, prefix), "num_blocks": num_blocks,
                                                  "block_size": 16, "slots": slots, "max_num_seqs": max_num_seqs},
            "method": "grid search (inlaid.sim.serving_replay.fit_cost_model_file): the point whose simulations "
                      "of every run best reproduce the recorded per-request first-token and finish times",
            "grid": {k: list(v) for k, v in grid.items()}, "fit_error_s": err, "timeline_error_s": per_run,
            "workload_note": "'workload' is the first fitted run's config; the runs differ only in rate and policy"}
    Path(out).write_text(cost_model_to_json(cost, meta))
    log.info("wrote %s: %s (mean timeline error %.0f ms)", out, cost, err * 1000)
    return cost, meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fit a GPU step-cost model to a serving sweep's runs")
    ap.add_argument("--json-dir", default="benchmarks/results/serving/json")
    ap.add_argument("--prefix", default="llama2-7b-shapes_w4_100a_engine")
    ap.add_argument("--num-blocks", type=int, default=15352, help="KV blocks of the engine (its log's value)")
    ap.add_argument("--out", default="benchmarks/results/cost_model_h200_w4_7b.json")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    fit_cost_model_file(a.json_dir, a.prefix, a.out, a.num_blocks)


if __name__ == "__main__":
    main()


def _ratio_row(label: str, fifo: tuple[float, float, float], other: tuple[float, float, float]) -> str:
    """``| label | thr x | latency reduction | JCT reduction |`` from (makespan, latency, jct) triples."""
    return (f"| {label} | {fifo[0] / other[0]:.2f}x | {100 * (1 - other[1] / fifo[1]):.0f}% | "
            f"{100 * (1 - other[2] / fifo[2]):.0f}% |")


def _sim_triple(run: ServingRun, variant: str, shape: EngineShape, cost: StepCostModel) -> tuple[float, float, float]:
    """(makespan, mean latency, mean JCT) of ``variant`` simulated on ``run``'s trace."""
    res = run_variant(run.specs, variant, shape, cost)
    lat = {r.request_id: (r.finished_time or 0.0) - r.arrival_time for r in res.requests}
    jobs: dict[str, list[float]] = {}
    for s in run.specs:
        if s.request_id in lat:
            jobs.setdefault(s.job_id or s.request_id, []).append(s.arrival)
    fin = {r.request_id: r.finished_time or 0.0 for r in res.requests}
    jct = [max(fin[s.request_id] for s in run.specs if (s.job_id or s.request_id) == j) - min(a)
           for j, a in jobs.items()]
    return res.makespan, sum(lat.values()) / len(lat), sum(jct) / len(jct)


def prediction_check(json_dir: str | Path, prefix: str, models: dict[str, StepCostModel], shape: EngineShape,
                     variants: Sequence[str] = ("mlfq", "inlaid", "inlaid-nopred", "inlaid-nogroup",
                                                "inlaid-noaging")) -> str:
    """Markdown: measured vs simulated (per cost model) ratios of each variant to FIFO, per recorded rate."""
    runs = complete_runs(json_dir, prefix)
    rates = sorted({k.rsplit("_r", 1)[1] for k in runs}, key=float, reverse=True)
    md = ["| point | throughput / FIFO | mean latency reduction | mean JCT reduction |", "|---|---|---|---|"]
    for rate in rates:
        fifo = runs.get(f"fifo_r{rate}")
        if fifo is None:
            continue
        m = (lambda r: (r.summary["makespan"], r.summary["latency_mean"], r.summary["jct_mean"]))
        sims = {name: _sim_triple(fifo, "fifo", shape, c) for name, c in models.items()}
        for v in variants:
            run = runs.get(f"{v}_r{rate}")
            if run is None:
                continue
            md.append(_ratio_row(f"r{rate} {v}: **measured**", m(fifo), m(run)))
            md += [_ratio_row(f"r{rate} {v}: simulated, {name}", sims[name], _sim_triple(run, v, shape, c))
                   for name, c in models.items()]
    return "\n".join(md) + "\n"
