"""benchmarks/peft_baseline.py end to end on the tiny random Llama (CPU): both systems serve the workload."""

from __future__ import annotations

import importlib.util
import json

import pytest
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


def test_aliased_adapters_equal_their_source_and_differ_from_others(tiny_llama_dir) -> None:
    import torch

    spec = importlib.util.spec_from_file_location("peft_baseline_bench2", ROOT / "benchmarks" / "peft_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.hf_peft_model(str(tiny_llama_dir), "cpu", 5, [4, 8], distinct=2)  # t2, t4 alias t0; t3 alias t1
    assert sorted(model.peft_config) == ["t0", "t1", "t2", "t3", "t4"]
    assert model.peft_config["t3"].r == 8 and model.peft_config["t4"].r == 4
    row = torch.randint(3, 100, (1, 6)).repeat(6, 1)
    with torch.inference_mode():
        out = model(input_ids=row, adapter_names=["t0", "t1", "t2", "t3", "t4", "__base__"]).logits
    torch.testing.assert_close(out[2], out[0])
    torch.testing.assert_close(out[4], out[0])
    torch.testing.assert_close(out[3], out[1])
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[5]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="already exists"):
        mod.alias_adapter(model, mod.tuner_layers(model), "t0", "t1")
