"""Per-task (prompt, output) token lengths of the task suite, for workload generation.

Owns: reading ``inlaid/tasks/data/<task>/{train,validation,test}.jsonl``
(fields ``prompt`` and ``completion``), counting tokens with the bundled
SmolLM2 tokenizer when it can be loaded (else ~1.3 tokens per word), and a
JSON cache of the counts (``task_lengths.json`` beside this module) keyed by a
hash of the data files, so workloads are fast and deterministic.

Invariants:
- Output length = completion tokens + 1 (the EOS token the engine samples).
- A cache whose data hash differs from the current files is ignored.
- Pure Python unless a tokenizer is loaded (``transformers`` imported lazily).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

TASK_DATA_DIR = Path(__file__).resolve().parents[1] / "tasks" / "data"
CACHE_FILE = Path(__file__).resolve().parent / "task_lengths.json"
SPLITS = ("train", "validation", "test")
Counter_ = Callable[[str], int]


def words_counter(text: str) -> int:
    """~1.3 tokens per whitespace word (0 for empty text)."""
    return int(round(1.3 * len(text.split())))


def data_files(data_dir: Path = TASK_DATA_DIR) -> dict[str, list[Path]]:
    """task -> its split files, for every task directory with at least one split."""
    out: dict[str, list[Path]] = {}
    if not data_dir.is_dir():
        return out
    for task_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        files = [task_dir / f"{s}.jsonl" for s in SPLITS if (task_dir / f"{s}.jsonl").is_file()]
        if files:
            out[task_dir.name] = files
    return out


def data_hash(files: dict[str, list[Path]]) -> str:
    h = hashlib.sha256()
    for task, paths in sorted(files.items()):
        for p in paths:
            h.update(f"{task}/{p.name}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def count_lengths(files: dict[str, list[Path]], count: Counter_) -> dict[str, list[tuple[int, int]]]:
    """(prompt tokens, completion tokens + 1) for every row with string prompt and completion."""
    suite: dict[str, list[tuple[int, int]]] = {}
    for task, paths in files.items():
        pairs = []
        for p in paths:
            for line in p.read_text().splitlines():
                row = json.loads(line) if line.strip() else {}
                prompt, completion = row.get("prompt"), row.get("completion")
                if isinstance(prompt, str) and isinstance(completion, str):
                    pairs.append((max(count(prompt), 1), count(completion) + 1))
        if pairs:
            suite[task] = pairs
    return suite


def bundled_token_counter() -> tuple[Counter_, str] | None:
    """Token counter of the bundled SmolLM2 tokenizer (from its GGUF), or None when unavailable."""
    try:
        from transformers import AutoTokenizer

        from inlaid.model.gguf import bundled_default_gguf

        gguf = bundled_default_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ImportError, OSError, ValueError) as exc:
        logger.warning("bundled tokenizer unavailable (%s); using ~1.3 tokens per word", exc)
        return None
    return (lambda text: len(tok.encode(text, add_special_tokens=False))), "SmolLM2-135M-Instruct"


def build_cache(data_dir: Path = TASK_DATA_DIR, cache: Path = CACHE_FILE) -> dict:
    """Count with the bundled tokenizer (else words) and write the cache; returns its content."""
    files = data_files(data_dir)
    found = bundled_token_counter()
    count, name = found if found is not None else (words_counter, "words*1.3")
    content = {"data_hash": data_hash(files), "counter": name, "tasks": count_lengths(files, count)}
    cache.write_text(json.dumps(content, separators=(",", ":")) + "\n")
    return content


def load_task_lengths(data_dir: Path = TASK_DATA_DIR, cache: Path = CACHE_FILE) -> tuple[dict[str, list[tuple[int, int]]], str]:
    """(task -> (prompt_len, output_len) samples, how tokens were counted); empty when no data.

    Uses the cache when it matches the data, else ~1.3 tokens per word (rebuild the
    cache with ``python -m inlaid.bench.task_lengths``).
    """
    files = data_files(data_dir)
    if not files:
        return {}, "none"
    if cache.is_file():
        content = json.loads(cache.read_text())
        if content.get("data_hash") == data_hash(files):
            return {t: [tuple(x) for x in v] for t, v in content["tasks"].items()}, content["counter"]
        logger.info("task-length cache %s is stale; counting ~1.3 tokens per word", cache)
    return count_lengths(files, words_counter), "words*1.3"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    c = build_cache()
    logger.info("wrote %s: %d tasks counted with %s", CACHE_FILE, len(c["tasks"]), c["counter"])
