"""benchmarks/scheduling_study.py helpers that need no simulation run."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scheduling_study  # noqa: E402


def test_engine_sections_are_replaced_and_the_study_part_kept(tmp_path):
    (tmp_path / "scheduling.md").write_text("# Study\n\ntables\n\n## Engine vs simulator (old)\n\nstale\n")
    (tmp_path / "engine_vs_sim_model.md").write_text("## Engine vs simulator (same trace), engine clock: model\nnew\n")
    scheduling_study.refresh_engine_sections(tmp_path)
    text = (tmp_path / "scheduling.md").read_text()
    assert text.startswith("# Study\n\ntables\n\n## Engine vs simulator (same trace)") and "stale" not in text
    (tmp_path / "scheduling.md").write_text("# Study without engine part\n")
    with pytest.raises(ValueError, match="no '## Engine vs simulator' section"):
        scheduling_study.refresh_engine_sections(tmp_path)


def test_gpu_section_takes_engine_shape_and_job_size_from_the_cost_model_file(tmp_path):
    from inlaid.sim.cost_model import StepCostModel, cost_model_to_json

    path = tmp_path / "cm.json"
    path.write_text(cost_model_to_json(StepCostModel(base=0.016, prefill_step=0.1),
                                       {"device": "X", "fitted_on": ["fifo_r1"], "fit_error_s": 0.2,
                                        "engine": {"num_blocks": 777, "slots": 24}, "workload": {"job_size": 4}}))
    sec = scheduling_study._gpu_section(path)
    assert sec.cost.prefill_step == 0.1 and sec.job_size == 4
    assert sec.shape.num_blocks == 777 and sec.shape.num_adapter_slots == 24
    missing = scheduling_study._gpu_section(tmp_path / "none.json")
    assert "ASSUMED" in missing.label and missing.job_size == 1 and missing.cost.prefill_step == 0.0
