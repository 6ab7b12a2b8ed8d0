"""``inlaid.bench.pages.write_results``: a benchmark's ``<out>.json`` and ``<out>.md``, the folder made first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid.bench.pages import write_results

RES = {"device": "cpu", "rows": [{"batch": 1, "us": 2.5}]}
MD = "# Page\n\n| batch | us |\n|---|---|\n| 1 | 2.50 |\n"


def test_writes_both_files_in_a_new_folder_and_returns_their_paths(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "bench"
    json_path, md_path = write_results(out, RES, MD, echo=False)
    assert (json_path, md_path) == (tmp_path / "new" / "deeper" / "bench.json", tmp_path / "new" / "deeper" / "bench.md")
    assert json.loads(json_path.read_text()) == RES
    assert md_path.read_text() == MD


def test_json_text_is_json_dumps_with_the_indent(tmp_path: Path) -> None:
    json_path, _ = write_results(str(tmp_path / "a"), RES, MD, indent=0, echo=False)
    assert json_path.read_text() == json.dumps(RES, indent=0)
    json_path, _ = write_results(str(tmp_path / "b"), RES, MD, echo=False)
    assert json_path.read_text() == json.dumps(RES, indent=1)


def test_a_list_payload_round_trips(tmp_path: Path) -> None:
    rows = [{"event": "env"}, {"event": "end", "seconds": 1.0}]
    json_path, _ = write_results(tmp_path / "rows", rows, MD, indent=0, echo=False)
    assert json.loads(json_path.read_text()) == rows


def test_a_dotted_out_name_keeps_its_dot(tmp_path: Path) -> None:
    json_path, md_path = write_results(str(tmp_path / "h100.v2"), RES, MD, echo=False)
    assert (json_path.name, md_path.name) == ("h100.v2.json", "h100.v2.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h100.v2.json", "h100.v2.md"]


@pytest.mark.parametrize("echo", [True, False])
def test_echo_prints_the_markdown_or_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], echo: bool) -> None:
    write_results(tmp_path / "p", RES, MD, echo=echo)
    captured = capsys.readouterr()
    assert captured.out == (MD + "\n" if echo else "")
    assert captured.err == ""
