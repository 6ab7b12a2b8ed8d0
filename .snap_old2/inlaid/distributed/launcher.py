"""Rank 0's side of tensor parallelism: spawn ranks 1..N-1, broadcast each step, detect dead ranks.

Process model (vLLM's multiproc executor, in small):
- rank 0 is the engine process: it alone schedules (``core.Scheduler``),
  tokenizes and samples;
- ranks 1..N-1 are ``torch.multiprocessing`` *spawn* processes running
  ``worker_main``: join the group, build their shard (``inlaid.worker.rank``),
  then loop on the control broadcast;
- each step rank 0 broadcasts ``("step", SchedulerOutput, adapters)`` (one
  ``broadcast_object_list`` on the gloo control group), where ``adapters`` maps
  every adapter name of ``adapter_loads`` to its host ``LoRAAdapter`` (so every
  rank loads identical weights into the same slot; slot state stays
  replicated); then all ranks run the same forward;
- between steps rank 0 may broadcast ``("swap_layer", idx, full_layer)`` (a
  re-quantized layer, ``inlaid.distributed.requant``): every rank cuts its
  shard and swaps it, all or none; ``("shutdown",)`` ends the workers.

Failure: before every step rank 0 checks that every worker process is alive;
collectives time out after ``ParallelConfig.distributed_timeout_s``. Any error
inside a TP step raises ``TPWorkerError`` (ranks may have diverged, so the group
is then unusable) and later steps raise it at once: the engine fails loudly,
it never hangs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
import weakref
from typing import Any, Callable, TypeVar

import torch

from inlaid.config import EngineConfig
from inlaid.core.outputs import RunnerOutput, SchedulerOutput
from inlaid.distributed.context import TPContext, default_backend, destroy_tp, init_tp
from inlaid.distributed.errors import TPWorkerError

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0
T = TypeVar("T")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: ``cuda:(base + r)`` on CUDA, the CPU otherwise."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


class TPWorkerGroup:
    """Rank 0's handle on the worker processes and the group."""

    def __init__(self, ctx: TPContext, procs: list[Any], store_dir: str) -> None:
        self.ctx, self.procs, self.store_dir = ctx, procs, store_dir
        self.closed = False
        self._finalizer = weakref.finalize(self, _terminate, procs, store_dir)

    def check_alive(self) -> None:
        """Raise ``TPWorkerError`` naming every worker process that is gone."""
        dead = [(r, p.exitcode) for r, p in enumerate(self.procs, start=1) if not p.is_alive()]
        if dead:
            raise TPWorkerError("tensor-parallel worker(s) died: " + ", ".join(f"rank {r} (exit code {c})"
                                                                             for r, c in dead))

    def send(self, message: tuple[Any, ...]) -> None:
        self.check_alive()
        self.ctx.broadcast_control(message)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers (with a shutdown message if ``graceful`` and all are alive, else terminate them) and
        leave the group; idempotent. Use ``graceful=False`` when the ranks may be inside different collectives."""
        if self.closed:
            return
        self.closed = True
        try:
            if graceful and all(p.is_alive() for p in self.procs):
                self.ctx.broadcast_control(("shutdown",))
        except Exception:  # a broken group: fall through to terminate
            logger.warning("tensor-parallel shutdown message failed; terminating workers")
        for p in self.procs:
            p.join(JOIN_TIMEOUT_S if graceful else 0)
        self._finalizer()  # terminate whatever is still running
        destroy_tp(self.ctx)
        logger.info("tensor-parallel workers stopped (exit codes %s)", [p.exitcode for p in self.procs])


def _terminate(procs: list[Any], store_dir: str) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(JOIN_TIMEOUT_S)
    shutil.rmtree(store_dir, ignore_errors=True)


def start_workers(config: EngineConfig, device: torch.device) -> TPWorkerGroup:
    """Spawn ranks 1..N-1 and join the group as rank 0 (raises ``TPWorkerError`` if a rank does not join)."""
    world = config.parallel.tensor_parallel_size
    store_dir = tempfile.mkdtemp(prefix="inlaid-tp-")
    init_method = "file://" + os.path.join(store_dir, "store")
    ctx_mp = torch.multiprocessing.get_context("spawn")
    procs = []
    for rank in range(1, world):
        p = ctx_mp.Process(target=worker_main, args=(rank, world, init_method, config, str(device)),
                           name=f"inlaid-tp-rank{rank}", daemon=True)
        p.start()
        procs.append(p)
    try:
        ctx = init_tp(0, world, default_backend(device), init_method, config.parallel.distributed_timeout_s,
                      rank_device(device, 0))
    except Exception as exc:
        _terminate(procs, store_dir)
        raise TPWorkerError(f"tensor-parallel group of {world} ranks did not form: {exc}") from exc
    return TPWorkerGroup(ctx, procs, store_dir)


class TPDriverRunner:
    """Rank 0's runner: broadcasts each step to the workers, then runs it locally (same interface as ModelRunner)."""

    def __init__(self, runner: Any, group: TPWorkerGroup, get_adapter: Any) -> None:
        self.runner, self.group, self.get_adapter = runner, group, get_adapter
        self.broken: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        adapters = {name: self.get_adapter(name) for name in set(out.adapter_loads.values())}
        return self.run_on_all(("step", out, adapters), lambda: self.runner.execute(out), "step")

    def run_on_all(self, message: tuple[Any, ...], local: Callable[[], T], what: str = "command") -> T:
        """Broadcast ``message`` to the workers, then run ``local()`` here (the same work as rank 0).

        Any exception breaks the group for good (the ranks may have diverged) and raises ``TPWorkerError``.
        """
        if self.broken is not None:
            raise TPWorkerError(f"tensor-parallel group is broken ({self.broken}); rebuild the engine")
        try:
            self.group.send(message)
            return local()
        except Exception as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            self._diagnose()
            raise TPWorkerError(f"tensor-parallel {what} failed: {self.broken}") from exc

    def _diagnose(self) -> None:
        try:
            self.group.check_alive()
        except TPWorkerError as dead:
            self.broken = f"{dead}; {self.broken}"

    def shutdown(self) -> None:
        self.group.shutdown(graceful=self.broken is None)


def _exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """A daemon thread that ends this worker when rank 0's process is gone (killed without cleanup)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period_s)
        os._exit(3)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def worker_main(rank: int, world: int, init_method: str, config: EngineConfig, device: str) -> None:
    """Entry point of ranks 1..N-1: join, build the shard, run broadcast steps until told to stop."""
    from inlaid.worker.rank import build_rank, resolve_dtype  # spawned process: import on demand

    logging.basicConfig(level=os.environ.get("INLAID_TP_LOG", "WARNING"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops us
    _exit_with_parent(os.getppid())
    dev = rank_device(torch.device(device), rank)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ctx = init_tp(rank, world, default_backend(dev), init_method, config.parallel.distributed_timeout_s, dev)
    adapters: dict[str, Any] = {}
    try:
        parts = build_rank(config, dev, resolve_dtype(config.model.dtype, dev), adapters.__getitem__, ctx)
        while True:
            message = ctx.broadcast_control()
            if message[0] == "shutdown":
                break
            if message[0] == "swap_layer":
                _swap_layer(parts, ctx, message[1], message[2], config)
                continue
            _, sched_out, loads = message
            adapters.clear()
            adapters.update(loads)
            parts.runner.execute(sched_out)
            adapters.clear()
    finally:
        destroy_tp(ctx)


def _swap_layer(parts: Any, ctx: TPContext, idx: int, full: Any, config: EngineConfig) -> None:
    """A worker's side of a re-quantization swap (``inlaid.distributed.requant``); a refusal is agreed, not fatal."""
    from inlaid.distributed.requant import swap_layer_shard
    from inlaid.worker.rank import resolve_dtype

    error = swap_layer_shard(parts.model, parts.arch, ctx, idx, full, resolve_dtype(config.model.dtype, ctx.device))
    if error is not None:
        logger.error("layer %d swap refused on every rank: %s", idx, error)
