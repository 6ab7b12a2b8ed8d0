"""Builder: seeded group splits are deterministic and disjoint; real rebuilds are byte-identical.

The real-source tests rebuild the cheap tasks (a few seconds each) from the
installed packages; they skip, naming the install command, where a source is
missing. The committed files are compared with a fresh build only when the
source versions match the ones recorded in the committed manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid.tasks.build import DEFAULT_SIZES, build, main, source_versions, split_records, task_seed
from inlaid.tasks.dataset import DATA_DIR, SPLITS
from inlaid.tasks.sources import SourceMissingError

# Cheap tasks and the source versions their content depends on.
CHEAP = {
    "translate_en_fr": ("django",),
    "fortune_topic": ("deb:fortunes", "deb:fortunes-min"),
    "trivia_qa": ("chatterbot-corpus", "PyYAML"),
    "definitions": ("deb:wordnet-base",),
}


def _records(n_groups: int, per_group: int) -> list[dict[str, str]]:
    return [
        {"input": f"g{g}-x{i}", "completion": str(i), "group": f"g{g}"}
        for g in range(n_groups) for i in range(per_group)
    ]


def test_split_records_is_deterministic_and_keeps_groups_whole() -> None:
    sizes = {"train": 50, "validation": 10, "test": 10}
    recs = _records(40, 3) + [{"input": "g0-x0", "completion": "dup", "group": "g0"}]
    a = split_records(recs, sizes, seed=task_seed("t"))
    b = split_records(list(recs), sizes, seed=task_seed("t"))
    assert a == b
    assert {k: len(v) for k, v in a.items()} == sizes
    groups = {split: {r["group"] for r in a[split]} for split in a}
    assert not groups["train"] & groups["test"] and not groups["validation"] & groups["test"]
    assert not groups["train"] & groups["validation"]
    assert all(r["completion"] != "dup" for split in a.values() for r in split)  # first duplicate wins
    c = split_records(recs, sizes, seed=task_seed("other"))
    assert c["test"] != a["test"]  # the seed matters


def test_split_records_small_source_fills_heldout_first() -> None:
    out = split_records(_records(30, 1), DEFAULT_SIZES, seed=1)
    assert len(out["test"]) == 30 and out["validation"] == [] and out["train"] == []
    with pytest.raises(ValueError, match="at most 200"):
        split_records(_records(3, 1), {"train": 1, "validation": 1, "test": 201}, seed=1)


def _build_or_skip(out: Path, name: str) -> None:
    try:
        build(out, name)
    except SourceMissingError as e:
        pytest.skip(f"source for {name} not installed: {e}")


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_real_build_is_byte_identical(tmp_path: Path, name: str) -> None:
    _build_or_skip(tmp_path / "a", name)
    _build_or_skip(tmp_path / "b", name)
    for split in SPLITS:
        a = (tmp_path / "a" / name / f"{split}.jsonl").read_bytes()
        assert a and a == (tmp_path / "b" / name / f"{split}.jsonl").read_bytes()
    committed = json.loads((DATA_DIR / "manifest.json").read_text())["sources"]
    here = source_versions()
    if any(committed.get(k) != here.get(k) for k in CHEAP[name]):
        pytest.skip(f"{name}: installed source versions differ from the committed manifest")
    for split in SPLITS:
        assert (tmp_path / "a" / name / f"{split}.jsonl").read_bytes() == (DATA_DIR / name / f"{split}.jsonl").read_bytes()


def test_cli_rejects_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        main(["--out", str(tmp_path), "--tasks", "nope"])
