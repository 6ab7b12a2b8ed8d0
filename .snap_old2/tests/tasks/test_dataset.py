"""The committed JSONL splits: parse, fields, sizes, disjointness; loader errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid.tasks.build import DEFAULT_SIZES, TASK_SIZES
from inlaid.tasks.dataset import DATA_DIR, SPLITS, MissingSplitError, load_split
from inlaid.tasks.registry import TASKS, get_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_committed_splits_are_well_formed(name: str) -> None:
    task = get_task(name)
    prompts: dict[str, set[str]] = {}
    for split in SPLITS:
        rows = [json.loads(line) for line in (DATA_DIR / name / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        want = TASK_SIZES.get(name, DEFAULT_SIZES)[split]
        assert 0 < len(rows) <= want
        if split != "train":
            assert len(rows) == want  # held-out splits are always full
        assert len(rows) <= 200 or split != "test"
        for row in rows:
            assert row["prompt"].strip() and row["completion"].strip()
            assert row["id"].startswith(f"{name}/{split}/")
            if task.kind == "classification":
                assert row["label"] in task.labels and row["completion"] == row["label"]
            if task.kind == "math":
                assert float(row["label"]) == float(row["completion"])
        prompts[split] = {r["prompt"] for r in rows}
        assert len(prompts[split]) == len(rows), "duplicate prompts inside a split"
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]


def test_suite_is_small() -> None:
    total = sum(p.stat().st_size for p in Path(DATA_DIR).rglob("*.jsonl"))
    assert total < 5e6


def test_load_split_and_limit() -> None:
    rows = load_split("fortune_topic", "test", limit=5)
    assert len(rows) == 5
    assert rows[0].label in get_task("fortune_topic").labels
    assert rows[0].task == "fortune_topic"
    assert load_split("fortune_topic", "test", limit=0) == []


def test_missing_split_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(MissingSplitError, match="python -m inlaid.tasks.build") as info:
        load_split("math_gsm", "test", data_dir=tmp_path)
    assert isinstance(info.value, ValueError)


def test_bad_names_and_lines(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        load_split("nope", "test")
    with pytest.raises(ValueError, match="unknown split"):
        load_split("math_gsm", "dev")
    with pytest.raises(ValueError, match="limit"):
        load_split("math_gsm", "test", limit=-1)
    (tmp_path / "math_gsm").mkdir()
    (tmp_path / "math_gsm" / "test.jsonl").write_text('{"id": "x", "prompt": "p"}\n')
    with pytest.raises(ValueError, match="bad example line"):
        load_split("math_gsm", "test", data_dir=tmp_path)
