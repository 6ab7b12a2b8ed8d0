"""The in-process policy sweep (inlaid.bench.policy_sweep) on the tiny random Llama, CPU."""

from __future__ import annotations

import json
import time

import pytest
import torch

from inlaid.bench.policy_sweep import (
    VARIANTS,
    EngineSpec,
    SweepPlan,
    build_engine,
    dummy_w4_weights,
    policy_factory,
    run_sweep,
)
from inlaid.bench.step_log import COLUMNS as STEP_COLUMNS
from inlaid.bench.workload import WorkloadConfig
from inlaid.config import SchedulerConfig
from inlaid.core.inlaid_policy import InlaidPolicy
from inlaid.core.predictor import LengthPredictor
from inlaid.model.layers import ParallelLinear
from inlaid.quant.linear import GPTQLinearMethod


def _spec(d, quant: str = "fp16", n: int = 5) -> EngineSpec:
    return EngineSpec(model=str(d), quant=quant, num_blocks=128, slots=2, num_adapters=n, ranks=(4, 8),
                      distinct_adapters=2, sched=SchedulerConfig(max_num_seqs=8, max_queue_len=10_000))


def test_policy_factory_switches() -> None:
    sched = SchedulerConfig(max_adapters_per_step=3, aging_s=2.0)
    assert policy_factory("inlaid", sched) is None and policy_factory("fifo", sched) is None
    pol = policy_factory("inlaid-nogroup", sched)(LengthPredictor())
    assert isinstance(pol, InlaidPolicy) and not pol.use_grouping and pol.use_prediction and pol.use_aging
    assert pol.beta == 3 and pol.aging_s == 2.0
    assert not policy_factory("inlaid-nopred", sched)(LengthPredictor()).use_prediction
    assert not policy_factory("inlaid-noaging", sched)(LengthPredictor()).use_aging
    with pytest.raises(ValueError, match="unknown variant"):
        policy_factory("sjf", sched)


def test_w4_engine_has_gptq_projections_and_adapters(tiny_llama_dir) -> None:
    import sys

    import inlaid.engine.llm_engine  # noqa: F401  (loads the engine's set-up modules)
    from inlaid.model import loader

    users = [m for n, m in sys.modules.items() if n.startswith("inlaid.") and m is not loader
             and getattr(m, "load_model", None) is loader.load_model]
    eng = build_engine(_spec(tiny_llama_dir, "w4"))
    assert users and all(m.load_model is loader.load_model for m in users)  # the patch is undone
    lins = [m for n, m in eng.parts.model.named_modules() if isinstance(m, ParallelLinear) and ".layers." in n]
    assert lins and all(isinstance(m.quant_method, GPTQLinearMethod) for m in lins)
    assert all(int(m.qweight.abs().sum()) != 0 for m in lins)  # random codes, not zeros
    assert sorted(eng.registry.names()) == sorted(f"t{i}" for i in range(5))
    assert {eng.registry.get(f"t{i}").rank for i in range(5)} == {4, 8}
    with dummy_w4_weights():
        assert all(m.load_model is not loader.load_model for m in users)


def test_sweep_writes_serve_schema_json_with_identical_traces(tiny_llama_dir, tmp_path) -> None:
    eng = build_engine(_spec(tiny_llama_dir))
    wl = WorkloadConfig(num_requests=10, num_tasks=5, lengths="synthetic", max_tokens=6, max_prompt=24, job_size=2)
    plan = SweepPlan(wl, rate_x=(2.0, 1.0), variants=("inlaid", "fifo"), ablations=("inlaid-nopred",),
                     probe_requests=6, calibrate=2)
    files = run_sweep(eng, plan, tmp_path, "tiny", "cpu", time.monotonic() + 120, {"model": "tiny", "quant": "fp16",
                                                                                  "adapters": 5})
    probe = json.loads(files[0].read_text())
    assert probe["probe"]["rps"] > 0 and probe["isolated"]["probes"] == 2
    runs = [json.loads(f.read_text()) for f in files[1:]]
    assert [(r["config"]["label"]) for r in runs] == ["inlaid", "fifo", "inlaid-nopred", "inlaid", "fifo"]
    high, low = runs[0]["config"]["rate"], runs[3]["config"]["rate"]
    assert high == pytest.approx(2 * low, rel=1e-2)
    for r in runs:
        s = r["summary"]
        assert s["ok"] == s["sent"] == 10 and r["config"]["complete"]
        assert 0 <= s["slo_attainment"] <= 1 and s["throughput_tps"] > 0
        assert r["config"]["extra"]["driver"] == "engine" and r["config"]["extra"]["quant"] == "fp16"
        assert all(x["finish"] >= x["first_token"] >= x["arrival"] for x in r["records"])
    # every variant at one rate saw the same trace (arrivals, tasks, lengths)
    key = [[(x["request_id"], x["arrival"], x["task"], x["prompt_len"], x["output_len"]) for x in r["records"]]
           for r in runs[:3]]
    assert key[0] == key[1] == key[2]
    # the step log: one row per engine step, its counts add up to the run's work
    for r in runs:
        log, s = r["step_log"], r["summary"]
        rows = [dict(zip(log["columns"], row, strict=True)) for row in log["rows"]]
        assert list(log["columns"]) == list(STEP_COLUMNS) and len(rows) == s["steps"]
        assert sum(x["prefill_seqs"] for x in rows) >= s["ok"]  # every request prefills at least once
        assert sum(x["adapter_loads"] for x in rows) == s["adapter_loads"]
        assert sum(x["preemptions"] for x in rows) == s["preemptions"]
        assert all(x["step_s"] >= x["exec_s"] >= 0 and x["step_s"] >= x["sched_s"] >= 0 for x in rows)
        assert sum(x["sched_s"] for x in rows) > 0  # schedule() is timed
        assert [x["t_end"] for x in rows] == sorted(x["t_end"] for x in rows)
        assert rows[-1]["waiting"] == rows[-1]["running"] == 0
        assert rows[-1]["t_end"] >= max(x["finish"] for x in r["records"]) - 1e-5  # the last step ends last
    # the warm-up: the first run's variant and trace, written aside (not among the results)
    warm = json.loads((tmp_path / "warmup" / files[1].name).read_text())
    assert warm["config"]["extra"]["check"] == "warmup" and warm["config"]["label"] == "inlaid"
    rep = json.loads((tmp_path / "repeat" / files[1].name).read_text())  # the same run after the sweep
    assert rep["config"]["extra"]["check"] == "repeat" and len(rep["records"]) == len(runs[0]["records"])
    assert [(x["request_id"], x["arrival"], x["output_len"]) for x in warm["records"]] == \
        [(x["request_id"], x["arrival"], x["output_len"]) for x in runs[0]["records"]]
    assert not any(f.parent.name == "warmup" for f in files)


def test_deadline_skips_runs_and_wall_cap_marks_incomplete(tiny_llama_dir, tmp_path) -> None:
    eng = build_engine(_spec(tiny_llama_dir))
    wl = WorkloadConfig(num_requests=8, num_tasks=5, lengths="synthetic", max_tokens=6, max_prompt=24)
    plan = SweepPlan(wl, variants=("fifo",), ablations=(), probe_requests=4, calibrate=0, max_wall_s=1e-6)
    files = run_sweep(eng, plan, tmp_path, "cut", "cpu", time.monotonic() + 60, {"model": "tiny", "quant": "fp16",
                                                                                "adapters": 5})
    cut = json.loads(files[1].read_text())
    assert cut["config"]["complete"] is False and cut["summary"]["unfinished"] >= 1
    assert not eng.has_unfinished_requests()
    files = run_sweep(eng, plan, tmp_path / "late", "late", "cpu", time.monotonic() - 1, {"adapters": 5})
    assert len(files) == 1  # only the probe: the deadline had passed
    assert not (tmp_path / "late" / "warmup").exists() and not (tmp_path / "late" / "repeat").exists()
    assert set(VARIANTS) >= {"inlaid", "fifo", "mlfq", "inlaid-nopred", "inlaid-nogroup", "inlaid-noaging"}
    assert torch.get_num_threads() >= 1
