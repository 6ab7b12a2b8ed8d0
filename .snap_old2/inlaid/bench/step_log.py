"""Per-step log of an engine replay, its summary, and the per-policy comparison on the serving page.

Owns: ``COLUMNS`` (the log's schema), ``step_fields`` (what a step's ``SchedulerOutput`` says about it),
``summarize_steps`` (one run's log -> means) and ``step_analysis`` (the page's table: per point, every
policy's mean decode batch, prefill steps, distinct adapters per step, step / execute / host time).

Everything comes from what the engine already exposes to the replay driver (``engine_driver``): the
step's ``SchedulerOutput`` (seen by the wrapped runner), the scheduler's counters and queues, and the
driver's timer around ``engine.step()`` and around the runner's ``execute``. Nothing is added to the
engine. Times are seconds of the replay's timer (CUDA-synchronized wall time on a GPU, process CPU time
on a CPU). ``host`` = step - execute: scheduling, update and output processing (plus launch
overheads outside the runner). Pure Python.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from inlaid.core.outputs import SchedulerOutput

COLUMNS: tuple[str, ...] = ("t_end", "step_s", "exec_s", "sched_s", "prefill_seqs", "decode_seqs", "prefill_tokens",
                            "distinct_adapters", "adapter_loads", "preemptions", "waiting", "running")
"""One row per ``engine.step()``: virtual-clock time at the step's end, the step's measured seconds, the
runner's execute seconds (0 when the step executed nothing), the scheduler's ``schedule()`` seconds (the
policy's host cost; 0 if the engine stops calling ``self.scheduler.schedule``), prefilling / decoding sequences, prefill
tokens, distinct adapters in the batch, adapters copied into slots before the forward, preemptions during
the step (scheduler counter delta), waiting and running requests after the step."""

OPTIONAL = frozenset({"sched_s"})
"""Columns a log may lack (written before they existed); their means are then None."""

SUMMARY_KEYS = ("steps", "prefill_steps", "decode_only_steps", "mean_decode_batch", "mean_prefill_seqs",
                "mean_prefill_tokens", "mean_distinct_adapters", "adapter_loads", "preemptions", "mean_step_s",
                "mean_prefill_step_s", "mean_decode_step_s", "decode_step_cv", "mean_exec_s", "mean_host_s", "mean_sched_s", "total_s",
                "slow_steps")


def step_fields(out: SchedulerOutput | None) -> list[int]:
    """[prefill seqs, decode seqs, prefill tokens, distinct adapters, adapter loads] of one step."""
    if out is None:
        return [0, 0, 0, 0, 0]
    pre = [s for s in out.scheduled if s.is_prefill]
    return [len(pre), len(out.scheduled) - len(pre), sum(len(s.token_ids) for s in pre),
            len({s.adapter_slot for s in out.scheduled if s.adapter_slot >= 0}), len(out.adapter_loads)]


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _cv(xs: Sequence[float]) -> float | None:
    """Coefficient of variation (jitter of one kind of step; ``sim_predict.NoisyCost`` takes it)."""
    return statistics.pstdev(xs) / statistics.fmean(xs) if len(xs) > 1 and statistics.fmean(xs) > 0 else None


def summarize_steps(log: dict[str, Any]) -> dict[str, Any]:
    """Means of one run's step log (``{"columns": [...], "rows": [[...], ...]}``); ``slow_steps`` counts
    steps longer than 5x the median step of their kind (prefill / decode-only): compiles, captures, stalls."""
    cols = list(log["columns"])
    if missing := [c for c in COLUMNS if c not in cols and c not in OPTIONAL]:
        raise ValueError(f"step log lacks columns {missing}; expected {list(COLUMNS)}")
    rows = [dict(zip(cols, r, strict=True)) for r in log["rows"]]
    work = [r for r in rows if r["prefill_seqs"] or r["decode_seqs"]]
    pre = [r for r in work if r["prefill_seqs"]]
    dec = [r for r in work if not r["prefill_seqs"]]
    slow = 0
    for kind in (pre, dec):
        if kind:
            med = statistics.median(r["step_s"] for r in kind)
            slow += sum(r["step_s"] > 5 * med for r in kind)
    return {"steps": len(rows), "prefill_steps": len(pre), "decode_only_steps": len(dec),
            "mean_decode_batch": _mean([r["decode_seqs"] for r in work]),
            "mean_prefill_seqs": _mean([r["prefill_seqs"] for r in pre]),
            "mean_prefill_tokens": _mean([r["prefill_tokens"] for r in pre]),
            "mean_distinct_adapters": _mean([r["distinct_adapters"] for r in work]),
            "adapter_loads": sum(r["adapter_loads"] for r in rows), "preemptions": sum(r["preemptions"] for r in rows),
            "mean_step_s": _mean([r["step_s"] for r in work]), "mean_prefill_step_s": _mean([r["step_s"] for r in pre]),
            "mean_decode_step_s": _mean([r["step_s"] for r in dec]), "mean_exec_s": _mean([r["exec_s"] for r in work]),
            "decode_step_cv": _cv([r["step_s"] for r in dec]),
            "mean_host_s": _mean([r["step_s"] - r["exec_s"] for r in work]),
            "mean_sched_s": _mean([r["sched_s"] for r in work if "sched_s" in r]),
            "total_s": sum(r["step_s"] for r in rows), "slow_steps": slow}


def _f(x: Any, scale: float = 1.0, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x * scale, fmt)


def analysis_rows(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows (one per variant) of step summaries; inlaid and its warm-up first, then the rest by name."""
    order = sorted(summaries, key=lambda v: (0 if v == "inlaid" else 1 if v.startswith("inlaid (") else 2, v))
    out = []
    for v in order:
        s = summaries[v]
        out.append(f"| {v} | {s['steps']} | {s['prefill_steps']} | {_f(s['mean_prefill_seqs'])} | "
                   f"{_f(s['mean_decode_batch'])} | {_f(s['mean_distinct_adapters'])} | {s['adapter_loads']} | "
                   f"{s['preemptions']} | {_f(s['mean_prefill_step_s'], 1e3)} | {_f(s['mean_decode_step_s'], 1e3)} | "
                   f"{_f(s['decode_step_cv'], 1.0, '.2f')} | "
                   f"{_f(s['mean_host_s'], 1e3)} | {_f(s['mean_sched_s'], 1e3)} | {_f(s['total_s'])} | "
                   f"{s['slow_steps']} |")
    return out


ANALYSIS_HEAD = ("| variant | steps | prefill steps | seqs / prefill step | decode batch | distinct adapters / step | "
                 "adapter loads | preemptions | prefill step ms | decode step ms | decode step cv | host ms / step | "
                 "schedule() ms / step "
                 "| sum of steps s | slow steps |")


def step_analysis(points: dict[tuple, dict[str, dict[str, Any]]],
                  checks: dict[str, dict[tuple, dict[str, dict[str, Any]]]] | None = None) -> list[str]:
    """The page section: per (model, quant, adapters, rate) point with step logs, one row per variant;
    ``checks`` (kind -> points, e.g. ``{"warm-up": ..., "repeat": ...}``: unmeasured runs of the same trace)
    add rows ``<variant> (<kind>)``."""
    lines: list[str] = []
    for key in sorted(points):
        sums = {v: summarize_steps(r["step_log"]) for v, r in points[key].items() if r.get("step_log")}
        for kind, pts in (checks or {}).items():
            for v, r in pts.get(key, {}).items():
                if r.get("step_log"):
                    sums[f"{v} ({kind})"] = summarize_steps(r["step_log"])
        if not sums:
            continue
        model, quant, n, drv, rate = key
        lines += [f"**{model}, {quant}, {n} adapters, {drv}, {rate:g} req/s**", "", ANALYSIS_HEAD,
                  "|---" * 15 + "|"] + analysis_rows(sums) + [""]
    if not lines:
        return ["(no run with a step log: runs before session 4 recorded none)", ""]
    return ["Per-step means from each run's step log (`step_log` in its JSON; what the engine already exposes: "
            "the step's SchedulerOutput, the scheduler's counters, the driver's timers). decode batch = decoding "
            "sequences per step; host ms = step minus the runner's execute (scheduling, update, outputs), "
            "schedule() ms = the scheduler's share of it (the policy's host cost); slow "
            "steps = longer than 5x the median step of their kind (compiles, graph captures, stalls). An "
            "ablation that is faster than inlaid should show here as fewer prefill steps, bigger decode batches, "
            "less host time, or inlaid's slow steps; the warm-up row (same trace, before the sweep) separates "
            "first-run costs and the repeat row (same trace, after the sweep) drift over the sweep; decode step "
            "cv = the jitter to feed `python -m inlaid.bench.sim_predict --noise-run ... --noise-cv`.",
            ""] + lines
