"""Fixtures shared by ``tests/quant``: calibration rows and JSONL files for the tiny model's tasks, and the
tiny model's 4-bit g32 MLGPTQ base for tasks {a, b} that the re-quantization tests add task c to.

One definition of the rows the quantization tests calibrate on (they were repeated in several files). Task
``k`` gets answers of different lengths, so different tasks give different Hessians.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import pytest

Rows = list[dict[str, str]]


def _rows(k: int = 0, n: int = 8, tag: str = "") -> Rows:
    return [{"prompt": f"Translate: cat {i} {tag}".rstrip(), "completion": "chat " * (i % 4 + k + 1)}
            for i in range(n)]  # fmt: skip


@pytest.fixture(scope="session")
def calib_rows() -> Callable[..., Rows]:
    """``calib_rows(k=0, n=8, tag="")``: ``n`` prompt/completion rows of task number ``k``."""
    return _rows


@pytest.fixture(scope="session")
def write_calib() -> Callable[..., dict[str, Path]]:
    """``write_calib(root, names, n=8)``: one calibration JSONL per task name (task k = its position) under
    ``root``; returns name -> path."""

    def write(root: Path, names: Sequence[str], n: int = 8) -> dict[str, Path]:
        out = {}
        for k, name in enumerate(names):
            out[name] = Path(root) / f"{name}.jsonl"
            out[name].write_text("".join(json.dumps(r) + "\n" for r in _rows(k, n, name)))
        return out

    return write


@pytest.fixture(scope="session")
def ab_base(tiny_llama_dir, tiny_adapters, tmp_path_factory, write_calib) -> dict:
    """``{"ab": dir, "calib": name -> JSONL, "ads": name -> adapter dir}`` for tasks a, b, c; the
    {a, b} checkpoint is quantized once per session: tests copy it before changing it."""
    from inlaid.quant.quantize_model import quantize_model

    root = tmp_path_factory.mktemp("ab_base")
    calib = write_calib(root, ["a", "b", "c"])
    ads = {n: str(tiny_adapters[n]) for n in "abc"}
    quantize_model(str(tiny_llama_dir), {k: ads[k] for k in "ab"}, {k: calib[k] for k in "ab"}, "mlgptq", 4, 32,
                   root / "ab")  # fmt: skip
    return {"ab": root / "ab", "calib": calib, "ads": ads}

