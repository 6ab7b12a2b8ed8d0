"""Discrete-event simulator that drives the real ``core`` Scheduler with a fake runner.

Owns: the simulated clock, request arrivals, the fake runner and step timing.

Invariants:
- The scheduler is the same ``inlaid.core.scheduler.Scheduler`` the engine uses;
  only the runner is fake. It samples a non-EOS token until a request reaches its
  true output length, then EOS: the scheduler never sees the true length.
- Time advances by ``StepCostModel.step_time`` per step; when idle it jumps to the
  next arrival. Requests arrive at their ``arrival`` time (seconds).
- Pure Python, no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from inlaid.config import SchedulerConfig
from inlaid.core.outputs import RunnerOutput, SchedulerOutput
from inlaid.core.policies import Policy
from inlaid.core.predictor import LengthPredictor
from inlaid.core.scheduler import QueueFullError, Scheduler, SchedulerStats
from inlaid.request import Request
from inlaid.sampling import SamplingParams
from inlaid.sim.cost_model import StepCostModel

logger = logging.getLogger(__name__)

EOS_TOKEN = 0
OTHER_TOKEN = 1


@dataclass(frozen=True)
class RequestSpec:
    """One simulated request; ``output_len`` is the ground truth the scheduler must not see."""

    request_id: str
    arrival: float
    adapter: str | None
    prompt_len: int
    output_len: int
    max_tokens: int
    job_id: str | None = None


@dataclass(frozen=True)
class EngineShape:
    """The simulated engine's capacity."""

    num_blocks: int = 2048
    block_size: int = 16
    num_adapter_slots: int = 32
    max_model_len: int = 4096


@dataclass
class SimResult:
    """Finished requests (with their timestamps), rejects, step statistics and makespan."""

    requests: list[Request]
    specs: dict[str, RequestSpec]
    rejected: list[str]
    stats: SchedulerStats
    makespan: float
    step_times: list[float] = field(default_factory=list)


def _fake_runner(out: SchedulerOutput, truth: dict[str, int]) -> RunnerOutput:
    sampled = {}
    for s in out.scheduled:
        if s.sample:
            k = s.num_output_tokens + 1
            sampled[s.request_id] = EOS_TOKEN if k >= truth[s.request_id] else OTHER_TOKEN
    return RunnerOutput(sampled=sampled)


def _make_request(spec: RequestSpec) -> Request:
    return Request(spec.request_id, [OTHER_TOKEN] * spec.prompt_len, SamplingParams(max_tokens=spec.max_tokens),
                   adapter=spec.adapter, eos_token_id=EOS_TOKEN, arrival_time=spec.arrival)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(specs: Sequence[RequestSpec], sched_cfg: SchedulerConfig, shape: EngineShape = EngineShape(),
             cost: StepCostModel = StepCostModel(), policy: Policy | None = None,
             predictor: LengthPredictor | None = None, max_steps: int = 10_000_000) -> SimResult:
    """Run ``specs`` through a Scheduler until every request has finished or been rejected."""
    clock = _Clock()
    sched = Scheduler(sched_cfg, shape.num_blocks, shape.block_size, shape.num_adapter_slots, shape.max_model_len,
                      clock=clock, predictor=predictor, policy=policy)
    pending = sorted(specs, key=lambda s: s.arrival)
    truth = {s.request_id: s.output_len for s in pending}
    finished: list[Request] = []
    rejected: list[str] = []
    step_times: list[float] = []
    i = 0
    for _ in range(max_steps):
        while i < len(pending) and pending[i].arrival <= clock.t:
            try:
                sched.add_request(_make_request(pending[i]))
            except QueueFullError:
                rejected.append(pending[i].request_id)
            i += 1
        if not sched.has_unfinished_requests():
            if i >= len(pending):
                break
            clock.t = pending[i].arrival
            continue
        out = sched.schedule()
        dt = cost.step_time(out)
        step_times.append(dt)
        clock.t += dt
        changed = sched.update(out, _fake_runner(out, truth))
        finished.extend(r for r in changed if r.is_finished)
    else:
        raise RuntimeError(f"simulation did not finish in {max_steps} steps")
    return SimResult(finished, {s.request_id: s for s in pending}, rejected, sched.stats, clock.t, step_times)
