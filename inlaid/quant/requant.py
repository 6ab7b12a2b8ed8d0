"""Background incremental re-quantization of a served GPTQ base when a task is added (MLGPTQ, issue 7).

Owns ``Requantizer`` (one FIFO worker thread per quantized checkpoint, with
the capture-gate use and the per-layer swap queue). Split out (and
re-exported here): the job record and stall watchdog (``requant_job``), the
commit record and persistence (``requant_commit``), the local swap target
(``requant_swap``), the fp source, pacing and capture gate
(``requant_source``). For a new task it
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
  ``install`` of the FULL packed layer). Default: the local served model
  (``requant_swap.LocalSwapTarget``).
  Under tensor parallelism ``inlaid.distributed.requant.TPSwapTarget`` sends
  the full layer to every rank, which cuts its shard with the loader's code;
  the GPTQ itself always runs here on the full layer, so the result is the
  same at every world size.
- The old tensors of every swapped layer are kept until the job ends; a
  failure (any exception, at any phase) drops the job's queued swaps, queues
  the old tensors back (rollback) and removes the task's Hessians: the old
  base keeps serving and the stored checkpoint is untouched.
- Commit record: the task list in ``model.safetensors``' metadata, replaced
  atomically with the weights (``requant_commit.commit_weights``). Hessians of a
  task that is in the store but not in the commit record are leftovers of a
  crash: they are deleted at construction (the addition restarts from scratch
  when it is submitted again; it is not resumed).
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
  swapped) is logged at INFO with its timing and stamps the job; the watchdog
  (``StallWatchdog`` -> ``check_stalled``) fails a job that made no progress
  for ``stall_timeout`` seconds ("stalled at layer i/L (phase ...)") exactly
  like any other failure (queued swaps dropped, old layers rolled back). The
  commit (``os.replace``) happens only while the job is still running, under
  the lock the watchdog's check takes.
- ``requantize_layer`` and ``WorkerStream`` are looked up in this module's
  namespace when a job runs (tests replace them here).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from inlaid.lora.adapter import LoRAAdapter, validate_adapter
from inlaid.model.arch import ModelArch
from inlaid.quant.calibrate import CalibrationError, capture_task_hessians
from inlaid.quant.hessian import HessianAccumulator, HessianStore
from inlaid.quant.pack import WEIGHTS_NAME
from inlaid.quant.quantize_model import (
    HESSIAN_DIR,
    REPORT_NAME,
    QuantConfig,
    requantize_layer,
)
from inlaid.quant.requant_commit import (
    TASKS_KEY,
    commit_weights,
    committed_tasks,
    read_report,
    write_report,
)
from inlaid.quant.requant_job import STATES, Packed, RequantJob, StallWatchdog
from inlaid.quant.requant_source import (
    CaptureGate,
    DutyCycle,
    FpSource,
    RequantError,
    WorkerStream,
    lazy_fp_model,
    samples_from_rows,
)
from inlaid.quant.requant_swap import LocalSwapTarget, check_serving_model

__all__ = ["STATES", "TASKS_KEY", "FpSource", "Packed", "RequantError", "RequantJob", "Requantizer",
           "committed_tasks", "lazy_fp_model", "read_report", "samples_from_rows"]

logger = logging.getLogger(__name__)


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
        self.watchdog = StallWatchdog(stall_timeout, monotonic, self._stop, self.check_stalled)
        self.stall_timeout, self.monotonic = stall_timeout, monotonic
        self.gate = CaptureGate(capture_gate)
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
        if self.model is not None:
            check_serving_model(self.model, self.qcfg, self.ckpt)
        self.recover()

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

    def has_ready_swaps(self) -> bool:
        """True while quantized layers wait for ``apply_ready_swaps``."""
        with self._lock:
            return bool(self._swaps)

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
        local = self.swap_target is None
        target = LocalSwapTarget(self.model, self.qcfg, self.serve_dtype) if local else self.swap_target
        target.check(idx, packed)
        if not rollback:
            job.old.setdefault(idx, target.snapshot(idx))
        target.install(idx, packed)
        if rollback:
            job.old.pop(idx, None)
            if not job.old:
                job.done.set()
        else:
            job.layers_swapped += 1
            self._progress(job, f"swapped layer {idx + 1}/{job.num_layers}")
            job.finish_if_complete(swapping=self.model is not None)

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
        """Stamp (on the watchdog's clock) and log one progress event of ``job``."""
        job.progress(self.monotonic(), event)

    def stall_message(self, job: RequantJob, idle: float) -> str:
        return job.stall_message(idle)

    def check_stalled(self) -> list[str]:
        """Fail every running job idle for more than ``stall_timeout``; returns their names (the watchdog)."""
        if self.stall_timeout is None:
            return []
        with self._lock:
            stalled = self.watchdog.stalled(self._jobs.values())
            for job, idle in stalled:
                self._fail_locked(job, self.stall_message(job, idle))
        if stalled:
            self._notify()  # an idle engine applies the rollback swaps
        return [job.name for job, _ in stalled]

    # ---- worker thread ----------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="inlaid-requant", daemon=True)
                self._thread.start()
            self.watchdog.ensure_running()

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
            job.finish_if_complete(swapping=self.model is not None)

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
        commit_weights(self.ckpt, job, self.qcfg, self._lock)  # refuses once the watchdog failed the job
        try:  # informational: the commit record is the safetensors metadata
            self._update_report(job)
        except Exception:
            logger.exception("could not update %s (the checkpoint itself is committed)", REPORT_NAME)

    def _update_report(self, job: RequantJob) -> None:
        self.report = write_report(self.ckpt, self.report, job)
