"""Loading the committed task splits.

Owns reading ``<data_dir>/<task>/<split>.jsonl`` (default: the package's
``inlaid/tasks/data``) into ``Example`` records. Invariants: each example has
a non-empty ``prompt`` (the user message, already templated) and a
``completion`` (the reference answer); ``label`` is set for classification
and math. Errors name the fix (build command, known tasks/splits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from inlaid.tasks.registry import get_task

SPLITS = ("train", "validation", "test")
DATA_DIR = Path(__file__).parent / "data"


class MissingSplitError(ValueError):
    """A split file is absent; the message says how to build it."""


@dataclass(frozen=True)
class Example:
    """One task example: ``prompt`` is the user message, ``completion`` the reference."""

    id: str
    task: str
    prompt: str
    completion: str
    label: str | None = None


def split_path(task: str, split: str, data_dir: Path | None = None) -> Path:
    """Path of a split file (validates the task and split names)."""
    get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return Path(data_dir or DATA_DIR) / task / f"{split}.jsonl"


def load_split(task: str, split: str, limit: int | None = None, data_dir: Path | None = None) -> list[Example]:
    """The first ``limit`` (default all) examples of ``task``'s ``split``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = split_path(task, split, data_dir)
    if not path.is_file():
        raise MissingSplitError(
            f"split file {path} is missing; build it with "
            f"`python -m inlaid.tasks.build --out {path.parent.parent} --tasks {task}` "
            "(needs the source packages listed in DATA.md)"
        )
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ex = Example(id=row["id"], task=task, prompt=row["prompt"], completion=row["completion"], label=row.get("label"))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{lineno}: bad example line ({e}); rebuild the split") from e
            examples.append(ex)
    return examples
