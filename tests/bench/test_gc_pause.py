"""``benchmarks/gc_pause.py`` on CPU over a tiny model: both modes run and reach the page, the collector is handed
back afterwards, and the generation-2 timer sees a full collection."""

from __future__ import annotations

import gc
import importlib.util
import json
from pathlib import Path

from tiny import make_tiny_llama_dir

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gc_pause_bench", ROOT / "benchmarks" / "gc_pause.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_modes_reach_the_page_and_the_heap_is_handed_back(tmp_path: Path) -> None:
    mod = _module()
    model = make_tiny_llama_dir(tmp_path / "tiny", num_hidden_layers=2, max_position_embeddings=512)
    argv = ["--model", str(model), "--batch", "3", "--new-tokens", "4", "--runs", "2", "--num-blocks", "64",
            "--out", str(tmp_path / "page")]
    assert mod.main(argv) == 0
    assert gc.get_freeze_count() == 0
    res = json.loads((tmp_path / "page.json").read_text())
    assert res["command"].endswith("--out " + str(tmp_path / "page"))
    assert list(res["modes"]) == ["plain", "frozen"]
    for m in res["modes"].values():
        assert len(m["runs"]) == 2 and all(r["max_decode_step_ms"] > 0 for r in m["runs"])
    page = (tmp_path / "page.md").read_text()
    assert "| plain |" in page and "| frozen |" in page


def test_gen2_timer_times_full_collections_only() -> None:
    timer = _module().Gen2Timer()
    try:
        gc.collect(0)
        assert timer.ms == []
        gc.collect()
        assert len(timer.ms) == 1 and timer.ms[0] >= 0
    finally:
        timer.close()
    assert timer._hook not in gc.callbacks
