"""benchmarks/peft_baseline.py end to end on the tiny random Llama (CPU): both systems serve the workload."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_peft_baseline_runs_both_systems(tiny_llama_dir, tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("peft_baseline_bench", ROOT / "benchmarks" / "peft_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--model", str(tiny_llama_dir), "--device", "cpu", "--adapters", "3", "--requests", "4",
                   "--batch", "2", "--max-tokens", "3", "--max-prompt", "16", "--lengths", "synthetic",
                   "--ranks", "4", "8", "--num-blocks", "64", "--out", str(tmp_path)])
    assert rc == 0
    obj = json.loads((tmp_path / "peft_baseline.json").read_text())
    assert obj["skipped"] == [] and len(obj["rows"]) == 1
    row = obj["rows"][0]
    assert row["adapters"] == 3 and row["requests"] == 4 and 1 <= row["distinct_per_batch"] <= 2
    assert 4 <= row["output_tokens"] <= 12
    assert row["peft_tps"] == row["output_tokens"] / row["peft_s"] and row["ratio"] == row["peft_s"] / row["inlaid_s"]
