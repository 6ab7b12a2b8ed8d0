"""Background incremental re-quantization of a served GPTQ base when a task is added (MLGPTQ, issue 7).

Owns ``RequantJob`` (one task addition and its status) and ``Requantizer``
(one FIFO worker thread per quantized checkpoint): for a new task it
(a) computes the task's Hessians through the **unquantized** base with the
task's adapter active, reading the fp weights of one decoder layer at a time
from the source checkpoint (``FpSource``); (b) writes them into the
checkpoint's ``hessians/`` store; (c) re-runs ``requantize_layer`` for every
layer over the committed tasks plus the new one and queues the packed tensors
for the serving model; (d) persists the new checkpoint.

Invariants:
- Swaps happen only in ``apply_ready_swaps``, which the engine calls at its
  step boundary (on the engine thread): all seven linears of a layer are
  replaced together between two forwards, so a forward sees layer i all-old or
  all-new. Different layers may be on different bases during a job.
- Where a layer goes is a ``swap_target`` (``check`` / ``snapshot`` /
  ``install`` of the FULL packed layer). Default: the local served model.
  Under tensor parallelism ``inlaid.distributed.requant.TPSwapTarget`` sends
  the full layer to every rank, which cuts its shard with the loader's code;
  the GPTQ itself always runs here on the full layer, so the result is the
  same at every world size.
- The old tensors of every swapped layer are kept until the job ends; a
  failure (any exception, at any phase) drops the job's queued swaps, queues
  the old tensors back (rollback) and removes the task's Hessians: the old
  base keeps serving and the stored checkpoint is untouched.
- Commit record: the task list is written into the safetensors metadata of
  ``model.safetensors`` (key ``inlaid_tasks``); the new file is written beside
  it and ``os.replace``d over it, so the stored weights are old or new, never
  mixed, and the task list always matches them. ``quantize_report.json`` is
  rewritten afterwards (informational; reconciled at start). Hessians of a task
  that is in the store but not in the commit record are leftovers of a crash:
  they are deleted at construction (the addition restarts from scratch when it
  is submitted again; it is not resumed).
- The source of the fp weights is ``quantize_report.json``'s ``model`` (any
  ``model=`` string ``resolve_model_path`` accepts), or ``fp_source=``.
- One job at a time, FIFO; a job quantizes for the tasks committed when it
  starts plus its own, so two additions in a row compose.
- Resource bound: the worker may set its own intra-op thread count
  (``num_threads``; OpenMP thread counts are per thread) and sleeps after each
  layer so it uses at most ``duty_cycle`` of wall time (``DutyCycle``). On CUDA
  a job's calibration and GPTQ run on its own stream (``WorkerStream``, created
  once per job), which is synchronized before each layer is queued for the swap:
  the engine never sees a tensor the worker is still writing. With a served
  CUDA-graph engine, the worker holds its capture lock (``capture_gate``,
  ``CaptureGate``) while it issues GPU work and releases it while it rests, so
  no graph is captured beside the worker's CUDA calls.
- Liveness: every progress event (phase change, layer calibrated / quantized /
  swapped) is logged at INFO with its timing and stamps the job; a watchdog
  thread fails a job that made no progress for ``stall_timeout`` seconds
  ("stalled at layer i/L (phase ...)") exactly like any other failure (queued
  swaps dropped, old layers rolled back), so a wedged worker or engine never
  leaves a job "running" forever. The commit (``os.replace``) happens only while
  the job is still running, under the lock the watchdog takes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inlaid.lora.adapter import LoRAAdapter, validate_adapter
from inlaid.model.arch import ModelArch
from inlaid.quant.calibrate import CalibrationError, capture_task_hessians
from inlaid.quant.hessian import HessianAccumulator, HessianStore
from inlaid.quant.linear import PROJECTIONS, GPTQLinearMethod
from inlaid.quant.linear import swap as swap_linear
from inlaid.quant.pack import WEIGHTS_NAME, _unshared_cpu, load_quantized_checkpoint, validate_layer
from inlaid.quant.quantize_model import HESSIAN_DIR, REPORT_NAME, QuantConfig, requantize_layer
from inlaid.quant.requant_source import (CaptureGate, DutyCycle, FpSource, RequantError, WorkerStream,
                                         lazy_fp_model, samples_from_rows)

__all__ = ["FpSource", "RequantError", "RequantJob", "Requantizer", "committed_tasks", "lazy_fp_model",
           "read_report", "samples_from_rows"]

logger = logging.getLogger(__name__)

TASKS_KEY = "inlaid_tasks"
STATES = ("pending", "running", "done", "failed")
Packed = dict[str, dict[str, torch.Tensor]]


# ---- jobs ------------------------------------------------------------------------------------
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


def _linears(model: torch.nn.Module, idx: int) -> dict[str, torch.nn.Module]:
    layer = model.model.layers[idx]
    return {rel: layer.get_submodule(rel) for rel in PROJECTIONS}


def _snapshot(model: torch.nn.Module, idx: int) -> Packed:
    keys = ("qweight", "qzeros", "scales", "g_idx")
    return {rel: {k: lin._buffers[k] for k in keys} for rel, lin in _linears(model, idx).items()}


class Requantizer:
    """FIFO background re-quantization of one GPTQ checkpoint, hot-swapping layers into ``model``.

    ``model`` is the served GPTQ model (None: only the stored checkpoint is updated). ``on_ready`` is called
    (from the worker thread) whenever swaps are queued, so an idle engine can drain them. ``clock`` and
    ``sleep`` pace the worker (``DutyCycle``; default: ``time.perf_counter`` and a wait on the stop event).
    ``capture_gate``: the serving engine's CUDA-graph capture lock (``CudaGraphRunner.capture_lock``), held
    while the worker issues GPU work. ``stall_timeout``: seconds without progress after which a job fails
    (None: never); ``monotonic`` is the watchdog's clock (injectable for tests).
    """

    def __init__(self, checkpoint: str | Path, arch: ModelArch, model: torch.nn.Module | None = None, *,
                 device: str | torch.device = "cpu", calib_dtype: torch.dtype = torch.float32,
                 serve_dtype: torch.dtype = torch.float32, fp_source: str | Path | None = None,
                 load_format: str = "auto", dummy_seed: int = 0, num_threads: int | None = None,
                 duty_cycle: float = 1.0, max_batch_tokens: int = 4096,
                 on_ready: Callable[[], None] | None = None, swap_target: Any = None,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], object] | None = None, capture_gate: Any = None,
                 stall_timeout: float | None = 900.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._stop = threading.Event()
        if stall_timeout is not None and not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be > 0 seconds (or None to disable), got {stall_timeout}")
        self.stall_timeout, self.monotonic = stall_timeout, monotonic
        self.gate = CaptureGate(capture_gate)
        self._watchdog: threading.Thread | None = None
        self.pacer = DutyCycle(duty_cycle, clock or time.perf_counter, sleep or self._stop.wait)
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.ckpt = Path(checkpoint)
        if not (self.ckpt / WEIGHTS_NAME).is_file():
            raise RequantError(f"{self.ckpt}: no {WEIGHTS_NAME} (sharded or missing checkpoints cannot be "
                               "re-quantized in place)")  # fmt: skip
        self.report = read_report(self.ckpt)
        cfg = self.report["config"]
        self.qcfg = QuantConfig(cfg["method"], cfg["bits"], cfg["group_size"], cfg["sym"], cfg["act_order"],
                                cfg["percdamp"], cfg.get("task"))  # fmt: skip
        if not (self.ckpt / HESSIAN_DIR).is_dir():
            raise RequantError(f"{self.ckpt / HESSIAN_DIR}: no Hessian store; re-quantize with `inlaid quantize`")
        self.store = HessianStore(self.ckpt / HESSIAN_DIR)
        self.arch, self.model = arch, model
        self.device, self.calib_dtype, self.serve_dtype = torch.device(device), calib_dtype, serve_dtype
        self.source = FpSource(fp_source if fp_source is not None else self.report["model"], load_format, dummy_seed)
        self.num_threads, self.duty_cycle, self.max_batch_tokens = num_threads, duty_cycle, max_batch_tokens
        self.on_ready = on_ready
        self.swap_target = swap_target
        """None: swap into ``model`` here; else an object with ``check(idx, packed)``, ``snapshot(idx) -> packed``
        and ``install(idx, packed)`` over full (unsharded) layers, e.g. the tensor-parallel one."""
        self._lock = threading.Lock()
        self._jobs: dict[str, RequantJob] = {}
        self._queue: queue.Queue[RequantJob | None] = queue.Queue()
        self._swaps: deque[tuple[RequantJob, int, Packed, bool]] = deque()
        self._thread: threading.Thread | None = None
        self._check_serving_model()
        self.recover()

    def _check_serving_model(self) -> None:
        if self.model is None:
            return
        method = _linears(self.model, 0)["self_attn.q_proj"].quant_method
        if not isinstance(method, GPTQLinearMethod) or (method.bits, method.group_size) != (
                self.qcfg.bits, self.qcfg.group_size):  # fmt: skip
            raise RequantError(f"the served model is not the {self.qcfg.bits}-bit g{self.qcfg.group_size} GPTQ "
                               f"checkpoint {self.ckpt}; serve that checkpoint to add tasks to it")  # fmt: skip

    # ---- public API ---------------------------------------------------------------------
    def committed_tasks(self) -> list[str]:
        """Tasks the stored checkpoint is quantized for."""
        return committed_tasks(self.ckpt, self.report)

    def recover(self) -> list[str]:
        """Delete Hessians of tasks not in the commit record (left by a crash mid-job); returns their names."""
        stale = sorted(set(self.store.tasks()) - set(self.committed_tasks()))
        for task in stale:
            logger.warning("removing uncommitted Hessians of task %r (an interrupted re-quantization)", task)
            self.store.remove_task(task)
        return stale

    def submit(self, name: str, adapter: LoRAAdapter | None, samples: list[list[int]]) -> RequantJob:
        """Queue the addition of task ``name``; ValueError for bad input (nothing changes then)."""
        if not samples or any(not s for s in samples):
            raise CalibrationError(f"task {name!r}: calibration samples are empty; give at least one row")
        bad = [t for s in samples for t in s if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise CalibrationError(f"task {name!r}: token ids must be in [0, {self.arch.vocab_size}); got {bad[:5]}")
        if adapter is not None:
            validate_adapter(adapter, self.arch.lora_module_shapes(), self.arch.num_layers, adapter.rank)
        with self._lock:
            if name in self.committed_tasks():
                raise RequantError(f"task {name!r} is already part of the quantized base {self.ckpt}; pick another name")
            prev = self._jobs.get(name)
            if prev is not None and prev.state in ("pending", "running"):
                raise RequantError(f"task {name!r} is already being added (re-quantization {prev.state}); "
                                   f"wait for it (GET /v1/adapters/{name})")  # fmt: skip
            job = RequantJob(name, adapter, [list(s) for s in samples], num_layers=self.arch.num_layers)
            self._jobs[name] = job
        self._ensure_worker()
        self._queue.put(job)
        return job

    def status(self, name: str) -> dict[str, Any] | None:
        """The latest job's status for ``name`` (None if never submitted)."""
        with self._lock:
            job = self._jobs.get(name)
            return None if job is None else job.status()

    def statuses(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.status() for j in self._jobs.values()]

    def busy(self) -> bool:
        """True while a job is pending or running, or swaps wait to be applied."""
        with self._lock:
            return bool(self._swaps) or any(j.state in ("pending", "running") for j in self._jobs.values())

    def wait(self, name: str | None = None, timeout: float | None = None, drain: bool = False) -> bool:
        """Wait for job ``name`` (default: all); with ``drain``, apply swaps here (no engine steps needed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if drain:
                self.apply_ready_swaps()
            with self._lock:
                jobs = [self._jobs[name]] if name is not None else list(self._jobs.values())
            if all(j.done.is_set() for j in jobs):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            jobs[0].done.wait(0.02) if len(jobs) == 1 else time.sleep(0.02)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (a running job fails with 'shut down'; its Hessians are removed at next start)."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- engine side: the step boundary ---------------------------------------------------
    def apply_ready_swaps(self) -> int:
        """Install every queued layer (all its linears) into the served model; call between engine steps."""
        applied = 0
        while True:
            with self._lock:
                if not self._swaps:
                    return applied
                job, idx, packed, rollback = self._swaps.popleft()
                try:
                    self._swap_layer(job, idx, packed, rollback)
                except Exception as exc:  # a tensor that does not fit: fail the job, keep serving
                    logger.exception("swapping layer %d of task %r failed", idx, job.name)
                    self._fail_locked(job, f"swap of layer {idx} failed: {exc}")
                    if rollback:  # a rollback that cannot land (e.g. a broken TP group) must not block waiters
                        job.old.pop(idx, None)
                        if not job.old:
                            job.done.set()
            applied += 1

    def _swap_layer(self, job: RequantJob, idx: int, packed: Packed, rollback: bool) -> None:
        assert self.model is not None
        if self.swap_target is not None:
            self.swap_target.check(idx, packed)
            if not rollback:
                job.old.setdefault(idx, self.swap_target.snapshot(idx))
            self.swap_target.install(idx, packed)
        else:
            self._swap_local(job, idx, packed, rollback)
        if rollback:
            job.old.pop(idx, None)
            if not job.old:
                job.done.set()
        else:
            job.layers_swapped += 1
            self._progress(job, f"swapped layer {idx + 1}/{job.num_layers}")
            self._maybe_finish_locked(job)

    def _swap_local(self, job: RequantJob, idx: int, packed: Packed, rollback: bool) -> None:
        assert self.model is not None
        linears = _linears(self.model, idx)
        for rel, lin in linears.items():  # check all seven first: the layer changes whole or not at all
            validate_layer(packed[rel], self.qcfg.bits, self.qcfg.group_size, f"layer {idx} {rel}")
            for key, t in packed[rel].items():
                if key in lin._buffers and lin._buffers[key] is not None and t.shape != lin._buffers[key].shape:
                    raise RequantError(f"layer {idx} {rel}.{key}: shape {tuple(t.shape)} does not fit")
        if not rollback:
            job.old.setdefault(idx, _snapshot(self.model, idx))
        for rel, lin in linears.items():
            swap_linear(lin, packed[rel], self.serve_dtype)

    def _maybe_finish_locked(self, job: RequantJob) -> None:
        if job.state == "running" and job.persisted and (self.model is None or job.layers_swapped == job.num_layers):
            job.state, job.phase, job.finished_at = "done", "done", time.time()
            job.seconds["total"] = job.finished_at - (job.started_at or job.submitted_at)
            job.old.clear()
            job.packed.clear()
            job.done.set()
            logger.info("task %r folded into the quantized base in %.1f s", job.name, job.seconds["total"])

    def _fail_locked(self, job: RequantJob, message: str) -> None:
        if job.state in ("done", "failed"):
            return
        job.state, job.error, job.finished_at = "failed", message, time.time()
        self._swaps = deque(s for s in self._swaps if s[0] is not job)
        for idx, old in sorted(job.old.items()):
            self._swaps.append((job, idx, old, True))
        job.packed.clear()
        if not job.old:
            job.done.set()
        logger.error("re-quantization for task %r failed (old base keeps serving): %s", job.name, message)

    # ---- liveness ------------------------------------------------------------------------------
    def _progress(self, job: RequantJob, event: str) -> None:
        """Stamp and log one progress event of ``job`` (seconds since the job started)."""
        job.progress_at, job.last_event = self.monotonic(), event
        since = time.time() - (job.started_at or job.submitted_at)
        logger.info("requant %r: %s (phase %s, %.2f s into the job)", job.name, event, job.phase, since)

    def stall_message(self, job: RequantJob, idle: float) -> str:
        done = {"calibrate": job.layers_calibrated, "quantize": job.layers_quantized,
                "swap_wait": job.layers_swapped}.get(job.phase, job.layers_quantized)  # fmt: skip
        return (f"stalled at layer {done}/{job.num_layers} (phase {job.phase}): no progress for {idle:.0f} s "
                f"(last: {job.last_event}); the old base keeps serving")  # fmt: skip

    def check_stalled(self) -> list[str]:
        """Fail every running job idle for more than ``stall_timeout``; returns their names (the watchdog)."""
        if self.stall_timeout is None:
            return []
        now, failed = self.monotonic(), []
        with self._lock:
            for job in self._jobs.values():
                if job.state == "running" and job.progress_at is not None and now - job.progress_at > self.stall_timeout:
                    self._fail_locked(job, self.stall_message(job, now - job.progress_at))
                    failed.append(job.name)
        if failed:
            self._notify()  # an idle engine applies the rollback swaps
        return failed

    def _watch(self) -> None:
        assert self.stall_timeout is not None
        interval = min(max(self.stall_timeout / 4, 0.05), 5.0)
        while not self._stop.wait(interval):
            try:
                self.check_stalled()
            except Exception:  # the watchdog must outlive any one bad check
                logger.exception("requant watchdog check failed")

    # ---- worker thread ----------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="inlaid-requant", daemon=True)
                self._thread.start()
            if self.stall_timeout is not None and (self._watchdog is None or not self._watchdog.is_alive()):
                self._watchdog = threading.Thread(target=self._watch, name="inlaid-requant-watchdog", daemon=True)
                self._watchdog.start()

    def _loop(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)  # this thread's OpenMP pool only
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None:
                break
            try:
                self._run_job(job)
            except BaseException as exc:  # _run_job records its own failures; this is the last line of defence
                logger.exception("requant worker: unexpected error in job %r", job.name)
                with self._lock:
                    self._fail_locked(job, f"{type(exc).__name__}: {exc}")
        with self._lock:  # jobs still queued at shutdown
            for job in self._jobs.values():
                if job.state in ("pending", "running"):
                    self._fail_locked(job, "the server shut down before re-quantization finished")

    def _run_job(self, job: RequantJob) -> None:
        job.state, job.started_at = "running", time.time()
        self._progress(job, "started")
        try:
            job.tasks = sorted(set(self.committed_tasks()) | {job.name})
            logger.info("requant %r: quantizing for tasks %s, %d layers", job.name, job.tasks, job.num_layers)
            job.stream = WorkerStream(self.device)
            with job.stream.context():  # the engine keeps the default stream
                self._timed(job, "calibrate", self._calibrate)
                self._timed(job, "quantize", self._quantize)
            self._timed(job, "swap_wait", self._wait_swapped)
            self._timed(job, "persist", self._persist)
        except Exception as exc:
            logger.exception("re-quantization for task %r failed", job.name)
            self._drop_task_hessians(job.name)  # before the job can read as finished
            with self._lock:
                self._fail_locked(job, f"{type(exc).__name__}: {exc}")
            self._notify()
            return
        with self._lock:
            job.persisted = True
            self._maybe_finish_locked(job)

    def _timed(self, job: RequantJob, phase: str, fn: Callable[[RequantJob], None]) -> None:
        if self._stop.is_set():
            raise RequantError("the server shut down before re-quantization finished")
        job.phase = phase
        self._progress(job, f"phase {phase} begins")
        t0 = time.perf_counter()
        fn(job)
        job.seconds[phase] = time.perf_counter() - t0
        self._progress(job, f"phase {phase} done in {job.seconds[phase]:.2f} s")

    def _notify(self) -> None:
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                logger.exception("requant on_ready callback failed")

    def _drop_task_hessians(self, task: str) -> None:
        try:
            if task in self.store.tasks() and task not in self.committed_tasks():
                self.store.remove_task(task)
        except Exception:
            logger.exception("could not remove Hessians of task %r (removed at next start)", task)

    def _calibrate(self, job: RequantJob) -> None:
        fp = lazy_fp_model(self.arch, self.source, self.device, self.calib_dtype)
        if job.name in self.store.tasks():
            self.store.remove_task(job.name)
        self.pacer.start()
        t0 = [time.perf_counter()]

        def sink(idx: int, accs: dict[str, HessianAccumulator]) -> None:
            n = accs["qkv"].n_samples
            self.store.write_layer(job.name, idx, {g: a.hessian for g, a in accs.items()}, n)
            job.layers_calibrated = idx + 1
            self._progress(job, f"calibrated layer {idx + 1}/{job.num_layers} in {time.perf_counter() - t0[0]:.2f} s")
            self._rest()
            t0[0] = time.perf_counter()

        with self.gate.hold():  # no CUDA-graph capture beside this thread's GPU work (released while resting)
            capture_task_hessians(fp, self.arch, job.samples, job.adapter, self.device, self.calib_dtype,
                                  self.max_batch_tokens, sink=sink, desc=f"requant calibrate {job.name}")  # fmt: skip

    def _rest(self) -> None:
        """The duty-cycle pause, without the capture lock (waiting to get it back is not counted as work)."""
        with self.gate.released():
            self.pacer.rest()
        self.pacer.start()

    def _quantize(self, job: RequantJob) -> None:
        for idx in range(self.arch.num_layers):
            if self._stop.is_set():
                raise RequantError("the server shut down before re-quantization finished")
            self.pacer.start()
            t0 = time.perf_counter()
            with self.gate.hold():  # no CUDA-graph capture beside this thread's GPU work
                fp_w = self.source.layer_weights(self.arch, idx, self.calib_dtype, self.device)
                packed = {rel: {k: t.cpu() for k, t in d.items()}
                          for rel, d in requantize_layer(idx, fp_w, self.store, job.tasks, self.qcfg).items()}  # fmt: skip
                if job.stream is not None:
                    job.stream.synchronize()  # every tensor of the layer is written before the engine can see it
            with self._lock:
                if job.state != "running":
                    raise RequantError(job.error or "job stopped")
                job.packed.update({f"model.layers.{idx}.{rel}": d for rel, d in packed.items()})
                job.layers_quantized = idx + 1
                if self.model is not None:
                    self._swaps.append((job, idx, packed, False))
                self._progress(job, f"quantized layer {idx + 1}/{job.num_layers} in {time.perf_counter() - t0:.2f} s"
                               + (", queued for the swap" if self.model is not None else ""))
            self._notify()
            self._rest()

    def _wait_swapped(self, job: RequantJob) -> None:
        while self.model is not None and job.layers_swapped < job.num_layers:
            if job.state != "running":
                raise RequantError(job.error or "job stopped")
            if self._stop.wait(0.01):
                raise RequantError("the server shut down before re-quantization finished")

    def _persist(self, job: RequantJob) -> None:
        """Write the new weights beside the old ones and ``os.replace`` them (the commit), then the report."""
        ckpt = load_quantized_checkpoint(self.ckpt)
        flat: dict[str, torch.Tensor] = dict(ckpt.other_tensors)
        for name, layer in ckpt.layers.items():
            new = dict(job.packed.get(name, layer))
            if "bias" in layer:
                new["bias"] = layer["bias"]
            validate_layer(new, self.qcfg.bits, self.qcfg.group_size, name)
            flat.update({f"{name}.{k}": t for k, t in new.items()})
        meta = {"format": "pt", "quant_method": "gptq", TASKS_KEY: json.dumps(job.tasks)}
        fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.requant-", dir=self.ckpt)
        os.close(fd)
        try:
            save_file(_unshared_cpu(flat), tmp, metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            with self._lock:  # the watchdog may have failed (and rolled back) the job meanwhile: then no commit
                if job.state != "running":
                    raise RequantError(job.error or "job stopped")
                os.replace(tmp, self.ckpt / WEIGHTS_NAME)  # the commit point
        finally:
            Path(tmp).unlink(missing_ok=True)
        try:  # informational: the commit record is the safetensors metadata
            self._update_report(job)
        except Exception:
            logger.exception("could not update %s (the checkpoint itself is committed)", REPORT_NAME)

    def _update_report(self, job: RequantJob) -> None:
        report = dict(self.report)
        report["config"] = {**report["config"], "calib_tasks": job.tasks}
        report["tasks"] = {**report.get("tasks", {}), job.name: {
            "adapter": job.adapter.path if job.adapter is not None else None, "calib": "requant",
            "samples": len(job.samples), "tokens": sum(map(len, job.samples))}}  # fmt: skip
        report["requant"] = [*report.get("requant", []), {"task": job.name, "seconds": dict(job.seconds),
                                                          "finished_at": time.time()}]  # fmt: skip
        _atomic_json(self.ckpt / REPORT_NAME, report)
        self.report = report
