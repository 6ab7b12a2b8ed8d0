"""PNG plots of ``inlaid bench serve`` results: one metric per figure, one line per system/policy.

Owns: ``load_results``, ``series`` and ``plot_results``.

Input: JSON files written by ``inlaid bench serve --out`` (``config.label``,
``config.rate``, ``config.num_tasks``, ``summary.*``). The x axis is the request
rate or the number of tasks; each line is one ``config.label``. When the other
dimension varies across the files too (e.g. several task counts on a rate
plot), it is added to the line name so that points of different
configurations are never joined.

Figures: throughput (output tokens/s), mean latency, mean JCT, SLO attainment
(``METRICS``), written as ``{prefix}_{metric}_vs_{x}.png``. matplotlib is the
optional ``bench`` extra and is imported only when plotting (a clear
``ImportError`` says how to install it); the Agg backend is used, so no display
is needed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS: tuple[tuple[str, str], ...] = (
    ("throughput_tps", "throughput (output tokens/s)"),
    ("latency_mean", "mean latency (s)"),
    ("jct_mean", "mean job completion time (s)"),
    ("slo_attainment", "SLO attainment"),
)
X_KEYS = {"rate": ("rate", "request rate (req/s)"), "tasks": ("num_tasks", "number of tasks (adapters)")}


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read result JSONs; a file that is not a ``bench serve`` result is a ValueError naming it."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"no such result file: {path}")
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict) or not {"config", "summary"} <= obj.keys():
            raise ValueError(f"{path} is not a `inlaid bench serve` result (needs 'config' and 'summary')")
        for key in ("label", "rate", "num_tasks"):
            if key not in obj["config"]:
                raise ValueError(f"{path}: config has no {key!r}")
        out.append(obj)
    return out


def series(results: Sequence[dict[str, Any]], x: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    """line name -> sorted (x, metric) points; missing/None metric values are left out."""
    if x not in X_KEYS:
        raise ValueError(f"x must be one of {sorted(X_KEYS)}, got {x!r}")
    xkey = X_KEYS[x][0]
    other = "num_tasks" if xkey == "rate" else "rate"
    vary = len({r["config"][other] for r in results}) > 1
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        cfg = r["config"]
        name = str(cfg["label"])
        if vary:
            name += f", {cfg[other]:g} tasks" if other == "num_tasks" else f", {cfg[other]:g} req/s"
        val = r["summary"].get(metric)
        if val is not None:
            lines.setdefault(name, []).append((float(cfg[xkey]), float(val)))
    return {k: sorted(v) for k, v in sorted(lines.items())}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'inlaid[bench]' (or pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(paths: Sequence[str | Path], x: str, out_dir: str | Path, prefix: str = "serving") -> list[Path]:
    """Write one PNG per metric in ``METRICS``; returns their paths."""
    results = load_results(paths)
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, title in METRICS:
        lines = series(results, x, metric)
        fig, ax = plt.subplots(figsize=(5.5, 4.0))
        for name, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel(X_KEYS[x][1])
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs {x}")
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
        if x == "tasks" and any(p[0] >= 100 for pts in lines.values() for p in pts):
            ax.set_xscale("log")
        path = out / f"{prefix}_{metric}_vs_{x}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    logger.info("wrote %d plots to %s", len(written), out)
    return written
