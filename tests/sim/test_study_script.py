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
