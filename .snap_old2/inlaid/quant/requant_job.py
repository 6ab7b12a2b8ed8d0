"""One re-quantization job's record and its liveness (split out of ``inlaid.quant.requant``).

Owns ``RequantJob`` (one task addition: inputs, state, progress counters, the
packed layers and the old layers kept for rollback) with its progress-event
bookkeeping (``progress``, ``stall_message``, ``finish_if_complete``), and
``StallWatchdog`` (the thread that makes a ``Requantizer`` fail jobs that made
no progress for ``stall_timeout`` seconds).

Invariants:
- Job state only moves forward (pending -> running -> done | failed); a
  ``Requantizer`` mutates its jobs under its lock, except for the worker's own
  counters while the job is running.
- Every progress event stamps ``progress_at`` on the watchdog's clock (an
  injectable ``monotonic``) and is logged at INFO under the
  ``inlaid.quant.requant`` logger (the one operators and
  ``benchmarks/dynamic.py`` turn to INFO), not this module's.
- ``StallWatchdog`` only detects; failing a stalled job (and rolling it back)
  is the ``check`` callback's work. One bad check never kills the thread; the
  thread ends when the owner's stop event is set.
- No global mutable state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from inlaid.lora.adapter import LoRAAdapter
from inlaid.quant.requant_source import WorkerStream

__all__ = ["STATES", "Packed", "RequantJob", "StallWatchdog"]

logger = logging.getLogger("inlaid.quant.requant")  # the worker's logger: progress events read as one stream

STATES = ("pending", "running", "done", "failed")
Packed = dict[str, dict[str, torch.Tensor]]


@dataclass
class RequantJob:
    """One task addition: inputs, progress and outcome (``status()`` is its JSON)."""

    name: str
    adapter: LoRAAdapter | None
    samples: list[list[int]]
    state: str = "pending"
    phase: str = "queued"
    num_layers: int = 0
    layers_calibrated: int = 0
    layers_quantized: int = 0
    layers_swapped: int = 0
    tasks: list[str] = field(default_factory=list)
    error: str | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    persisted: bool = False
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    packed: Packed = field(default_factory=dict, repr=False)
    old: dict[int, Packed] = field(default_factory=dict, repr=False)
    stream: WorkerStream | None = field(default=None, repr=False)
    progress_at: float | None = field(default=None, repr=False)
    """Watchdog clock time of the last progress event (None until the job starts)."""
    last_event: str = "submitted"

    def status(self) -> dict[str, Any]:
        """``{"name", "quantization": pending|running|done|failed, "phase", "layer", "num_layers", ...}``."""
        return {
            "name": self.name, "quantization": self.state, "phase": self.phase,
            "layer": self.layers_quantized, "layers_swapped": self.layers_swapped, "num_layers": self.num_layers,
            "layers_calibrated": self.layers_calibrated, "last_event": self.last_event,
            "tasks": list(self.tasks), "error": self.error, "samples": len(self.samples),
            "tokens": sum(map(len, self.samples)), "submitted_at": self.submitted_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "seconds": dict(self.seconds),
        }  # fmt: skip

    def progress(self, now: float, event: str) -> None:
        """Stamp (``now``: the watchdog's clock) and log one progress event (seconds since the job started)."""
        self.progress_at, self.last_event = now, event
        since = time.time() - (self.started_at or self.submitted_at)
        logger.info("requant %r: %s (phase %s, %.2f s into the job)", self.name, event, self.phase, since)

    def stall_message(self, idle: float) -> str:
        """The job's error when the watchdog fails it after ``idle`` seconds without progress."""
        done = {"calibrate": self.layers_calibrated, "quantize": self.layers_quantized,
                "swap_wait": self.layers_swapped}.get(self.phase, self.layers_quantized)  # fmt: skip
        return (f"stalled at layer {done}/{self.num_layers} (phase {self.phase}): no progress for {idle:.0f} s "
                f"(last: {self.last_event}); the old base keeps serving")  # fmt: skip

    def finish_if_complete(self, swapping: bool) -> None:
        """Mark the job done once it is persisted and (when ``swapping``) every layer is swapped in."""
        if self.state == "running" and self.persisted and (not swapping or self.layers_swapped == self.num_layers):
            self.state, self.phase, self.finished_at = "done", "done", time.time()
            self.seconds["total"] = self.finished_at - (self.started_at or self.submitted_at)
            self.old.clear()
            self.packed.clear()
            self.done.set()
            logger.info("task %r folded into the quantized base in %.1f s", self.name, self.seconds["total"])


class StallWatchdog:
    """Calls ``check`` every ``min(max(stall_timeout / 4, 0.05), 5)`` s in a daemon thread until ``stop`` is set.

    ``stall_timeout``: seconds without progress after which a running job counts as stalled (None: never,
    and no thread); ``monotonic``: the clock ``RequantJob.progress`` stamps are read on.
    """

    def __init__(self, stall_timeout: float | None, monotonic: Callable[[], float], stop: threading.Event,
                 check: Callable[[], object]) -> None:  # fmt: skip
        if stall_timeout is not None and not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be > 0 seconds (or None to disable), got {stall_timeout}")
        self.stall_timeout, self.monotonic = stall_timeout, monotonic
        self._stop, self._check = stop, check
        self._thread: threading.Thread | None = None

    def stalled(self, jobs: Iterable[RequantJob]) -> list[tuple[RequantJob, float]]:
        """``(job, idle seconds)`` for every running job idle for more than ``stall_timeout``."""
        if self.stall_timeout is None:
            return []
        now = self.monotonic()
        return [(job, now - job.progress_at) for job in jobs if job.state == "running"
                and job.progress_at is not None and now - job.progress_at > self.stall_timeout]  # fmt: skip

    def ensure_running(self) -> None:
        """Start the thread if it is enabled and not alive (the owner calls this under its lock)."""
        if self.stall_timeout is not None and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._watch, name="inlaid-requant-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        assert self.stall_timeout is not None
        interval = min(max(self.stall_timeout / 4, 0.05), 5.0)
        while not self._stop.wait(interval):
            try:
                self._check()
            except Exception:  # the watchdog must outlive any one bad check
                logger.exception("requant watchdog check failed")
