"""The serving results page (issue 9): markdown tables and plots regenerated from result JSONs.

Owns: ``write_page`` and its sections. Inputs, all under one results directory:
- ``json/*.json``: ``bench serve`` results (HTTP driver) and ``policy_sweep`` results (engine driver),
  same schema; ``config.extra`` holds model, quant, adapters, policy/variant and driver. Files without
  ``config``/``summary`` (the sweep's ``*_probe.json``) feed the saturation table instead.
- ``peft_baseline.json`` (``benchmarks/peft_baseline.py``) and ``capacity.json``
  (``benchmarks/capacity.py``), when present.
The run directory is ``json/`` by default (``run=``: e.g. ``json_s4``); ``<run>/warmup/`` and ``<run>/repeat/``
hold the sweep's unmeasured runs before and after it (step-log comparison only); ``history=`` names earlier sessions' run directories,
shown at the end (targets and ratios), never mixed into this run's tables.
Sections: issue 9's targets met / not met per configuration (``page_targets``), inlaid vs fifo / vs mlfq
ratios per point, ablations (inlaid without prediction / grouping / aging, relative to inlaid), the
per-policy step-log analysis (``step_log``), the simulator's prediction of every measured point
(``sim_predict``, with ``cost_model=``), HTTP vs in-process cross-check, every point, the PEFT baseline,
adapter capacity, plots (``inlaid.bench.plot``), history. A point is keyed by (model, quant, adapters,
driver, rate).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from inlaid.bench.page_targets import targets_section
from inlaid.bench.plot import plot_results
from inlaid.bench.step_log import step_analysis

logger = logging.getLogger(__name__)
COLUMNS = ("throughput_tps", "latency_mean", "jct_mean", "ttft_mean", "tpot_mean", "slo_attainment")
Result = tuple[Path, dict[str, Any]]


def load_dir(json_dir: Path) -> tuple[list[Result], list[dict[str, Any]]]:
    """(results, probes) of ``json_dir``."""
    results, probes = [], []
    for p in sorted(json_dir.glob("*.json")):
        obj = json.loads(p.read_text())
        if "probe" in obj:
            probes.append({**obj, "file": p.stem})
            continue
        if not {"config", "summary"} <= obj.keys():
            logger.warning("skipping %s: not a result file", p)
            continue
        ex = obj["config"].setdefault("extra", {})
        ex["adapters"] = int(ex.get("adapters", obj["config"].get("num_tasks", 0)))
        ex.setdefault("driver", "http")
        ex.setdefault("model", "?")
        ex.setdefault("quant", "?")
        results.append((p, obj))
    return results, probes


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _point(r: dict[str, Any]) -> tuple:
    ex = r["config"]["extra"]
    return ex["model"], ex["quant"], ex["adapters"], ex["driver"], r["config"]["rate"]


def by_point(results: list[Result]) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = {}
    for _, r in results:
        out.setdefault(_point(r), {})[r["config"]["label"]] = r
    return out


def ratio_rows(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Throughput a/b, latency b/a, JCT b/a, SLO a/b (all: > 1 means a is better)."""
    return [_ratio(a.get("throughput_tps"), b.get("throughput_tps")), _ratio(b.get("latency_mean"), a.get("latency_mean")),
            _ratio(b.get("jct_mean"), a.get("jct_mean")), _ratio(a.get("slo_attainment"), b.get("slo_attainment"))]


def ratio_table(results: list[Result], ours: str, other: str) -> list[str]:
    """``ours`` vs ``other`` at every point where both ran."""
    head = (f"| model | quant | adapters | driver | rate | throughput {ours}/{other} | latency {other}/{ours} | "
            f"JCT {other}/{ours} | SLO {ours}/{other} |")
    rows = [head, "|---" * 9 + "|"]
    for (model, quant, n, drv, rate), pol in sorted(by_point(results).items()):
        if ours in pol and other in pol:
            cut = [lbl for lbl in (ours, other) if not pol[lbl]["config"].get("complete", True)]
            # a run stopped by its wall cap served fewer requests: its ratios would compare different work
            cells = ratio_rows(pol[ours]["summary"], pol[other]["summary"]) if not cut else \
                [f"n/a ({', '.join(cut)} incomplete)"] * 4
            rows.append(f"| {model} | {quant} | {n} | {drv} | {rate:g} | " + " | ".join(cells) + " |")
    return rows + [""] if len(rows) > 2 else ["(no pairs)", ""]


def cross_check(results: list[Result]) -> list[str]:
    """The same (model, quant, adapters, policy, rate) measured over HTTP and in-process."""
    rows = ["| model | quant | adapters | policy | rate | driver | " + " | ".join(COLUMNS) + " |",
            "|---" * (6 + len(COLUMNS)) + "|"]
    pts = by_point(results)
    for (model, quant, n, drv, rate), pol in sorted(pts.items()):
        twin = pts.get((model, quant, n, "engine", rate)) if drv == "http" else None
        for label, r in sorted(pol.items()):
            if twin and label in twin:
                for d, rr in (("http", r), ("engine", twin[label])):
                    s = rr["summary"]
                    rows.append(f"| {model} | {quant} | {n} | {label} | {rate:g} | {d} | "
                                + " | ".join(_f(s.get(c)) for c in COLUMNS) + " |")
    return rows + [""] if len(rows) > 2 else ["(no HTTP point has an in-process twin at the same rate)", ""]


def group_tables(results: list[Result]) -> list[str]:
    """One table per (model, quant, adapters, driver): rows rate x policy."""
    lines: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    for _, r in results:
        groups.setdefault(_point(r)[:4], []).append(r)
    for (model, quant, n, drv), rs in sorted(groups.items()):
        lines += [f"### {model}, {quant}, {n} adapters, {drv} driver", "",
                  "| rate | policy | ok/sent | complete | " + " | ".join(COLUMNS) + " |",
                  "|---" * (4 + len(COLUMNS)) + "|"]
        for r in sorted(rs, key=lambda r: (r["config"]["rate"], r["config"]["label"])):
            s = r["summary"]
            lines.append(f"| {r['config']['rate']:g} | {r['config']['label']} | {s.get('ok')}/{s.get('sent')} | "
                         f"{r['config'].get('complete', True)} | " + " | ".join(_f(s.get(c)) for c in COLUMNS) + " |")
        lines.append("")
    return lines


def probe_table(probes: list[dict[str, Any]]) -> list[str]:
    if not probes:
        return []
    rows = ["| run | peak req/s | peak tok/s | mean output | isolated TTFT a (s) | TTFT b (s/token) | TPOT (s) |",
            "|---|---|---|---|---|---|---|"]
    for p in probes:
        pr, iso = p["probe"], p.get("isolated") or {}
        rows.append(f"| {p['file'].removesuffix('_probe')} | {_f(pr.get('rps'))} | {_f(pr.get('tps'))} | "
                    f"{_f(pr.get('mean_output'))} | {_f(iso.get('ttft_a'))} | {_f(iso.get('ttft_b'))} | "
                    f"{_f(iso.get('tpot'))} |")
    return ["## Saturation probes (all requests at t=0, fifo; rates below are multiples of peak req/s)", ""] \
        + rows + [""]


def peft_section(path: Path) -> list[str]:
    if not path.is_file():
        return ["## transformers + PEFT baseline", "", f"(not run: no {path.name})", ""]
    obj = json.loads(path.read_text())
    rows = ["| adapters | requests | distinct adapters/batch | PEFT tok/s | inlaid tok/s | inlaid/PEFT |",
            "|---|---|---|---|---|---|"]
    for r in obj["rows"]:
        rows.append(f"| {r['adapters']} | {r['requests']} | {_f(r.get('distinct_per_batch'))} | "
                    f"{_f(r.get('peft_tps'))} | {_f(r.get('inlaid_tps'))} | {_ratio(r.get('inlaid_tps'), r.get('peft_tps'))} |")
    return ["## transformers + PEFT baseline", "", obj.get("note", ""), ""] + rows + [""] + \
        [f"Skipped: {', '.join(obj['skipped'])}", ""] * bool(obj.get("skipped"))


def capacity_section(path: Path) -> list[str]:
    if not path.is_file():
        return ["## Adapter capacity", "", f"(not run: no {path.name})", ""]
    obj = json.loads(path.read_text())
    body = ["## Adapter capacity (device slots at one memory budget)", "", obj.get("note", ""), ""]
    body += _capacity_rows(obj["rows"]) + [""] + obj.get("summary_lines", []) + [""]
    if obj.get("verified_earlier"):
        body += ["Verified earlier on the GPU (engines built at N and N+step under the budget), with the slot layout "
                 "of that run (targets column):", ""] + _capacity_rows(obj["verified_earlier"]) + [""]
    return body


def _capacity_rows(rows: list[dict]) -> list[str]:
    out = ["| model | quant | slot holds | budget GB | weights GB | slot MB | KV reserve GB | max adapters (accounting) | "
           "verified at N | N+step fails with | peak GB at N |", "|---" * 11 + "|"]
    for r in rows:
        targets = r.get("targets", "all 7")
        held = "all 7" if targets.count(",") == 6 else targets.replace("_proj", "").replace(",", "+")
        out.append(f"| {r.get('model', '-')} | {r['quant']} | {held} | {_f(r.get('budget_gb'))} | "
                   f"{_f(r.get('weights_gb'))} | {_f(r.get('slot_mb'))} | {_f(r.get('kv_gb'))} | {r['max_adapters']} | "
                   f"{_f(r.get('verified'))} | {r.get('fail_error') or '-'} | {_f(r.get('peak_gb'))} |")
    return out


def make_plots(results: list[Result], plot_dir: Path, md_dir: Path) -> list[str]:
    """Plots vs rate per (model, quant, adapters, driver); markdown image lines."""
    lines: list[str] = []
    groups: dict[tuple, list[Path]] = {}
    for p, r in results:
        groups.setdefault(tuple(str(x) for x in _point(r)[:4]), []).append(p)
    for key, files in sorted(groups.items()):
        if len({json.loads(f.read_text())["config"]["rate"] for f in files}) < 2:
            continue
        paths = plot_results(files, "rate", plot_dir, prefix="_".join(key))
        lines.append(f"**{', '.join(key)}** (x = rate):\n")
        lines.append(" ".join(f"![{p.stem}]({os.path.relpath(p, md_dir)})" for p in paths) + "\n")
    return lines


def cpu_http_section(cpu_dir: Path | None) -> list[str]:
    """The HTTP runs on this (shared, 2-core) CPU: bundled model + demo adapters, every policy at each rate."""
    if cpu_dir is None or not (cpu_dir / "json").is_dir():
        return []
    results, _ = load_dir(cpu_dir / "json")
    if not results:
        return []
    body = ["## HTTP on CPU (shared 2-core machine): bundled SmolLM2-135M + its demo adapters", "",
            "A real `inlaid serve` per policy (fp32 on CPU, the 12 demo adapters: real weights, ranks 8-64, "
            "targets from q,v to all 7) driven by `inlaid bench serve`; prompts are random token ids with "
            "task-suite lengths. The machine's 2 cores were shared with other jobs during the run, so absolute "
            "numbers are distorted and noisy; ratios between policies are from single runs (a `-repeat` group is a second run "
            "of the same point: the spread between the two is the noise). Not a GPU result."]
    probe = cpu_dir / "saturation_probe.json"
    if probe.is_file():
        s = json.loads(probe.read_text())["summary"]
        body += ["", f"Saturation probe (fifo, {s.get('sent')} requests sent at once): "
                 f"{_f(s.get('throughput_rps'))} req/s, {_f(s.get('throughput_tps'))} tok/s."]
    cmd = cpu_dir / "command.txt"
    cmds = cmd.read_text().split("\n") if cmd.is_file() else []
    body += ["", "Commands (in order):", ""] + [f"    {c}" for c in cmds if c.strip()] + [""] if cmds else [""]
    body += ["Inlaid vs fifo:", ""] + ratio_table(results, "inlaid", "fifo")
    body += ["Inlaid vs mlfq:", ""] + ratio_table(results, "inlaid", "mlfq")
    return body + group_tables(results)


def _load_checks(run_dir: Path) -> dict[str, dict[tuple, dict[str, dict[str, Any]]]]:
    """The sweep's unmeasured runs: ``warmup/`` (before it) and ``repeat/`` (after it), as points."""
    out = {}
    for kind, sub in (("warm-up", "warmup"), ("repeat", "repeat")):
        results, _ = load_dir(run_dir / sub) if (run_dir / sub).is_dir() else ([], [])
        out[kind] = by_point(results)
    return out


def sim_section(results: list[Result], cost_model: Path | None) -> list[str]:
    """The simulator's prediction of every measured engine-driver point (``inlaid.bench.sim_predict``)."""
    title = ["## Simulator prediction vs GPU measurement (every engine-driver point)", ""]
    if cost_model is None or not cost_model.is_file():
        return title + [f"(not computed: no cost model {cost_model})", ""]
    from inlaid.bench.sim_predict import prediction_rows, prediction_table
    from inlaid.sim.cost_model import load_cost_model
    from inlaid.sim.simulator import EngineShape

    cost, meta = load_cost_model(cost_model)
    blocks = int(meta.get("engine", {}).get("num_blocks", 15352))
    points: dict[tuple, dict[str, tuple[Path, dict[str, Any]]]] = {}
    for p, r in results:
        points.setdefault(_point(r), {})[r["config"]["label"]] = (p, r)
    slots = {int(r["config"]["extra"].get("slots", 32)) for _, r in results} or {32}
    shape = EngineShape(num_blocks=blocks, block_size=16, num_adapter_slots=max(slots), max_model_len=4096)
    return title + prediction_table(prediction_rows(points, cost, shape), cost_model.name)


def history_section(results_dir: Path, runs: tuple[str, ...]) -> list[str]:
    """Earlier sessions' run directories: their targets and ratio tables (kept, not re-measured)."""
    body: list[str] = []
    for name in runs:
        results, _ = load_dir(results_dir / name) if (results_dir / name).is_dir() else ([], [])
        if not results:
            continue
        body += [f"### History: `{results_dir.name}/{name}/`", "", "Targets at that run's highest load:", ""]
        body += targets_section(by_point(results)) + ["Inlaid vs fifo:", ""] + ratio_table(results, "inlaid", "fifo")
        body += ["Inlaid vs mlfq:", ""] + ratio_table(results, "inlaid", "mlfq")
        for abl in ("inlaid-nopred", "inlaid-nogroup", "inlaid-noaging"):
            body += [f"Inlaid vs {abl}:", ""] + ratio_table(results, "inlaid", abl)
    return (["## Earlier sessions (history)", ""] + body) if body else []


def write_page(results_dir: Path, md: Path, header: list[str], cpu_http: Path | None = None, run: str = "json",
               history: tuple[str, ...] = (), cost_model: Path | None = None) -> bool:
    """Regenerate ``md`` from ``results_dir/run`` (+ ``history`` run dirs, the CPU HTTP section of
    ``cpu_http``, the simulator's predictions with ``cost_model``); False (nothing written) when there is no
    result at all."""
    run_dir = results_dir / run
    results, probes = load_dir(run_dir) if run_dir.is_dir() else ([], [])
    extra = [results_dir / "peft_baseline.json", results_dir / "capacity.json"]
    hist = [h for h in history if (results_dir / h).is_dir() and any((results_dir / h).glob("*.json"))]
    if not results and not hist and not any(p.is_file() for p in extra):
        logger.warning("no results in %s: page not written", results_dir)
        return False
    points = by_point(results)
    body = header + [f"## Targets (issue 9), this run (`{results_dir.name}/{run}/`)", ""]
    body += targets_section(points, extra[1])
    body += ["## Inlaid vs fifo (S-LoRA's policy)", ""] + ratio_table(results, "inlaid", "fifo")
    body += ["## Inlaid vs mlfq (FastServe's policy)", ""] + ratio_table(results, "inlaid", "mlfq")
    body += ["## Ablations (inlaid vs inlaid without one ingredient; > 1 means the ingredient helps)", ""]
    for abl in ("inlaid-nopred", "inlaid-nogroup", "inlaid-noaging"):
        body += [f"**{abl}**", ""] + ratio_table(results, "inlaid", abl)
    body += ["## Where the step time goes (per-policy step logs)", ""] + step_analysis(points, _load_checks(run_dir))
    body += sim_section(results, cost_model)
    body += ["## HTTP (client-measured) vs in-process driver at the same point", ""] + cross_check(results)
    body += probe_table(probes) + peft_section(extra[0]) + capacity_section(extra[1]) + cpu_http_section(cpu_http)
    body += ["## All points", ""] + group_tables(results)
    body += ["## Plots", ""] + make_plots(results, results_dir / "plots", md.parent)
    body += history_section(results_dir, tuple(hist))
    md.write_text("\n".join(body) + "\n")
    logger.info("wrote %s (%d result files)", md, len(results))
    return True
