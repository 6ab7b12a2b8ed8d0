"""The tensor-parallel group handle and its collectives.

``init_tp`` joins the process group (NCCL on CUDA, gloo on CPU) and returns a
``TPContext``; the model, the LoRA pool and the runner receive that object
(there is no module-global TP state of ours). With ``TPContext.single()`` (world
size 1) every collective is the identity and nothing touches torch.distributed.

Two groups:
- the data group (the default group, ``backend``, timeout ``timeout_s``): the
  per-layer all-reduces and the logits all-gather;
- the control group (gloo, long timeout): rank 0 broadcasts each step's
  command to idle workers, who may wait on it for hours between requests.

Invariant: every rank calls the same collectives in the same order (rank 0
broadcasts the step first, then all ranks run the same forward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(days=7)
"""Workers idle on the control broadcast between requests; only rank 0's death (the group breaks) ends it."""


@dataclass
class TPContext:
    """One rank's view of the tensor-parallel group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None
    """Data-plane process group (None: the default group)."""
    control_group: Any = None
    """gloo group for step commands."""
    comm_time_s: float = 0.0
    """Host time spent in data-plane collectives when ``timing`` is on (benchmarks)."""
    timing: bool = False

    @staticmethod
    def single(device: torch.device | None = None) -> "TPContext":
        return TPContext(device=device or torch.device("cpu"))

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks in place; returns it."""
        if self.world_size == 1:
            return x
        if self.timing:
            return self._timed(lambda: dist.all_reduce(x, group=self.group), x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor, full: int) -> torch.Tensor:
        """Concatenate every rank's ``x [..., P]`` along the last dim and keep the first ``full`` columns."""
        if self.world_size == 1:
            return x[..., :full]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        if self.timing:
            self._timed(lambda: dist.all_gather(parts, x, group=self.group), x)
        else:
            dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)[..., :full]

    def broadcast_control(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj``; every rank returns it (pickled through the gloo control group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The minimum of ``value`` over ranks (control group, CPU)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())

    def _timed(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        import time

        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        fn()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.comm_time_s += time.perf_counter() - t0
        return x


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp(rank: int, world: int, backend: str, init_method: str, timeout_s: float,
            device: torch.device) -> TPContext:
    """Join the ``world``-rank group as ``rank`` (blocks until all ranks joined or ``timeout_s``)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if dist.is_initialized():
        raise ValueError("torch.distributed is already initialised in this process: one tensor-parallel engine "
                         "per process (shut the other down first)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    logger.info("rank %d/%d joined (%s, %s)", rank, world, backend, device)
    return TPContext(rank=rank, world_size=world, device=device, group=None, control_group=control)


def destroy_tp(ctx: TPContext) -> None:
    """Leave the process group (idempotent)."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
