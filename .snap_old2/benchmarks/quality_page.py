"""The page of ``benchmarks/quality.py``: markdown rendering and ``--from-json`` merging of its result JSONs.

Owns turning one run's JSON (``quality.py`` rewrites it after every cell) or several merged runs into the
results page: ``load_runs`` (read, merge, score saved generations), ``merge_runs``, ``to_markdown`` and
``render_page`` (the page with an optional hand-written notes file placed after the title, command and
legend). Invariants: rendering is a pure function of the JSON data and the notes file (the committed
pages regenerate byte for byte); a cell present in several runs keeps the first run's value. No torch here.

    R=benchmarks/results; PYTHONPATH=. python benchmarks/quality.py --from-json \
        $R/quality_h200_a.json,$R/quality_h200_b.json,$R/quality_h200_c.json,$R/quality_h200_e.json \
        --notes $R/quality_notes.md --out $R/quality.md
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["load_runs", "merge_runs", "render_page", "rescore_cells", "to_markdown"]


def _rel_drop(base: dict, q: dict, key: str) -> float:
    b, v = base[key], q[key]
    if math.isnan(b) or math.isnan(v):
        return float("nan")
    if key == "metric":
        return (b - v) / b if b > 0 else float("nan")
    return (v - b) / b


def _mean_drop(cells: dict, cfg: str, method: str, tasks: list[str], key: str) -> str:
    d = [_rel_drop(cells[f"fp|unquantized|{t}"], cells[f"{cfg}|{method}|{t}"], key)
         for t in tasks if f"{cfg}|{method}|{t}" in cells and f"fp|unquantized|{t}" in cells]  # fmt: skip
    d = [x for x in d if not math.isnan(x)]
    return f"{100 * sum(d) / len(d):+.1f}% ({len(d)})" if d else "n/a"


def to_markdown(data: dict[str, Any]) -> str:
    """The results page from the run's JSON (``--from-json`` regenerates it without running anything)."""
    args, cells = data["args"], data["cells"]
    tasks = sorted({k.split("|")[2] for k in cells})
    methods = ["unquantized", *[m for m in args["methods"].split(",")]]
    info = data.get("info", {})
    legend = (f"Device: {info.get('device', '?')}. Each cell: task metric (0-100, greedy, first {args['gen_limit']} "
              f"test examples, generation capped at {args['max_new_tokens_cap']} new tokens) / answer-token NLL "
              f"(nats, teacher forcing, first {args['limit']} test examples). `mean rel. drop` averages "
              "(unquantized - q) / unquantized of the metric over tasks with a non-zero unquantized metric, and "
              "(q - unquantized) / unquantized of the NLL; the count of tasks averaged is in brackets. "
              "gptq-single is one model per task, each evaluated on its own task only.")
    lines = ["# Quantized shared base: per-task quality", "", f"Command: `{args['command']}`", "", legend, ""]
    no_adapter = [t for t, has in info.get("tasks", {}).items() if not has]
    if no_adapter:
        lines += [f"Tasks without an adapter (bare base): {', '.join(no_adapter)}.", ""]
    for cfg in args["configs"].split(","):
        if not any(k.startswith(cfg + "|") for k in cells):
            continue
        bits, gs = cfg.split(":")
        lines += [f"## {bits}-bit, group {gs}, {'symmetric' if args['sym'] else 'asymmetric'}", "",
                  "| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]  # fmt: skip
        for t in tasks:
            row = []
            for m in methods:
                c = cells.get(f"{'fp' if m == 'unquantized' else cfg}|{m}|{t}")
                row.append("-" if c is None else f"{c['metric']:.1f} / {c['nll']:.3f}")
            lines.append(f"| {t} | " + " | ".join(row) + " |")
        for key in ("metric", "nll"):
            drops = [_mean_drop(cells, cfg, m, tasks, key) for m in methods[1:]]
            lines.append(f"| **mean rel. drop ({key})** | - | " + " | ".join(drops) + " |")
        lines.append("")
    if data.get("dropped"):
        lines += ["Not run (did not fit the time budget): " + "; ".join(data["dropped"]) + ".", ""]
    lines += ["Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in data["seconds"].items()) + ". Memory: "
              + ", ".join(f"{k} {v:.0f}" for k, v in info.items() if k.startswith("peak")) + ".", ""]  # fmt: skip
    return "\n".join(lines)


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run from several (e.g. configs split over two GPUs): cells, configs and methods united (first run's
    order first), timings labelled.

    A cell present in several runs (the unquantized model is evaluated by each) keeps the first run's value;
    timings of run k > 0 are prefixed with its configs (and its methods where they differ from the first run's)
    so all stay visible.
    """
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    merged = {"args": dict(first["args"]), "cells": {}, "seconds": {}, "dropped": [], "info": dict(first["info"])}
    configs: list[str] = []
    methods: list[str] = []
    for k, r in enumerate(runs):
        for key, cell in r["cells"].items():
            merged["cells"].setdefault(key, cell)
        same = r["args"]["methods"] == first["args"]["methods"]
        label = "" if k == 0 else f"[{r['args']['configs']}{'' if same else '; ' + r['args']['methods']}] "
        merged["seconds"].update({label + name: v for name, v in r["seconds"].items()})
        merged["dropped"] += r.get("dropped", [])
        merged["info"].update({label + name: v for name, v in r["info"].items() if name.startswith("peak")})
        configs += [c for c in r["args"]["configs"].split(",") if c not in configs]
        methods += [m for m in r["args"]["methods"].split(",") if m not in methods]
    merged["args"]["configs"] = ",".join(configs)
    merged["args"]["methods"] = ",".join(methods)
    merged["args"]["command"] = " ; ".join(r["args"]["command"] for r in runs)
    return merged


def rescore_cells(cells: dict[str, dict[str, Any]]) -> None:
    """Score, in place, the cells whose predictions were saved unscored (the device has no metric packages)."""
    from inlaid.tasks.evaluate import score_predictions

    for key, cell in cells.items():
        preds = cell.pop("predictions", None)
        if preds:
            cell["metric"] = score_predictions(key.split("|")[2], preds)


def load_runs(paths: str) -> dict[str, Any]:
    """The runs of ``paths`` (comma-separated JSONs) merged into one, saved generations scored."""
    data = merge_runs([json.loads(Path(p).read_text()) for p in paths.split(",")])
    rescore_cells(data["cells"])
    return data


def render_page(data: dict[str, Any], notes: str | Path | None = None) -> str:
    """The page; ``notes`` (a markdown file) goes after the title, command and legend (the first paragraphs).

    A run written before ``--note`` was removed may carry ``args["note"]``: it is still put on top as a quote.
    """
    note = data["args"].get("note", "")
    page = to_markdown(data)
    if notes:
        head, _, tables = page.partition("\n## ")
        page = f"{head}\n{Path(notes).read_text().rstrip()}\n\n## {tables}"
    return (f"> {note}\n\n" if note else "") + page
