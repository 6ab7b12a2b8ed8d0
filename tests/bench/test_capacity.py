"""benchmarks/capacity.py: the memory accounting matches what the engine's parts really allocate (CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from inlaid.lora.pool import LoRAPool
from inlaid.model.arch import ModelArch
from inlaid.model.llama import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def capacity():
    spec = importlib.util.spec_from_file_location("capacity_bench", ROOT / "benchmarks" / "capacity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t is not None and "rotary" not in n)


def test_weight_and_slot_bytes_match_real_allocations(capacity, tiny_llama_dir) -> None:
    from inlaid.bench.policy_sweep import _dummy_w4_load_model
    from inlaid.config import ModelConfig

    arch = ModelArch.from_dir(tiny_llama_dir)
    dense = LlamaForCausalLM(arch, device=torch.device("cpu"), dtype=torch.float16)
    assert capacity.weight_bytes(arch, "fp16") == _bytes(dense)
    w4, _, _ = _dummy_w4_load_model(128)(ModelConfig(model=str(tiny_llama_dir)), torch.device("cpu"), torch.float16)
    assert capacity.weight_bytes(arch, "w4", group_size=32) == _bytes(w4) < _bytes(dense)
    pool = LoRAPool(3, 8, arch.num_layers, arch.lora_module_shapes(), "cpu", torch.float16)
    scal = sum(t.numel() * t.element_size() for t in pool.scalings.values())
    assert 3 * capacity.slot_bytes(arch, 8) == pool.nbytes + scal


def test_account_and_cli_on_13b_shapes(capacity, tmp_path) -> None:
    rc = capacity.main(["--budget-gb", "40", "32", "--table-budgets", "40", "--out", str(tmp_path)])
    assert rc == 0
    obj = json.loads((tmp_path / "capacity.json").read_text())
    fp, w4 = obj["rows"][0], obj["rows"][1]
    assert (fp["quant"], w4["quant"], fp["budget_gb"]) == ("fp16", "w4", 40.0)
    assert 23 < fp["weights_gb"] < 26 and w4["weights_gb"] < fp["weights_gb"] / 3
    free = 40 * 2**30 - fp["weights_gb"] * 2**30 - fp["kv_gb"] * 2**30 - 2**30
    assert fp["max_adapters"] == int(free // (fp["slot_mb"] * 2**20))
    assert w4["max_adapters"] > fp["max_adapters"] > 0
    assert any("32 GB" in line for line in obj["summary_lines"])


def test_try_engine_serves_through_an_adapter(capacity, tiny_llama_dir) -> None:
    out = capacity._try_engine(str(tiny_llama_dir), "fp16", 2, 64, 8, device="cpu")
    assert out["ok"], out
