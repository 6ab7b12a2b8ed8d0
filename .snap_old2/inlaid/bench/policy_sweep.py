"""In-process policy sweep: one loaded engine, every scheduling policy (and ablation) at several rates.

Owns: the policy variants (``VARIANTS``: inlaid, fifo, mlfq and the inlaid ablations without
prediction / grouping / aging), building a benchmark engine with a dummy fp16 or dummy W4 (random
GPTQ 4-bit codes) base and N named mixed-rank adapters, the saturation probe, the isolated-time
calibration, and ``run_sweep``, which writes one JSON per (variant, rate) in the schema of
``inlaid bench serve`` (``config``/``summary``/``records``), so the serving page and ``inlaid bench
plot`` read both drivers' results alike (``config.extra.driver`` says which).

Why in-process: a policy is a per-process server flag, and a 7B server start-up costs tens of
seconds; here the model loads once and ``engine_driver.replay`` swaps the scheduler per run. Timing:
the replay's virtual clock is the sum of the measured wall times of the engine's steps (CUDA synced),
jumping over idle gaps, so latencies are what a server's engine loop would see, without HTTP/
detokenization overhead (the HTTP driver measures those at the client).

Invariants: every variant at a given rate gets the identical trace (same seed); each run gets a fresh
scheduler and length predictor (cold start, learned online); a run cut by ``max_wall_s`` is written
with ``complete: false`` and its unfinished requests count as SLO misses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inlaid.bench.engine_driver import PolicyFactory, replay
from inlaid.bench.metrics import RequestRecord, summarize
from inlaid.bench.serve_client import IsolatedFit, strict_json
from inlaid.bench.step_log import COLUMNS as STEP_COLUMNS
from inlaid.bench.workload import WorkloadConfig, generate_workload
from inlaid.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
)
from inlaid.sim.simulator import RequestSpec

logger = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "inlaid": {"policy": "inlaid"},
    "fifo": {"policy": "fifo"},
    "mlfq": {"policy": "mlfq"},
    "inlaid-nopred": {"policy": "inlaid", "use_prediction": False},
    "inlaid-nogroup": {"policy": "inlaid", "use_grouping": False},
    "inlaid-noaging": {"policy": "inlaid", "use_aging": False},
}
"""Variant name -> scheduler policy and InlaidPolicy ablation switches."""


def policy_factory(variant: str, sched: SchedulerConfig) -> PolicyFactory | None:
    """The policy builder of ``variant`` (None: the scheduler's default for ``sched.policy``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    switches = {k: v for k, v in VARIANTS[variant].items() if k != "policy"}
    if not switches:
        return None
    from inlaid.core.inlaid_policy import InlaidPolicy

    return lambda predictor: InlaidPolicy(max_adapters_per_step=sched.max_adapters_per_step, aging_s=sched.aging_s,
                                          predictor=predictor, **switches)


# ---------------------------------------------------------------- engine


@torch.no_grad()
def _dummy_w4_load_model(group_size: int) -> Callable[..., Any]:
    """A stand-in for ``inlaid.model.loader.load_model`` that builds the model with GPTQ 4-bit projections
    holding random codes (the W4 twin of ``load_format="dummy"``; no checkpoint, no fp16 peak)."""
    from inlaid.model.arch import ModelArch
    from inlaid.model.layers import ParallelLinear, RotaryEmbedding
    from inlaid.model.llama import LlamaForCausalLM
    from inlaid.model.loader import init_dummy_weights, resolve_model_path
    from inlaid.quant.linear import GPTQLinearMethod, replace_linears

    def load(model_config: ModelConfig, device: torch.device, dtype: torch.dtype, lora_hook: Any = None,
             cache_dir: Path | None = None, **kwargs: Any) -> tuple[Any, Any, Path]:
        tp = kwargs.get("tp")
        if tp is not None and getattr(tp, "world_size", 1) != 1:
            raise ValueError("dummy W4 weights support one device only (tensor_parallel_size 1)")
        path = resolve_model_path(model_config.model, cache_dir)
        arch = ModelArch.from_dir(path)
        g = group_size if all(k % group_size == 0 for k, _ in arch.lora_module_shapes().values()) else 32
        model = LlamaForCausalLM(arch, device=torch.device("meta"), dtype=dtype, lora_hook=lora_hook)
        replace_linears(model, GPTQLinearMethod(4, g), torch.device("meta"), dtype)
        model.to_empty(device=device)
        rot = model.model.rotary_emb
        model.model.rotary_emb = RotaryEmbedding(arch.head_dim, rot.max_positions, arch.rope_theta,
                                                 arch.rope_scaling, device)
        init_dummy_weights(model, model_config.dummy_seed)
        hi = 2**31 - 1
        for mod in model.modules():
            if isinstance(mod, ParallelLinear) and isinstance(mod.quant_method, GPTQLinearMethod):
                mod.qweight.random_(-hi - 1, hi)
                mod.qzeros.fill_(0x77777777)
                mod.scales.uniform_(0.0005, 0.003)
                mod.g_idx.copy_(torch.arange(mod.g_idx.numel(), device=device, dtype=mod.g_idx.dtype) // g)
                mod.quant_method.finalize(mod, dtype)
        return model.eval(), arch, path

    return load


@contextlib.contextmanager
def dummy_w4_weights(group_size: int = 128) -> Iterator[None]:
    """While active, engines built in this process get a random GPTQ W4 base (see ``_dummy_w4_load_model``).

    Every loaded ``inlaid`` module that imported ``inlaid.model.loader.load_model`` by name (the engine's
    set-up path) sees the stand-in; all are restored on exit."""
    import sys

    import inlaid.engine.llm_engine  # noqa: F401  (the engine's set-up modules are loaded before patching)
    from inlaid.model import loader

    original = loader.load_model
    fake = _dummy_w4_load_model(group_size)
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("inlaid.") and m is not loader and getattr(m, "load_model", None) is original]
    if not patched:
        raise RuntimeError("no engine module imports inlaid.model.loader.load_model: cannot install dummy W4 weights")
    for m in patched:
        m.load_model = fake  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m in patched:
            m.load_model = original  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EngineSpec:
    """The engine a sweep runs on."""

    model: str
    quant: str = "fp16"
    """"fp16" (dummy dense weights; fp32 on CPU) or "w4" (random GPTQ 4-bit g128 codes)."""
    device: str = "cpu"
    slots: int = 32
    num_blocks: int | None = None
    """KV blocks (None: the engine sizes them from free memory)."""
    num_adapters: int = 100
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    distinct_adapters: int = 8
    """Distinct random weight sets; the N names t0..t{N-1} share them (host memory)."""
    sched: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(max_queue_len=100_000))

    def __post_init__(self) -> None:
        if self.quant not in ("fp16", "w4"):
            raise ValueError(f"quant must be fp16 or w4, got {self.quant!r}")
        if self.num_adapters < 1 or self.distinct_adapters < 1 or not self.ranks:
            raise ValueError("num_adapters and distinct_adapters must be >= 1 and ranks non-empty")


def build_engine(spec: EngineSpec) -> Any:
    """The engine of ``spec`` with adapters t0..t{N-1} (ranks cycling over ``spec.ranks``) registered."""
    from inlaid.engine.llm_engine import LLMEngine
    from inlaid.lora.synthetic import random_adapter

    dtype = "float32" if spec.device == "cpu" else "float16"
    cfg = EngineConfig(model=ModelConfig(model=spec.model, load_format="dummy", dtype=dtype),
                       cache=CacheConfig(num_blocks=spec.num_blocks), scheduler=spec.sched,
                       lora=LoRAConfig(max_loras=spec.slots, max_lora_rank=max(spec.ranks),
                                       lora_target_modules=",".join(spec.targets)), device=spec.device)
    with dummy_w4_weights() if spec.quant == "w4" else contextlib.nullcontext():
        eng = LLMEngine(cfg)
    arch = eng.parts.arch
    base = [random_adapter(f"d{i}", arch.lora_module_shapes(), arch.num_layers, spec.ranks[i % len(spec.ranks)],
                           spec.targets, seed=i + 1) for i in range(min(spec.distinct_adapters, spec.num_adapters))]
    for i in range(spec.num_adapters):
        eng.registry.add(dataclasses.replace(base[i % len(base)], name=f"t{i}", path=f"<random:t{i}>"))
    return eng


def device_sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def device_timer(device: str) -> Callable[[], float]:
    """Wall time on CUDA; process CPU time on a (shared) CPU."""
    return time.perf_counter if device.startswith("cuda") else time.process_time


# ---------------------------------------------------------------- measurements


def _vocab(engine: Any) -> int:
    return int(engine.parts.arch.vocab_size)


def saturation_probe(engine: Any, wl: WorkloadConfig, device: str, repeats: int = 2) -> dict[str, float]:
    """All of ``wl``'s requests at t=0 under fifo (the last of ``repeats`` runs; the first ones warm up
    kernels and CUDA graphs): the engine's peak request and token rates on this length mix."""
    specs = [dataclasses.replace(s, arrival=0.0) for s in generate_workload(wl)]
    sched = SchedulerConfig(policy="fifo", max_queue_len=100_000,
                            max_num_seqs=engine.config.scheduler.max_num_seqs,
                            max_num_batched_tokens=engine.config.scheduler.max_num_batched_tokens)
    res = None
    for k in range(repeats):
        res = replay(engine, specs, sched, _vocab(engine), device_sync(device), desc=f"probe {k}",
                     timer=device_timer(device))
    assert res is not None
    toks = sum(r.output_len for r in res.records.values())
    span = max(res.makespan, 1e-9)
    return {"requests": float(len(specs)), "makespan": span, "rps": len(res.records) / span, "tps": toks / span,
            "mean_output": toks / max(len(res.records), 1)}


def calibrate_isolated(engine: Any, specs: Sequence[RequestSpec], device: str, k: int = 4) -> IsolatedFit:
    """Run ``k`` requests (spread quantiles of (prompt, output)) alone through the engine and fit."""
    pairs = sorted(specs, key=lambda s: (s.prompt_len, s.output_len))
    picks = [pairs[round(j * (len(pairs) - 1) / max(k - 1, 1))] for j in range(k)]
    xs, ttfts, tpots = [], [], []
    for j, s in enumerate(picks):
        one = dataclasses.replace(s, request_id=f"iso{j}", arrival=0.0, job_id=None)
        res = replay(engine, [one], SchedulerConfig(policy="fifo"), _vocab(engine), device_sync(device),
                     desc="isolated", timer=device_timer(device))
        rec = res.records[one.request_id]
        xs.append(float(s.prompt_len))
        ttfts.append(rec.first_token - rec.arrival)
        if rec.output_len > 1:
            tpots.append((rec.finish - rec.first_token) / (rec.output_len - 1))
    return IsolatedFit.from_samples(xs, ttfts, tpots)


def run_point(engine: Any, wl: WorkloadConfig, variant: str, iso: IsolatedFit | None, device: str,
              slo_scale: float = 5.0, max_wall_s: float | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One (variant, workload) replay as a ``bench serve``-schema result dict."""
    sched = dataclasses.replace(engine.config.scheduler, policy=VARIANTS[variant]["policy"])
    specs = generate_workload(wl)
    res = replay(engine, specs, sched, _vocab(engine), device_sync(device), desc=f"{variant} r{wl.rate:g}",
                 timer=device_timer(device), policy_factory=policy_factory(variant, sched), max_wall_s=max_wall_s)
    by_id = {s.request_id: s for s in specs}
    recs = [RequestRecord(r.arrival, r.first_token, r.finish, r.output_len, r.job_id,
                          iso.time(by_id[rid].prompt_len, r.output_len) if iso else None)
            for rid, r in sorted(res.records.items(), key=lambda kv: int(kv[0][1:]))]
    summary: dict[str, Any] = {"requests": len(specs), "sent": len(specs), "ok": len(recs),
                               "unfinished": len(specs) - len(recs), "wall_s": res.wall_s,
                               "mean_distinct_adapters": res.stats.mean_distinct_adapters,
                               "preemptions": res.stats.preemptions, "adapter_loads": res.stats.adapter_loads,
                               "steps": res.stats.steps}
    if recs:
        summary |= summarize(recs, num_submitted=len(specs), slo_scale=slo_scale)
    cfg = {"label": variant, "rate": wl.rate, "num_tasks": wl.num_tasks, "workload": dataclasses.asdict(wl),
           "slo_scale": slo_scale, "driver": "engine", "complete": res.complete,
           "extra": {"policy": variant, "device": device, "driver": "engine", **(extra or {})}}
    records = [{"request_id": rid, "task": by_id[rid].adapter, "prompt_len": by_id[rid].prompt_len,
                "scheduled": by_id[rid].arrival, **dataclasses.asdict(res.records[rid])}
               for rid in sorted(res.records, key=lambda x: int(x[1:]))]
    return strict_json({"config": cfg, "server": None, "isolated": dataclasses.asdict(iso) if iso else None,
                        "summary": summary, "records": records,
                        "step_log": {"columns": list(STEP_COLUMNS), "rows": res.step_log}})


# ---------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepPlan:
    """Which runs, in priority order: every ``variants`` at ``rate_x[0]`` x saturation first, then the next
    multiplier, ...; ``ablations`` only at the highest multiplier."""

    workload: WorkloadConfig
    """num_requests/lengths/popularity of every run (its ``rate`` is replaced)."""
    rate_x: tuple[float, ...] = (1.5, 1.0)
    """Request rates as multiples of the measured saturation rate (highest load first)."""
    variants: tuple[str, ...] = ("inlaid", "fifo", "mlfq")
    ablations: tuple[str, ...] = ("inlaid-nopred", "inlaid-nogroup", "inlaid-noaging")
    probe_requests: int = 128
    calibrate: int = 4
    slo_scale: float = 5.0
    max_wall_s: float = 60.0
    """Cap on one run's wall time."""
    fixed_rates: tuple[float, ...] = ()
    """Absolute rates (req/s) instead of ``rate_x`` (no saturation probe beyond warm-up)."""
    warmup: bool = True
    """Run the first variant once at the first rate before measuring (same trace; written to
    ``<out_dir>/warmup/``, not a result): first-run costs (Triton compiles of new prefill shapes, lazy
    allocations) then fall on no measured run, and its step log against the measured one shows them."""
    repeat_first: bool = True
    """After the sweep, run the first variant at the first rate once more (same trace; ``<out_dir>/repeat/``,
    not a result): against the measured run it shows drift over the sweep (run order, clocks, allocator)."""

    def runs(self, sat_rps: float) -> list[tuple[str, float]]:
        rates = list(self.fixed_rates) or [round(x * sat_rps, 3) for x in self.rate_x]
        out = [(v, rates[0]) for v in (*self.variants, *self.ablations)]
        return out + [(v, r) for r in rates[1:] for v in self.variants]


def run_sweep(engine: Any, plan: SweepPlan, out_dir: Path, name: str, device: str, deadline: float,
              extra: dict[str, Any]) -> list[Path]:
    """Probe, calibrate, then every run of ``plan`` until ``deadline`` (``time.monotonic()``); one JSON per run
    at ``out_dir/<name>_<variant>_r<rate>.json`` and ``out_dir/<name>_probe.json``. Returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    probe_wl = dataclasses.replace(plan.workload, num_requests=plan.probe_requests, seed=plan.workload.seed + 99)
    probe = saturation_probe(engine, probe_wl, device)
    iso = calibrate_isolated(engine, generate_workload(plan.workload), device, plan.calibrate) \
        if plan.calibrate else None
    info = {"probe": probe, "isolated": dataclasses.asdict(iso) if iso else None, "extra": extra}
    written = [out_dir / f"{name}_probe.json"]
    written[0].write_text(json.dumps(strict_json(info), indent=1))
    logger.info("%s: saturation %.2f req/s (%.0f tok/s, mean output %.1f)", name, probe["rps"], probe["tps"],
                probe["mean_output"])
    runs = plan.runs(probe["rps"])
    if plan.warmup and runs:
        _check_run(engine, plan, runs[0], iso, device, deadline, extra, out_dir / "warmup", name)
    for variant, rate in runs:
        if time.monotonic() > deadline:
            logger.warning("%s: deadline reached, skipping %s at %g req/s and the rest", name, variant, rate)
            break
        wl = dataclasses.replace(plan.workload, rate=rate)
        left = max(deadline - time.monotonic(), 1.0)
        res = run_point(engine, wl, variant, iso, device, plan.slo_scale, min(plan.max_wall_s, left),
                        {**extra, "saturation_rps": round(probe["rps"], 3)})
        path = out_dir / f"{name}_{variant}_r{rate:g}.json"
        path.write_text(json.dumps(res, indent=1, allow_nan=False))
        written.append(path)
        s = res["summary"]
        logger.info("%s %s r%g: %s/%s ok, %.0f tok/s, latency %.3fs, SLO %.2f", name, variant, rate, s["ok"],
                    s["sent"], s.get("throughput_tps") or 0, s.get("latency_mean") or 0, s.get("slo_attainment") or 0)
    if plan.repeat_first and runs:
        _check_run(engine, plan, runs[0], iso, device, deadline, extra, out_dir / "repeat", name)
    return written


def _check_run(engine: Any, plan: SweepPlan, run: tuple[str, float], iso: IsolatedFit | None, device: str,
               deadline: float, extra: dict[str, Any], folder: Path, name: str) -> None:
    """One unmeasured run of ``run`` (variant, rate) on the plan's trace, written to ``folder`` (warm-up before
    the sweep, repeat after it); skipped once ``deadline`` has passed."""
    if time.monotonic() > deadline:
        return
    variant, rate = run
    wl = dataclasses.replace(plan.workload, rate=rate)
    res = run_point(engine, wl, variant, iso, device, plan.slo_scale,
                    min(plan.max_wall_s, max(deadline - time.monotonic(), 1.0)), {**extra, "check": folder.name})
    folder.mkdir(exist_ok=True)
    (folder / f"{name}_{variant}_r{rate:g}.json").write_text(json.dumps(res, indent=1))
    logger.info("%s %s %s r%g: %.0f tok/s", name, folder.name, variant, rate, res["summary"].get("throughput_tps") or 0)
