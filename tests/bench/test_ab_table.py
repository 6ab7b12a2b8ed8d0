"""``benchmarks/ab_table.py``: same-call A/B pages grouped by tag, batch and adapters, in run order, ratio of
the means; a page may hold several rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("ab_table_bench", ROOT / "benchmarks" / "ab_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _page(path: Path, tps: float, batch: int = 1) -> None:
    row = {"batch": batch, "adapters": 0, "decode_tps": tps, "frac_roofline": tps / 1000}
    path.write_text(json.dumps({"rows": [row]}))


def test_pairs_grouped_by_row_with_mean_ratio(tmp_path: Path) -> None:
    for tag, old, new in (("1a0", (300.0, 310.0), (330.0, 350.0)), ("32a32", (6000.0,), (6600.0,))):
        for i, tps in enumerate(old, 1):
            _page(tmp_path / f"e2e_x_{tag}_old_{i}_h100.json", tps)
        for i, tps in enumerate(new, 1):
            _page(tmp_path / f"e2e_x_{tag}_new_{i}_h100.json", tps)
    _page(tmp_path / "e2e_x_8a0_new_1_h100.json", 1.0)  # no parent run: left out
    _page(tmp_path / "e2e_x_1a0_old_1_h200.json", 1.0)  # other suffix: not read
    mod = _module()
    pages = mod.collect(str(tmp_path / "e2e_x_"), "_h100")
    assert [r["decode_tps"] for r in pages[("1a0", 1, 0)]["old"]] == [300.0, 310.0]
    lines = mod.table(pages).splitlines()
    assert len(lines) == 4  # header, rule, two complete rows
    assert "| 1a0 | 1 | 0 | 300 / 310 | 330 / 350 | 1.115 | 34.0% |" in lines
    assert "| 32a32 | 1 | 0 | 6,000 | 6,600 | 1.100 | 660.0% |" in lines


def test_pages_with_several_rows_give_one_line_per_batch_and_adapters(tmp_path: Path) -> None:
    def page(path: Path, rows: list[tuple[int, int, float]]) -> None:
        path.write_text(json.dumps({"rows": [{"batch": b, "adapters": a, "decode_tps": t, "frac_roofline": 0.5}
                                             for b, a, t in rows]}))

    page(tmp_path / "e2e_y_sweep_old_1.json", [(1, 0, 400.0), (8, 0, 2000.0), (1, 32, 300.0)])
    page(tmp_path / "e2e_y_sweep_new_1.json", [(1, 0, 420.0), (8, 0, 1900.0), (1, 32, 330.0)])
    page(tmp_path / "e2e_y_sweep_new_2.json", [(1, 0, 440.0), (8, 0, 2100.0), (1, 32, 300.0)])
    mod = _module()
    lines = mod.table(mod.collect(str(tmp_path / "e2e_y_"), "")).splitlines()
    assert lines[2:] == ["| sweep | 1 | 0 | 400 | 420 / 440 | 1.075 | 50.0% |",
                         "| sweep | 1 | 32 | 300 | 330 / 300 | 1.050 | 50.0% |",
                         "| sweep | 8 | 0 | 2,000 | 1,900 / 2,100 | 1.000 | 50.0% |"]
