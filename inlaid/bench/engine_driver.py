"""Drive the real ``LLMEngine`` with a workload trace, for benchmarks and engine-vs-simulator checks.

Owns: building a benchmark engine (dummy weights of a model's shapes, random
adapters), ``replay`` (one trace through the engine on a virtual clock) and
``offline_throughput`` (a batch of prompts through the Python API).

Replay semantics (virtual clock, ``VirtualClock``):
- The clock is the sum of the measured wall times of the engine's steps; when
  the engine is idle it jumps to the next arrival. A request is injected before
  the first step that starts at or after its trace ``arrival`` (exactly as the
  simulator does, whose clock instead advances by the step-cost model).
- The clock advances by the runner's execute time before the scheduler's update
  (token and finish times are step ends, as in the simulator), then by the rest
  of the step.
- Oracle EOS: the forward and the sampler run for real, then the sampled token
  of a request that reaches its trace ``output_len`` is replaced by the EOS
  token (and an early EOS by another token), so the engine finishes it through
  its normal path (FINISHED_STOPPED, the length predictor learns) without the
  scheduler ever seeing the true length.
- The engine's scheduler is replaced by a fresh one per replay (same capacity,
  the given policy), so several policies can share one loaded model.
- Step log (``ReplayResult.step_log``, columns ``inlaid.bench.step_log.COLUMNS``):
  per ``engine.step()`` its measured time, the runner's execute time (the
  model-clock cost with ``step_cost``), and what the step's ``SchedulerOutput``
  and the scheduler's counters/queues say (prefill/decode sequences, prefill
  tokens, distinct adapters, adapter loads, preemptions, waiting/running).
  Read from outside the engine; nothing in the engine changes.
Imports torch and the engine; the pure-Python ``core`` never imports this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from inlaid.bench.metrics import RequestRecord
from inlaid.bench.step_log import COLUMNS as STEP_COLUMNS
from inlaid.bench.step_log import step_fields
from inlaid.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
)
from inlaid.core.outputs import RunnerOutput, SchedulerOutput
from inlaid.core.policies import Policy
from inlaid.core.predictor import LengthPredictor
from inlaid.core.scheduler import Scheduler, SchedulerStats
from inlaid.sampling import SamplingParams
from inlaid.sim.cost_model import StepCostModel
from inlaid.sim.simulator import RequestSpec

logger = logging.getLogger(__name__)


def build_bench_engine(model: str, device: str = "cpu", slots: int = 4, num_adapters: int = 8, rank: int = 16,
                       num_blocks: int = 256, sched: SchedulerConfig | None = None,
                       dummy: bool = True, name_prefix: str = "t",
                       dtype: str | None = None) -> LLMEngine:  # noqa: F821
    """An engine over ``model`` (dummy weights unless ``dummy=False``) with random adapters
    ``{name_prefix}0..{name_prefix}{n-1}`` on the host (all 7 projections, rank ``rank``); ``dtype`` None: fp32 on
    CPU, bf16 elsewhere."""
    from inlaid.engine.llm_engine import LLMEngine
    from inlaid.lora.synthetic import random_adapter

    cfg = EngineConfig(
        model=ModelConfig(model=model, load_format="dummy" if dummy else "auto",
                          dtype=dtype or ("float32" if device == "cpu" else "bfloat16")),
        cache=CacheConfig(num_blocks=num_blocks, block_size=16),
        scheduler=sched or SchedulerConfig(max_queue_len=100_000),
        lora=LoRAConfig(max_loras=slots, max_lora_rank=rank),
        device=device,
    )
    eng = LLMEngine(cfg)
    arch = eng.parts.arch
    for i in range(num_adapters):
        eng.registry.add(random_adapter(f"{name_prefix}{i}", arch.lora_module_shapes(), arch.num_layers, rank, seed=i))
    return eng


class VirtualClock:
    """A settable clock (seconds) for the scheduler."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class ReplayResult:
    records: dict[str, RequestRecord]
    """request id -> its timeline (engine virtual-clock seconds)."""
    stats: SchedulerStats
    makespan: float
    step_times: list[float]
    wall_s: float
    samples: list[tuple[list[float], float]]
    """(``StepCostModel.features`` of the step, its measured seconds) per executed step."""
    complete: bool = True
    """False when ``max_wall_s`` stopped the replay: unfinished requests were aborted and have no record."""
    step_log: list[list[float]] = field(default_factory=list)
    """One row per ``engine.step()`` in the columns of ``inlaid.bench.step_log.COLUMNS``."""


class _Runner:
    """Wraps ``runner.execute``: oracle EOS, and the clock advances by the execute time *before*
    the scheduler's update (so token times are step ends, as in the simulator)."""

    def __init__(self, execute: Callable[[SchedulerOutput], RunnerOutput], truth: dict[str, int], eos: int,
                 other: int, clock: VirtualClock, timer: Callable[[], float], sync: Callable[[], None],
                 step_cost: Callable[[list[float]], float] | None = None) -> None:
        self.execute, self.truth, self.eos, self.other = execute, truth, eos, other
        self.clock, self.timer, self.sync, self.step_cost = clock, timer, sync, step_cost
        self.stops = {eos}
        self.advanced = 0.0
        self.last_features: list[float] | None = None
        self.last_out: SchedulerOutput | None = None

    def __call__(self, out: SchedulerOutput) -> RunnerOutput:
        self.last_features = StepCostModel.features(out)
        self.last_out = out
        t0 = self.timer()
        res = self.execute(out)
        self.sync()
        dt = self.timer() - t0 if self.step_cost is None else self.step_cost(self.last_features)
        self.clock.t += dt
        self.advanced += dt
        for s in out.scheduled:
            if s.request_id in res.sampled:
                tok = res.sampled[s.request_id]
                done = s.num_output_tokens + 1 >= self.truth[s.request_id]
                res.sampled[s.request_id] = self.eos if done else (self.other if tok in self.stops else tok)
        return res


PolicyFactory = Callable[[LengthPredictor], Policy]
"""Builds a policy around the scheduler's length predictor (ablation variants, see ``policy_sweep``)."""


def fresh_scheduler(engine: LLMEngine, sched: SchedulerConfig, clock: Callable[[], float],  # noqa: F821
                    policy_factory: PolicyFactory | None = None) -> Scheduler:
    """A new scheduler with the engine's capacity and ``sched``'s policy/limits, installed in the engine.

    With ``policy_factory`` the policy is ``policy_factory(predictor)`` instead of ``sched.policy``'s default.
    """
    p = engine.parts
    predictor = LengthPredictor()
    policy = policy_factory(predictor) if policy_factory is not None else None
    engine.scheduler = Scheduler(sched, p.num_blocks, engine.config.cache.block_size, engine.config.lora.max_loras,
                                 max_model_len=engine.max_model_len, clock=clock, predictor=predictor,
                                 policy=policy)
    return engine.scheduler


def replay(engine: LLMEngine, specs: Sequence[RequestSpec], sched: SchedulerConfig, vocab: int = 1000,  # noqa: F821
           sync: Callable[[], None] = lambda: None, desc: str = "replay",
           timer: Callable[[], float] = time.perf_counter,
           step_cost: Callable[[list[float]], float] | None = None,
           policy_factory: PolicyFactory | None = None, max_wall_s: float | None = None) -> ReplayResult:
    """Serve ``specs`` through ``engine`` under ``sched`` on a virtual clock (see the module docstring).

    ``timer`` measures a step (``time.process_time`` on a shared CPU, wall time on CUDA). With
    ``step_cost`` (e.g. ``StepCostModel.cost``) the clock instead advances by that function of the
    step's features: a deterministic *model clock*, so the engine and the simulator differ only in
    how they drive the scheduler, not in timing noise. ``policy_factory``: see ``fresh_scheduler``.
    ``max_wall_s``: after that many wall seconds the replay stops, aborts what is unfinished (no record
    for it) and returns with ``complete=False``.
    """
    clock = VirtualClock()
    sch = fresh_scheduler(engine, sched, clock, policy_factory)
    sch.schedule = _Timed(sch.schedule, timer)  # type: ignore[method-assign]  (the step log's sched_s)
    eos = engine.parts.eos_token_id if engine.parts.eos_token_id is not None else 0
    runner_execute = engine.runner.execute
    wrapped = _Runner(runner_execute, {s.request_id: s.output_len for s in specs}, eos, (eos + 1) % vocab, clock,
                      timer, sync, step_cost)
    wrapped.stops |= set(engine.parts.extra_eos_ids)
    wrapped.other = next(t for t in range(3, vocab) if t not in wrapped.stops)
    engine.runner.execute = wrapped  # type: ignore[method-assign]
    overlap, engine.overlap = engine.overlap, False  # steps through ``execute`` (the wrapper), one at a time
    pending = sorted(specs, key=lambda s: s.arrival)
    by_id = {s.request_id: s for s in specs}
    done: dict[str, RequestRecord] = {}
    step_times: list[float] = []
    step_log: list[list[float]] = []
    samples: list[tuple[list[float], float]] = []
    i, t_wall = 0, time.perf_counter()
    complete = True
    try:
        with tqdm(total=len(specs), desc=desc, leave=False) as bar:
            while len(done) < len(specs):
                if max_wall_s is not None and time.perf_counter() - t_wall > max_wall_s:
                    complete = False
                    _abort_all(engine, [s.request_id for s in pending[:i] if s.request_id not in done])
                    break
                while i < len(pending) and pending[i].arrival <= clock.t:
                    _inject(engine, pending[i], vocab)
                    i += 1
                if not engine.has_unfinished_requests():
                    clock.t = pending[i].arrival
                    continue
                sync()
                sched_before = sch.schedule.spent
                t0, before, preempted = timer(), wrapped.advanced, sch.stats.preemptions
                wrapped.last_features, wrapped.last_out = None, None
                outs = engine.step()
                sync()
                dt = timer() - t0
                if step_cost is None:
                    clock.t += dt - (wrapped.advanced - before)  # the rest of the step (schedule, update)
                step_times.append(dt)
                step_log.append(_log_row(clock.t, dt, wrapped.advanced - before, sch.schedule.spent - sched_before,
                                         wrapped.last_out, sch.stats.preemptions - preempted, sch))
                if wrapped.last_features is not None and wrapped.last_features[1:] != [0.0] * 4:
                    samples.append((wrapped.last_features, dt))
                for o in outs:
                    if o.finished and o.request_id not in done:
                        done[o.request_id] = _record(o, by_id[o.request_id])
                        bar.update(1)
    finally:
        engine.runner.execute = runner_execute  # type: ignore[method-assign]
        engine.overlap = overlap
        del sch.schedule  # the class's method again
    return ReplayResult(done, sch.stats, clock.t, step_times, time.perf_counter() - t_wall, samples, complete,
                        step_log)


class _Timed:
    """A callable that accumulates the seconds spent in ``fn`` (by ``timer``)."""

    def __init__(self, fn: Callable[[], SchedulerOutput], timer: Callable[[], float]) -> None:
        self.fn, self.timer, self.spent = fn, timer, 0.0

    def __call__(self) -> SchedulerOutput:
        t0 = self.timer()
        try:
            return self.fn()
        finally:
            self.spent += self.timer() - t0


def _log_row(t_end: float, step_s: float, exec_s: float, sched_s: float, out: SchedulerOutput | None,
             preemptions: int, sch: Scheduler) -> list[float]:
    """One step-log row (``STEP_COLUMNS``): times rounded to 10 us, then counts."""
    row = [round(t_end, 5), round(step_s, 5), round(exec_s, 5), round(sched_s, 6), *step_fields(out), preemptions,
           len(sch.waiting), len(sch.running)]
    assert len(row) == len(STEP_COLUMNS)
    return row


def _abort_all(engine: LLMEngine, request_ids: list[str]) -> None:  # noqa: F821
    """Abort ``request_ids`` and step the engine until it holds nothing (a replay cut short)."""
    engine.abort_request(request_ids)
    while engine.has_unfinished_requests():
        engine.step()


def _inject(engine: LLMEngine, spec: RequestSpec, vocab: int) -> None:  # noqa: F821
    prompt = [3 + (31 * j + 7 * len(spec.request_id)) % (vocab - 3) for j in range(spec.prompt_len)]
    engine.add_request(spec.request_id, prompt, SamplingParams(max_tokens=spec.max_tokens), spec.adapter)
    engine.scheduler.requests[spec.request_id].arrival_time = spec.arrival


def _record(o: RequestOutput, spec: RequestSpec) -> RequestRecord:  # noqa: F821
    if o.error:
        raise RuntimeError(f"request {o.request_id} failed in the engine: {o.error}")
    return RequestRecord(spec.arrival, o.first_token_time or o.finished_time or 0.0, o.finished_time or 0.0,
                         len(o.token_ids), spec.job_id)


def offline_throughput(engine: LLMEngine, prompts: Sequence[list[int] | str], params: SamplingParams,  # noqa: F821
                       adapters: Sequence[str | None] | None = None) -> dict[str, float]:
    """Submit every prompt at once, run to completion; requests/s and output tokens/s of wall time."""
    adapters = list(adapters) if adapters is not None else [None] * len(prompts)
    if len(adapters) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(adapters)} adapters; give one adapter per prompt")
    t0 = time.perf_counter()
    ids = [engine.add_request(None, p, params, a) for p, a in zip(prompts, adapters)]
    tokens = 0
    left = set(ids)
    while left:
        for o in engine.step():
            if o.finished and o.request_id in left:
                left.discard(o.request_id)
                tokens += len(o.token_ids)
    wall = time.perf_counter() - t0
    return {"requests": float(len(ids)), "output_tokens": float(tokens), "seconds": wall,
            "requests_per_s": len(ids) / wall, "output_tokens_per_s": tokens / wall}
