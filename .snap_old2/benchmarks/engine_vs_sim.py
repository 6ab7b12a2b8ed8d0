"""Real engine vs simulator on the same small trace, for fifo, mlfq and inlaid.

The engine: bundled SmolLM2-135M shapes with dummy weights on the CPU (one torch
thread), 8 tasks with random rank-16 adapters, 4 adapter slots, a tight KV
budget. It replays the trace on a *virtual clock* (``inlaid.bench.engine_driver``):
idle gaps jump to the next arrival, and a request is injected before the first
step that starts after its arrival -- the simulator's rule. The clock advances
per executed step by either

- ``--clock model`` (default): the fitted cost model evaluated on the step the
  engine actually executed -- deterministic; engine and simulator then differ
  only in how they drive the scheduler (the real forward, sampler, adapter
  loads, stop handling run in the engine), or
- ``--clock measured``: the step's measured process CPU time -- the real speed,
  but on a shared 2-core machine its run-to-run noise (up to 3x) exceeds the
  differences between policies; this mode also fits a cost model in situ on the
  run's own steps and re-runs the simulator with it.

Output lengths follow the trace through oracle EOS (real forward and sampling;
EOS substituted at the trace length), so the scheduler never sees them. The
simulator runs the same trace with the fitted CPU cost model. The report gives
both rankings per metric and the relative error of the simulator:

    PYTHONPATH=. python benchmarks/engine_vs_sim.py [--clock model|measured]   # a few min on 2 quiet cores

Writes ``benchmarks/results/engine_vs_sim_<clock>.md`` (and .json);
``scheduling_study.py`` appends those sections to ``scheduling.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from inlaid.bench.engine_driver import build_bench_engine, replay
from inlaid.bench.metrics import RequestRecord, summarize
from inlaid.bench.workload import WorkloadConfig, generate_workload
from inlaid.config import SchedulerConfig
from inlaid.sim.cost_model import fit_cost_model, load_cost_model, r_squared
from inlaid.sim.simulator import EngineShape, RequestSpec
from inlaid.sim.study import markdown_table, run_policy

log = logging.getLogger("engine_vs_sim")
HERE = Path(__file__).resolve().parent
MODEL = str(HERE / "configs" / "smollm2-135m")
POLICIES = ("fifo", "mlfq", "inlaid")
METRICS = ("throughput_rps", "latency_mean", "ttft_mean", "jct_mean", "slo_attainment")
HIGHER_IS_BETTER = {"throughput_rps", "slo_attainment"}


def sched_cfg(policy: str, args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(policy=policy, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=256,
                           max_adapters_per_step=2, aging_s=args.aging_s, max_queue_len=10_000)


def trace(args: argparse.Namespace) -> list[RequestSpec]:
    return generate_workload(WorkloadConfig(num_requests=args.requests, rate=args.rate, num_tasks=args.tasks,
                                            max_tokens=args.max_tokens, max_prompt=args.max_prompt, seed=7,
                                            job_size=2))


def ranking(rows: dict[str, dict[str, float]], metric: str, rel_tol: float = 1e-9) -> list[str]:
    """Policies best first; policies whose values are equal (within ``rel_tol``) share a rank: "fifo = mlfq"."""
    order = sorted(rows, key=lambda p: rows[p][metric], reverse=metric in HIGHER_IS_BETTER)
    out: list[str] = []
    for p in order:
        prev = out[-1].split(" = ")[-1] if out else None
        a, b = (rows[prev][metric], rows[p][metric]) if prev else (None, None)
        if prev and abs(a - b) <= rel_tol * max(abs(a), abs(b), 1e-12):
            out[-1] += f" = {p}"
        else:
            out.append(p)
    return out


def engine_rows(specs: list[RequestSpec], args: argparse.Namespace, cost,  # noqa: ANN001
                samples: list | None = None) -> dict[str, dict[str, float]]:
    eng = build_bench_engine(MODEL, "cpu", slots=args.slots, num_adapters=args.tasks, num_blocks=args.num_blocks,
                             sched=sched_cfg("fifo", args))
    vocab = eng.parts.arch.vocab_size
    out = {}
    for p in POLICIES:
        res = replay(eng, specs, sched_cfg(p, args), vocab=vocab, timer=time.process_time, desc=f"engine {p}",
                     step_cost=cost.cost if args.clock == "model" else None)
        by_id = {s.request_id: s for s in specs}
        recs = [RequestRecord(r.arrival, r.first_token, r.finish, r.output_len, r.job_id,
                              cost.isolated_time(by_id[rid].prompt_len, r.output_len, 256,
                                                 with_adapter=by_id[rid].adapter is not None))
                for rid, r in res.records.items()]
        m = summarize(recs, num_submitted=len(specs))
        m.update(steps=float(res.stats.steps), preemptions=float(res.stats.preemptions),
                 adapter_loads=float(res.stats.adapter_loads), wall_s=res.wall_s)
        out[p] = m
        if samples is not None:
            samples.extend(res.samples)
        log.info("engine %s: %s", p, {k: round(m[k], 3) for k in METRICS})
    return out


def sim_rows(specs: list[RequestSpec], args: argparse.Namespace, cost) -> dict[str, dict[str, float]]:  # noqa: ANN001
    shape = EngineShape(num_blocks=args.num_blocks, block_size=16, num_adapter_slots=args.slots,
                        max_model_len=8192)
    out = {}
    for p in POLICIES:
        m = run_policy(specs, sched_cfg(p, args), shape, cost)
        m["adapter_loads"] = m["adapter_loads_per_s"] * m["makespan"]
        out[p] = m
    return out


def report(eng: dict, sim: dict, args: argparse.Namespace, meta: dict, secs: float, cost) -> str:  # noqa: ANN001
    rows = []
    for p in POLICIES:
        for src, d in (("engine", eng), ("sim", sim)):
            rows.append({"policy": p, "source": src, **d[p]})
    err = [{"policy": p, **{m: (sim[p][m] - eng[p][m]) / eng[p][m] if eng[p][m] else float("nan")
                            for m in METRICS}} for p in POLICIES]
    ranks = [{"metric": m, "engine": " > ".join(ranking(eng, m)), "sim": " > ".join(ranking(sim, m)),
              "same": str(ranking(eng, m) == ranking(sim, m))} for m in METRICS]
    return "\n".join([
        f"## Engine vs simulator (same trace), engine clock: {args.clock}{args.tag}\n",
        f"Generated by `PYTHONPATH=. python benchmarks/engine_vs_sim.py {args.cmdline}` ({secs:.0f} s). Engine: SmolLM2-135M shapes, "
        f"dummy weights, CPU, 1 torch thread, {args.tasks} tasks with random rank-16 adapters, {args.slots} adapter "
        f"slots, {args.num_blocks} KV blocks of 16, max_num_seqs {args.max_num_seqs}, β = 2, aging_s = {args.aging_s}. "
        f"Trace: {args.requests} requests in jobs of 2, {args.rate} req/s (virtual seconds), task-suite lengths "
        f"capped at {args.max_prompt} prompt / {args.max_tokens} output tokens. Engine clock: "
        + ("the cost model evaluated on each step the engine executed" if args.clock == "model" else
           "measured per-step process CPU time") + f"; arrivals injected between steps; cost model `{args.cost_model.name}` "
        f"({meta.get('device')}): {dataclasses.asdict(cost)}. Policies: the current ones (inlaid with prefill "
        "batching on by default; it engages only when the cost model has a prefill-step overhead above one decode "
        "step).\n",
        "### Rankings (best first)\n", markdown_table(ranks, ["metric"], ("engine", "sim", "same")),
        "\n### Relative error of the simulator ((sim − engine) / engine)\n", markdown_table(err, ["policy"], METRICS),
        "\n### Raw metrics\n",
        markdown_table(rows, ["policy", "source"], METRICS + ("steps", "preemptions", "adapter_loads")), "",
    ])


def insitu_section(eng: dict, sim2: dict, model, r2: float, n: int) -> str:  # noqa: ANN001
    """The same comparison with a cost model fitted on the engine's own steps of this run."""
    err = [{"policy": p, **{m: (sim2[p][m] - eng[p][m]) / eng[p][m] if eng[p][m] else float("nan")
                            for m in METRICS}} for p in POLICIES]
    ranks = [{"metric": m, "engine": " > ".join(ranking(eng, m)), "sim (in-situ)": " > ".join(ranking(sim2, m)),
              "same": str(ranking(eng, m) == ranking(sim2, m))} for m in METRICS]
    return "\n".join([
        "\n### Simulator with a cost model fitted in situ (on this run's engine steps)\n",
        f"Separates cost-model error (machine load differs between the grid fit and this run) from simulator "
        f"logic: {dataclasses.asdict(model)}, R² {r2:.3f} over {n} steps of the three engine runs. (SLO deadlines "
        "here come from the in-situ model on the sim side, the grid model on the engine side.)\n",
        markdown_table(ranks, ["metric"], ("engine", "sim (in-situ)", "same")), "",
        markdown_table(err, ["policy"], METRICS), "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rate", type=float, default=1.5, help="req/s of virtual time")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=40)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--max-prompt", type=int, default=32)
    ap.add_argument("--aging-s", type=float, default=30.0)
    ap.add_argument("--clock", choices=["model", "measured"], default="model",
                    help="engine virtual clock: the fitted cost model of each executed step (deterministic), or "
                         "the step's measured process CPU time (noisy on a shared machine)")
    ap.add_argument("--cost-model", type=Path, default=HERE / "results" / "cost_model.json")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--tag", default="", help="suffix of the output files (engine_vs_sim_<clock><tag>.md/.json)")
    args = ap.parse_args()
    import sys

    args.cmdline = " ".join(sys.argv[1:]) or "--clock model"
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    t0 = time.time()
    cost, meta = load_cost_model(args.cost_model)
    specs = trace(args)
    sim = sim_rows(specs, args, cost)
    samples: list = []
    eng = engine_rows(specs, args, cost, samples)
    md = report(eng, sim, args, meta, time.time() - t0, cost)
    sim2, insitu = {}, None
    if args.clock == "measured":
        insitu = fit_cost_model(samples)
        sim2 = sim_rows(specs, args, insitu)
        md += insitu_section(eng, sim2, insitu, r_squared(insitu, samples), len(samples))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"engine_vs_sim_{args.clock}{args.tag}.md").write_text(md)
    (args.out / f"engine_vs_sim_{args.clock}{args.tag}.json").write_text(json.dumps({"engine": eng, "sim": sim, "sim_insitu": sim2,
                                                             "insitu_cost_model": dataclasses.asdict(insitu)
                                                             if insitu else None,
                                                             "args": vars(args)},
                                                            indent=2, default=str) + "\n")
    print(md)


if __name__ == "__main__":
    main()
