"""Workload generation shared by the simulator study and the engine benchmark.

Owns: ``WorkloadConfig`` and ``generate_workload`` (a list of ``RequestSpec``).

Model:
- Arrivals: a Gamma renewal process with mean rate ``rate`` (req/s) and
  coefficient of variation ``cv`` (cv = 1 is Poisson; > 1 bursty).
- Each arrival is a *job*: a burst of ``job_size`` requests of one task arriving
  together (job_size = 1 gives independent requests). JCT is measured per job.
- Task popularity: "uniform", "powerlaw" (p_i ~ i^-alpha) or "zipf" (p_i ~ 1/i).
- Per-task lengths (``lengths``): "suite" samples (prompt, output) token
  lengths of the task suite (``inlaid/tasks/data/<task>/*.jsonl``, counted by
  ``inlaid.bench.task_lengths``; task i uses suite task i mod #tasks);
  "synthetic" draws a lognormal per task whose medians are spread
  log-uniformly, so tasks differ in their typical output length (which the
  predictor can learn); "auto" is "suite" when the data is present.

Invariants: deterministic for a given ``seed``; lengths are clipped to
``[1, max_tokens]`` (outputs) and ``[1, max_prompt]`` (prompts). Pure Python.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from inlaid.bench.task_lengths import load_task_lengths
from inlaid.sim.simulator import RequestSpec


@dataclass(frozen=True)
class TaskProfile:
    """Length distribution of one task: lognormal (median, sigma) or an empirical sample."""

    name: str
    prompt_median: float
    output_median: float
    sigma: float = 0.5
    empirical: tuple[tuple[int, int], ...] = ()
    """(prompt_len, output_len) pairs from the task suite; sampled instead of the lognormal when given."""

    def sample(self, rng: random.Random) -> tuple[int, int]:
        if self.empirical:
            return rng.choice(self.empirical)
        p = rng.lognormvariate(math.log(self.prompt_median), self.sigma)
        o = rng.lognormvariate(math.log(self.output_median), self.sigma)
        return max(int(p), 1), max(int(o), 1)


@dataclass(frozen=True)
class WorkloadConfig:
    """What to generate."""

    num_requests: int = 1000
    rate: float = 4.0
    """Mean arrival rate of requests (req/s)."""
    cv: float = 1.0
    """Coefficient of variation of inter-arrival times."""
    num_tasks: int = 10
    popularity: str = "powerlaw"
    """"uniform" | "powerlaw" | "zipf"."""
    alpha: float = 1.0
    """Power-law exponent of task popularity."""
    job_size: int = 1
    """Requests per job (a burst for one task)."""
    max_tokens: int = 512
    max_prompt: int = 1024
    output_range: tuple[float, float] = (8.0, 256.0)
    """Synthetic per-task output medians are log-uniform in this range."""
    prompt_range: tuple[float, float] = (16.0, 512.0)
    seed: int = 0
    lengths: str = "auto"
    """"auto" | "suite" | "synthetic" (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.num_tasks < 1 or self.job_size < 1:
            raise ValueError("num_requests, num_tasks and job_size must be >= 1")
        if self.rate <= 0 or self.cv <= 0:
            raise ValueError(f"rate and cv must be > 0, got rate={self.rate}, cv={self.cv}")
        if self.popularity not in ("uniform", "powerlaw", "zipf"):
            raise ValueError(f"popularity must be uniform|powerlaw|zipf, got {self.popularity!r}")
        if self.lengths not in ("auto", "suite", "synthetic"):
            raise ValueError(f"lengths must be auto|suite|synthetic, got {self.lengths!r}")


def popularity_weights(cfg: WorkloadConfig) -> list[float]:
    """Normalised probability of each task (task 0 most popular)."""
    if cfg.popularity == "uniform":
        w = [1.0] * cfg.num_tasks
    else:
        a = cfg.alpha if cfg.popularity == "powerlaw" else 1.0
        w = [(i + 1) ** -a for i in range(cfg.num_tasks)]
    s = sum(w)
    return [x / s for x in w]


@lru_cache(maxsize=1)
def task_suite() -> tuple[tuple[str, tuple[tuple[int, int], ...]], ...]:
    """The task suite's (task, length samples) pairs, loaded once per process."""
    suite, _ = load_task_lengths()
    return tuple((t, tuple(v)) for t, v in sorted(suite.items()))


def task_profiles(cfg: WorkloadConfig, rng: random.Random) -> list[TaskProfile]:
    """One profile per task: task-suite tasks (cycled) or synthetic lognormal, per ``cfg.lengths``."""
    suite = task_suite() if cfg.lengths != "synthetic" else ()
    if cfg.lengths == "suite" and not suite:
        raise ValueError("lengths='suite' but the task suite (inlaid/tasks/data/<task>/*.jsonl) is missing")
    profiles = []
    for i in range(cfg.num_tasks):
        if suite:
            src, samples = suite[i % len(suite)]
            profiles.append(TaskProfile(f"t{i}", 0.0, 0.0, empirical=samples))
            continue
        lo, hi = cfg.output_range
        plo, phi = cfg.prompt_range
        out_med = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        p_med = math.exp(rng.uniform(math.log(plo), math.log(phi)))
        profiles.append(TaskProfile(f"t{i}", p_med, out_med))
    return profiles


def generate_workload(cfg: WorkloadConfig) -> list[RequestSpec]:
    """Requests in arrival order, deterministic for ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    profiles = task_profiles(cfg, rng)
    weights = popularity_weights(cfg)
    shape = 1.0 / cfg.cv**2
    job_rate = cfg.rate / cfg.job_size
    t = 0.0
    specs: list[RequestSpec] = []
    job = 0
    while len(specs) < cfg.num_requests:
        t += rng.gammavariate(shape, 1.0 / (job_rate * shape))
        task = rng.choices(range(cfg.num_tasks), weights)[0]
        prof = profiles[task]
        for _ in range(min(cfg.job_size, cfg.num_requests - len(specs))):
            p, o = prof.sample(rng)
            p = min(p, cfg.max_prompt)
            o = min(o, cfg.max_tokens)
            specs.append(RequestSpec(f"r{len(specs)}", t, prof.name, p, o, cfg.max_tokens, f"j{job}"))
        job += 1
    return specs
