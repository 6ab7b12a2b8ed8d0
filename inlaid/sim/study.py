"""Glue between the simulator and the metrics: run one configuration, return its metrics.

Owns: ``run_policy`` (workload + policy + engine shape -> metrics dict), used by
``benchmarks/scheduling_study.py`` and the tests. Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence

from inlaid.bench.metrics import RequestRecord, summarize
from inlaid.config import SchedulerConfig
from inlaid.core.policies import Policy
from inlaid.sim.cost_model import StepCostModel
from inlaid.sim.simulator import EngineShape, RequestSpec, SimResult, simulate


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
               slo_scale: float = 5.0) -> dict[str, float]:
    """Simulate ``specs`` under ``sched_cfg`` (or an explicit ``policy``) and summarize."""
    res = simulate(specs, sched_cfg, shape, cost, policy=policy)
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
