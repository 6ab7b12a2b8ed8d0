"""Issue 9's targets, checked on the serving results: which are met, in which configuration.

Owns: ``TARGETS`` (inlaid vs fifo on the same engine: >= 1.58x throughput, >= 1.76x lower mean latency,
>= 2x lower JCT, >= 10x SLO attainment, at the highest measured load of a configuration), ``target_rows``
and ``targets_section`` (markdown: per configuration met / not met, whether each target is met in at least
one configuration, the mean over configurations, "better than mlfq at every point", and the W4 vs fp16
adapter capacity target from ``capacity.json``). The SLO definition is the runs' own (latency <=
``slo_scale`` x isolated time); nothing here re-derives it. Pure Python.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

TARGETS: tuple[tuple[str, str, float], ...] = (
    ("throughput_tps", "throughput inlaid/fifo", 1.58), ("latency_mean", "latency fifo/inlaid", 1.76),
    ("jct_mean", "JCT fifo/inlaid", 2.0), ("slo_attainment", "SLO inlaid/fifo", 10.0))
HIGHER_BETTER = {"throughput_tps": True, "latency_mean": False, "jct_mean": False, "slo_attainment": True}
CAPACITY_TARGET = 3.0
"""W4 must serve at least this many times as many adapters as fp16 (13B shapes)."""


def ratio(metric: str, ours: dict[str, Any], other: dict[str, Any]) -> float | None:
    """> 1 means ``ours`` is better; None when either value is missing or 0 (an SLO ratio over a baseline
    that attains 0 is unbounded: reported as None, never floored)."""
    a, b = ours.get(metric), other.get(metric)
    if not a or not b:
        return None
    return a / b if HIGHER_BETTER[metric] else b / a


def _complete(*runs: dict[str, Any]) -> bool:
    return all(r["config"].get("complete", True) for r in runs)


def target_rows(points: dict[tuple, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per configuration (model, quant, adapters, driver): the ratios at its highest rate where inlaid and
    fifo both ran to completion, and whether inlaid beat mlfq on all four metrics at every rate."""
    configs: dict[tuple, list[float]] = {}
    for key, pol in points.items():
        if "inlaid" in pol and "fifo" in pol and _complete(pol["inlaid"], pol["fifo"]):
            configs.setdefault(key[:4], []).append(key[4])
    rows = []
    for cfg, rates in sorted(configs.items()):
        top = max(rates)
        pol = points[(*cfg, top)]
        s_in, s_fi = pol["inlaid"]["summary"], pol["fifo"]["summary"]
        vs_mlfq = []
        for rate in rates:
            p = points[(*cfg, rate)]
            if "mlfq" in p and _complete(p["mlfq"]):
                vs_mlfq += [ratio(m, p["inlaid"]["summary"], p["mlfq"]["summary"]) for m, _, _ in TARGETS]
        rows.append({"config": cfg, "rate": top, "ratios": {m: ratio(m, s_in, s_fi) for m, _, _ in TARGETS},
                     "fifo_slo": s_fi.get("slo_attainment"), "inlaid_slo": s_in.get("slo_attainment"),
                     "beats_mlfq": (all(r is not None and r >= 1.0 for r in vs_mlfq) if vs_mlfq else None)})
    return rows


def _cell(r: float | None, goal: float) -> str:
    if r is None:
        return "- (n/a)"
    return f"{r:.2f}x {'met' if r >= goal else 'NOT met'}"


def capacity_lines(path: Path) -> list[str]:
    """The W4 >= 3x fp16 adapters target per budget of ``capacity.json`` (verified count when there is one)."""
    if not path.is_file():
        return [f"- W4 >= {CAPACITY_TARGET:g}x fp16 adapters (13B): not measured (no {path.name})."]
    rows = json.loads(path.read_text()).get("rows", [])
    out = []
    for budget in sorted({r.get("budget_gb") for r in rows if r.get("budget_gb") is not None}):
        by_q = {r["quant"]: r for r in rows if r.get("budget_gb") == budget}
        if {"w4", "fp16"} <= by_q.keys():
            verified = all(by_q[q].get("verified") for q in ("w4", "fp16"))  # both, or neither counts
            n = {q: by_q[q]["verified"] if verified else by_q[q]["max_adapters"] for q in ("w4", "fp16")}
            how = "verified on the GPU" if verified else "accounting only"
            r = n["w4"] / n["fp16"] if n["fp16"] else float("inf")
            out.append(f"- W4 >= {CAPACITY_TARGET:g}x fp16 adapters, {by_q['w4'].get('model', '?')} at {budget:g} GB: "
                       f"{n['w4']} vs {n['fp16']} = {r:.2f}x ({how}): **{'met' if r >= CAPACITY_TARGET else 'NOT met'}**")
    return out or ["- W4 vs fp16 capacity: no budget with both rows in capacity.json."]


def targets_section(points: dict[tuple, dict[str, dict[str, Any]]], capacity: Path | None = None) -> list[str]:
    """Markdown: the target table per configuration and the summary lines."""
    rows = target_rows(points)
    if not rows:
        return ["(no configuration with complete inlaid and fifo runs)", ""]
    head = "| model | quant | adapters | driver | highest complete rate | " + " | ".join(
        f"{lbl} >= {g:g}x" for _, lbl, g in TARGETS) + " | SLO fifo / inlaid | better than mlfq everywhere |"
    out = [head, "|---" * (5 + len(TARGETS) + 2) + "|"]
    for r in rows:
        model, quant, n, drv = r["config"]
        mlfq = {None: "- (no mlfq)", True: "met", False: "NOT met"}[r["beats_mlfq"]]
        slo = f"{r['fifo_slo']:.2f} / {r['inlaid_slo']:.2f}" if r["fifo_slo"] is not None else "-"
        out.append(f"| {model} | {quant} | {n} | {drv} | {r['rate']:g} | "
                   + " | ".join(_cell(r["ratios"][m], g) for m, _, g in TARGETS) + f" | {slo} | {mlfq} |")
    out.append("")
    for m, lbl, g in TARGETS:
        vals = [r["ratios"][m] for r in rows if r["ratios"][m] is not None]
        hit = [f"{r['config'][0]} {r['config'][1]} {r['config'][2]}a {r['config'][3]}" for r in rows
               if (r["ratios"][m] or 0) >= g]
        mean = statistics.fmean(vals) if vals else None
        out.append(f"- {lbl} >= {g:g}x in at least one configuration: **{'met' if hit else 'NOT met'}**"
                   f"{' (' + '; '.join(hit) + ')' if hit else ''}; mean over {len(vals)} configurations "
                   f"{'-' if mean is None else f'{mean:.2f}x'} ({'positive' if mean and mean > 1 else 'not positive'})")
    beats = [r["beats_mlfq"] for r in rows if r["beats_mlfq"] is not None]
    out.append(f"- better than mlfq everywhere (all four metrics, every rate): "
               f"**{'met' if beats and all(beats) else 'NOT met' if beats else 'not measured'}** "
               f"({sum(beats)}/{len(beats)} configurations)")
    if capacity is not None:
        out += capacity_lines(capacity)
    return out + [""]
