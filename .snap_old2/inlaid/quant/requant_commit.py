"""The re-quantized checkpoint's commit record and persistence (split out of ``inlaid.quant.requant``).

Owns reading a checkpoint's ``quantize_report.json`` and commit record
(``read_report``, ``committed_tasks``) and writing a job's result
(``commit_weights``, then ``write_report``).

Invariants:
- Commit record: the task list is written into the safetensors metadata of
  ``model.safetensors`` (key ``TASKS_KEY``); the new file is written beside it
  and ``os.replace``d over it, so the stored weights are old or new, never
  mixed, and the task list always matches them. ``commit_weights`` does the
  ``os.replace`` only while the job is still ``running``, under the caller's
  lock (the one the stall watchdog's check takes to fail a job), and never
  leaves its temporary file behind.
- ``quantize_report.json`` is informational (rewritten atomically after the
  commit; reconciled at start): ``committed_tasks`` prefers the commit record.
- No global mutable state.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inlaid.quant.pack import (
    WEIGHTS_NAME,
    _unshared_cpu,
    load_quantized_checkpoint,
    validate_layer,
)
from inlaid.quant.quantize_model import REPORT_NAME, QuantConfig
from inlaid.quant.requant_job import RequantJob
from inlaid.quant.requant_source import RequantError

__all__ = ["TASKS_KEY", "commit_weights", "committed_tasks", "read_report", "write_report"]

TASKS_KEY = "inlaid_tasks"


def read_report(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``quantize_report.json`` (RequantError if missing or unusable)."""
    path = ckpt / REPORT_NAME
    try:
        report = json.loads(path.read_text())
        cfg = report["config"]
        QuantConfig(cfg["method"], cfg["bits"], cfg["group_size"], cfg["sym"], cfg["act_order"], cfg["percdamp"],
                    cfg.get("task"))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RequantError(f"{path}: missing or unusable ({e}); incremental re-quantization needs a checkpoint "
                           "written by `inlaid quantize` (report + hessians/ store)") from e  # fmt: skip
    if cfg["method"] in ("rtn", "gptq-single"):
        raise RequantError(f"{ckpt} was quantized with {cfg['method']!r}, which does not aggregate task "
                           "Hessians; re-quantize it with mlgptq (or a repair) or gptq-mixed first")  # fmt: skip
    return report


def committed_tasks(ckpt: Path, report: dict[str, Any]) -> list[str]:
    """Tasks the stored weights are quantized for: the safetensors commit record, else the report's."""
    with safe_open(str(ckpt / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata() or {}
    if TASKS_KEY in meta:
        return sorted(json.loads(meta[TASKS_KEY]))
    return sorted(report["config"].get("calib_tasks", []))


def _atomic_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit_weights(ckpt_dir: Path, job: RequantJob, qcfg: QuantConfig, lock: AbstractContextManager[Any]) -> None:
    """Write ``job``'s packed layers (others unchanged) beside the stored weights, then ``os.replace`` them.

    The replace (the commit point) happens under ``lock`` and only while the job is still running
    (RequantError otherwise: the watchdog failed and rolled it back meanwhile).
    """
    ckpt = load_quantized_checkpoint(ckpt_dir)
    flat: dict[str, torch.Tensor] = dict(ckpt.other_tensors)
    for name, layer in ckpt.layers.items():
        new = dict(job.packed.get(name, layer))
        if "bias" in layer:
            new["bias"] = layer["bias"]
        validate_layer(new, qcfg.bits, qcfg.group_size, name)
        flat.update({f"{name}.{k}": t for k, t in new.items()})
    meta = {"format": "pt", "quant_method": "gptq", TASKS_KEY: json.dumps(job.tasks)}
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.requant-", dir=ckpt_dir)
    os.close(fd)
    try:
        save_file(_unshared_cpu(flat), tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        with lock:
            if job.state != "running":
                raise RequantError(job.error or "job stopped")
            os.replace(tmp, ckpt_dir / WEIGHTS_NAME)  # the commit point
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_report(ckpt_dir: Path, report: dict[str, Any], job: RequantJob) -> dict[str, Any]:
    """Write (atomically) and return ``report`` updated with ``job``'s task, its calibration and timings."""
    report = dict(report)
    report["config"] = {**report["config"], "calib_tasks": job.tasks}
    report["tasks"] = {**report.get("tasks", {}), job.name: {
        "adapter": job.adapter.path if job.adapter is not None else None, "calib": "requant",
        "samples": len(job.samples), "tokens": sum(map(len, job.samples))}}  # fmt: skip
    report["requant"] = [*report.get("requant", []), {"task": job.name, "seconds": dict(job.seconds),
                                                      "finished_at": time.time()}]  # fmt: skip
    _atomic_json(ckpt_dir / REPORT_NAME, report)
    return report
