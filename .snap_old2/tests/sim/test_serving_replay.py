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


def _write_run(src: Path, dst: Path, label: str, makespan: float, latency: float) -> None:
    """A copy of a recorded run under another policy label with a chosen summary (the trace is unchanged)."""
    import json

    d = json.loads(src.read_text())
    d["config"]["label"] = label
    d["summary"].update(makespan=makespan, latency_mean=latency, jct_mean=2 * latency)
    dst.write_text(json.dumps(d))


@pytest.mark.skipif(not RUN.exists(), reason="serving sweep results not in this checkout")
def test_fit_cost_model_file_writes_a_loadable_model_with_provenance(tmp_path):
    from inlaid.sim.cost_model import load_cost_model
    from inlaid.sim.serving_replay import fit_cost_model_file

    pre = "m_w4_engine"
    _write_run(RUN, tmp_path / f"{pre}_fifo_r72.625.json", "fifo", 6.8, 2.1)
    grid = {"base": (0.02,), "prefill_step": (0.0, 0.08), "decode_seq": (0.0002,), "prefill_token": (2e-5,),
            "adapter_load": (0.0,)}
    out = tmp_path / "cm.json"
    cost, meta = fit_cost_model_file(tmp_path, pre, out, num_blocks=1234, grid=grid)
    loaded, lmeta = load_cost_model(out)
    assert loaded == cost and cost.prefill_step == 0.08  # the engine's run has the prefill overhead: 0 fits worse
    assert lmeta["engine"]["num_blocks"] == 1234 and lmeta["engine"]["slots"] == 32
    assert lmeta["fitted_on"] == ["fifo_r72.625"] and lmeta["workload"]["job_size"] == 4
    assert lmeta["timeline_error_s"]["fifo_r72.625"] == pytest.approx(meta["fit_error_s"])


@pytest.mark.skipif(not RUN.exists(), reason="serving sweep results not in this checkout")
def test_prediction_check_reports_measured_ratios_from_the_summaries(tmp_path):
    from inlaid.sim.serving_replay import prediction_check

    pre = "m_w4_engine"
    _write_run(RUN, tmp_path / f"{pre}_fifo_r72.625.json", "fifo", 8.0, 3.0)
    _write_run(RUN, tmp_path / f"{pre}_mlfq_r72.625.json", "mlfq", 5.0, 1.5)
    shape = EngineShape(num_blocks=100_000, block_size=16, num_adapter_slots=32, max_model_len=4096)
    cost = StepCostModel(base=0.02, prefill_token=2e-5, decode_seq=0.0002, distinct_adapter=0.0, adapter_load=0.0,
                         prefill_step=0.08)
    md = prediction_check(tmp_path, pre, {"m": cost}, shape, variants=("mlfq",))
    assert "| r72.625 mlfq: **measured** | 1.60x | 50% | 50% |" in md
    sim_row = next(line for line in md.splitlines() if "simulated, m" in line)
    assert "x |" in sim_row and sim_row.count("%") == 2
