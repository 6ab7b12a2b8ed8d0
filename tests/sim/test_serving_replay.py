"""serving_replay: a recorded GPU run's trace is regenerated exactly, and a simulation scores 0 against itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from inlaid.sim.cost_model import StepCostModel
from inlaid.sim.serving_replay import load_run, run_variant, timeline_error
from inlaid.sim.simulator import EngineShape

RUN = Path(__file__).resolve().parents[2] / "benchmarks/results/serving/json_session2/llama2-7b-shapes_w4_100a_engine_fifo_r72.625.json"


@pytest.mark.skipif(not RUN.exists(), reason="serving sweep results not in this checkout")
def test_recorded_run_regenerates_and_self_replay_has_zero_error():
    run = load_run(RUN)
    assert len(run.specs) == 300 and run.variant == "fifo"
    shape = EngineShape(num_blocks=100_000, block_size=16, num_adapter_slots=32, max_model_len=4096)
    cost = StepCostModel(base=0.02, prefill_token=2e-5, decode_seq=0.0002, distinct_adapter=0.0, adapter_load=0.0,
                         prefill_step=0.08)
    res = run_variant(run.specs, "fifo", shape, cost)
    own = {r.request_id: {"first_token": r.first_token_time, "finish": r.finished_time} for r in res.requests}
    assert timeline_error(res, own) == 0.0
    assert 0.0 < timeline_error(res, run.records) < 0.2  # the fitted model (engine_vs_sim_gpu.md) reproduces the engine's FIFO run
