"""Serving metrics from finished requests: throughput, latency, TTFT, TPOT, JCT, SLO attainment.

Owns: ``RequestRecord`` (the timestamps one request needs) and ``summarize``.

Definitions (seconds):
- latency = finish - arrival; TTFT = first token - arrival;
  TPOT = (finish - first token) / (output tokens - 1) for outputs of >= 2 tokens.
- JCT of a job = last finish of its requests - first arrival of its requests.
- SLO: a request meets it when latency <= ``slo_scale`` x its isolated run time
  (when known) and, if given, TTFT <= ``ttft_slo`` and TPOT <= ``tpot_slo``.
  Rejected or unfinished requests count as misses.
- throughput over the makespan (first arrival to last finish).
Pure Python (statistics module), no numpy.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    """One finished request's timeline."""

    arrival: float
    first_token: float
    finish: float
    output_len: int
    job_id: str | None = None
    isolated_time: float | None = None
    """Seconds the request takes alone on the engine (for the SLO deadline)."""


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _slo_met(r: RequestRecord, scale: float, ttft_slo: float | None, tpot_slo: float | None) -> bool:
    if r.isolated_time is not None and r.finish - r.arrival > scale * r.isolated_time:
        return False
    if ttft_slo is not None and r.first_token - r.arrival > ttft_slo:
        return False
    if tpot_slo is not None and r.output_len > 1 and (r.finish - r.first_token) / (r.output_len - 1) > tpot_slo:
        return False
    return True


def job_completion_times(records: Sequence[RequestRecord]) -> list[float]:
    """JCT per job (requests without a job id are their own job)."""
    jobs: dict[str, list[RequestRecord]] = {}
    for i, r in enumerate(records):
        jobs.setdefault(r.job_id if r.job_id is not None else f"#{i}", []).append(r)
    return [max(r.finish for r in rs) - min(r.arrival for r in rs) for rs in jobs.values()]


def summarize(records: Sequence[RequestRecord], num_submitted: int | None = None, slo_scale: float = 5.0,
              ttft_slo: float | None = None, tpot_slo: float | None = None) -> dict[str, float]:
    """All metrics of one run as a flat dict (see the module docstring for definitions)."""
    if not records:
        raise ValueError("no finished requests to summarize")
    n_sub = num_submitted if num_submitted is not None else len(records)
    start = min(r.arrival for r in records)
    span = max(max(r.finish for r in records) - start, 1e-9)
    lat = [r.finish - r.arrival for r in records]
    ttft = [r.first_token - r.arrival for r in records]
    tpot = [(r.finish - r.first_token) / (r.output_len - 1) for r in records if r.output_len > 1]
    jct = job_completion_times(records)
    met = sum(_slo_met(r, slo_scale, ttft_slo, tpot_slo) for r in records)
    return {
        "finished": float(len(records)),
        "throughput_rps": len(records) / span,
        "throughput_tps": sum(r.output_len for r in records) / span,
        "latency_mean": statistics.fmean(lat),
        "latency_median": statistics.median(lat),
        "latency_p99": percentile(lat, 99),
        "ttft_mean": statistics.fmean(ttft),
        "ttft_p99": percentile(ttft, 99),
        "tpot_mean": statistics.fmean(tpot) if tpot else float("nan"),
        "jct_mean": statistics.fmean(jct),
        "slo_attainment": met / max(n_sub, 1),
        "makespan": span,
    }
