"""Glue between the simulator and the metrics: run configurations, return metrics rows and tables.

Owns: ``StudySetup`` (engine shape, cost model, scheduler limits shared by every
policy of a study), ``run_policy`` (workload + policy -> metrics dict),
``sweep`` (policies x rates x task counts), ``saturation_rate`` (the rate FIFO
saturates at, so rates scale with the cost model), ``ratios`` (an SLO ratio is
``inf``/NaN, never a floored division, when the baseline attains 0) and
``markdown_table``. Used by ``benchmarks/scheduling_study.py``, ``inlaid bench
sim`` and the tests. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from inlaid.bench.metrics import RequestRecord, summarize
from inlaid.bench.workload import WorkloadConfig, generate_workload
from inlaid.config import SchedulerConfig
from inlaid.core.policies import Policy
from inlaid.core.predictor import LengthPredictor
from inlaid.sim.cost_model import StepCostModel
from inlaid.sim.simulator import EngineShape, RequestSpec, SimResult, simulate

KEYS = ("throughput_rps", "latency_mean", "latency_p99", "ttft_mean", "jct_mean", "slo_attainment",
        "preemptions", "distinct_adapters_per_step", "adapter_loads_per_s", "mean_batch")


@dataclass(frozen=True)
class StudySetup:
    """Everything a study holds fixed across policies."""

    shape: EngineShape = field(default_factory=EngineShape)
    cost: StepCostModel = field(default_factory=StepCostModel)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    beta: int = 10
    aging_s: float | None = None
    """Starvation bound for mlfq and inlaid; None = each policy's default (SchedulerConfig's)."""
    mlfq_starvation_s: float | None = None
    """Overrides ``aging_s`` for mlfq only (FastServe's fixed starvation threshold)."""
    lengths: str = "auto"
    slo_scale: float = 5.0
    job_size: int = 1
    """Requests per job (a burst for one task) of the study's workloads, unless a caller overrides it."""

    def sched_cfg(self, policy: str) -> SchedulerConfig:
        aging = self.mlfq_starvation_s if policy == "mlfq" and self.mlfq_starvation_s is not None else self.aging_s
        extra = {"aging_s": aging} if aging is not None else {}
        return SchedulerConfig(policy=policy, max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               max_adapters_per_step=self.beta, max_queue_len=1_000_000, **extra)


def records_of(res: SimResult, cost: StepCostModel, chunk: int) -> list[RequestRecord]:
    """RequestRecords of a simulation's finished requests, with isolated run times from ``cost``."""
    recs = []
    for r in res.requests:
        spec = res.specs[r.request_id]
        iso = cost.isolated_time(spec.prompt_len, r.num_output_tokens, chunk, with_adapter=spec.adapter is not None)
        recs.append(RequestRecord(r.arrival_time, r.first_token_time or r.finished_time or 0.0,
                                  r.finished_time or 0.0, r.num_output_tokens, spec.job_id, iso))
    return recs


def run_policy(specs: Sequence[RequestSpec], sched_cfg: SchedulerConfig, shape: EngineShape = EngineShape(),
               cost: StepCostModel = StepCostModel(), policy: Policy | None = None,
               slo_scale: float = 5.0, predictor: LengthPredictor | None = None) -> dict[str, float]:
    """Simulate ``specs`` under ``sched_cfg`` (or an explicit ``policy``) and summarize.

    An explicit policy that reads a predictor must be given the same ``predictor``.
    """
    res = simulate(specs, sched_cfg, shape, cost, policy=policy, predictor=predictor)
    recs = records_of(res, cost, sched_cfg.max_num_batched_tokens)
    m = summarize(recs, num_submitted=len(specs), slo_scale=slo_scale)
    st = res.stats
    m["steps"] = float(st.steps)
    m["preemptions"] = float(st.preemptions)
    m["rejected"] = float(len(res.rejected))
    m["distinct_adapters_per_step"] = st.mean_distinct_adapters
    m["adapter_loads_per_s"] = st.adapter_loads / max(res.makespan, 1e-9)
    m["mean_batch"] = st.scheduled_seqs / max(st.steps, 1)
    return m


def workload(n: int, rate: float, tasks: int, setup: StudySetup, seed: int = 1, **kw: object) -> list[RequestSpec]:
    kw.setdefault("job_size", setup.job_size)
    return generate_workload(WorkloadConfig(num_requests=n, rate=rate, num_tasks=tasks, seed=seed,
                                            lengths=setup.lengths, **kw))  # type: ignore[arg-type]


def throughput_bound(specs: Sequence[RequestSpec], setup: StudySetup) -> float:
    """An upper bound on any policy's throughput (req/s over the makespan) for ``specs``.

    Makespan >= max(arrival span, work), where work = every prompt token's prefill cost
    + one load per distinct adapter + the fewest steps that fit every sampled token
    (``max_num_seqs`` per step) and every token (``max_num_batched_tokens`` per step)
    at ``base`` each + every decode's ``decode_seq`` cost + the fewest prefill steps (every request
    prefills once, at most ``max_num_seqs`` / ``max_num_batched_tokens`` per step) at ``prefill_step``. Policies only change batching
    and loads, so none can beat it; it shows how much room FIFO leaves.
    """
    c = setup.cost
    prompt = sum(s.prompt_len for s in specs)
    out = sum(s.output_len for s in specs)
    adapters = len({s.adapter for s in specs if s.adapter is not None})
    steps = max(-(-out // setup.max_num_seqs), -(-(prompt + out) // setup.max_num_batched_tokens))
    prefill_steps = max(-(-len(specs) // setup.max_num_seqs), -(-prompt // setup.max_num_batched_tokens))
    work = (prompt * c.prefill_token + adapters * c.adapter_load + steps * c.base + (out - len(specs)) * c.decode_seq
            + prefill_steps * c.prefill_step)
    span = max(s.arrival for s in specs) - min(s.arrival for s in specs)
    return len(specs) / max(span, work, 1e-9)


def sweep(setup: StudySetup, n: int, rates: Sequence[float], tasks: Sequence[int],
          policies: Sequence[str] = ("fifo", "mlfq", "inlaid"), seed: int = 1) -> list[dict]:
    """One metrics row per (tasks, rate, policy); every policy sees the same trace."""
    rows = []
    for t in tasks:
        for r in rates:
            specs = workload(n, r, t, setup, seed)
            bound = throughput_bound(specs, setup)
            for p in policies:
                m = run_policy(specs, setup.sched_cfg(p), setup.shape, setup.cost, slo_scale=setup.slo_scale)
                rows.append({"tasks": t, "rate": r, "policy": p, **m, "throughput_bound": bound})
    return rows


def saturation_rate(setup: StudySetup, tasks: int, n: int = 1000) -> float:
    """FIFO's service rate (req/s) with every request queued at t=0: the rate the system saturates at.

    Measured as 0.9 n / (time the 0.9 n-th request finishes), so the drain tail (the
    last long requests decoding alone in a shrinking batch) does not count.
    """
    specs = workload(n, 1e6, tasks, setup, seed=99)
    res = simulate(specs, setup.sched_cfg("fifo"), setup.shape, setup.cost)
    finish = sorted(r.finished_time or 0.0 for r in res.requests)
    k = max(int(0.9 * len(finish)), 1)
    return k / max(finish[k - 1] - min(s.arrival for s in specs), 1e-9)


def ratios(rows: Sequence[dict], rate: float) -> list[dict]:
    """inlaid vs fifo and mlfq at one rate, per task count."""
    out = []
    for t in sorted({r["tasks"] for r in rows}):
        by = {r["policy"]: r for r in rows if r["tasks"] == t and r["rate"] == rate}
        for base in ("fifo", "mlfq"):
            if base not in by or "inlaid" not in by:
                continue
            b, i = by[base], by["inlaid"]
            out.append({"tasks": t, "vs": base,
                        "throughput_x": i["throughput_rps"] / b["throughput_rps"],
                        "bound_x": i.get("throughput_bound", float("nan")) / b["throughput_rps"],
                        "latency_reduction": 1 - i["latency_mean"] / b["latency_mean"],
                        "jct_reduction": 1 - i["jct_mean"] / b["jct_mean"],
                        "slo_x": slo_ratio(i["slo_attainment"], b["slo_attainment"]),
                        "slo_inlaid": i["slo_attainment"], "slo_base": b["slo_attainment"]})
    return out


def slo_ratio(ours: float, base: float) -> float:
    """``ours / base`` SLO attainment; ``inf`` when only the baseline attained 0, NaN when both did."""
    if base > 0:
        return ours / base
    return math.inf if ours > 0 else math.nan


def fmt_ratio(x: float) -> str:
    """A ratio for a report: "inf (baseline 0 attained)" / "n/a (both 0 attained)" instead of a huge number."""
    if math.isinf(x):
        return "inf (baseline 0 attained)"
    if math.isnan(x):
        return "n/a (both 0 attained)"
    return f"{x:.2f}x"


def _fmt(v: object) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown_table(rows: Sequence[dict], lead: Sequence[str], keys: Sequence[str] = KEYS) -> str:
    """A Markdown table: ``lead`` columns then ``keys`` (missing keys print as '-')."""
    cols = list(lead) + list(keys)
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(k, "-")) for k in cols) + " |\n" for r in rows)
