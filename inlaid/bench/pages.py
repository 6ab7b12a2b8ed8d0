"""The results page of a benchmark script: ``<out>.json`` (the numbers) and ``<out>.md`` (the page).

Owns ``write_results``, the last step of the scripts in ``benchmarks/`` that take ``--out PREFIX``.
Invariants: the two files are named by appending ``.json`` and ``.md`` to ``out`` (a dot in ``out``
stays: ``runs/h100.v2`` gives ``runs/h100.v2.json``); the parent folder is created first; the JSON is
``json.dumps(res, indent=indent)`` exactly, the Markdown is written as given. Not to be confused with
``serving_page.write_page``, which rebuilds the serving page from a results folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: str | Path, res: dict[str, Any] | list[Any], markdown: str, indent: int = 1,
                  echo: bool = True) -> tuple[Path, Path]:
    """Write ``<out>.json`` and ``<out>.md``, print the Markdown when ``echo``; the two paths, JSON first."""
    json_path, md_path = Path(f"{out}.json"), Path(f"{out}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=indent))
    md_path.write_text(markdown)
    if echo:
        print(markdown)
    return json_path, md_path
