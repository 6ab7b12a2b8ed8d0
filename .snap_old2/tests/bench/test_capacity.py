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
    assert 3 * capacity.slot_bytes(arch, 8, targets="all") == pool.nbytes + scal
    qv = LoRAPool(3, 8, arch.num_layers, arch.lora_module_shapes(), "cpu", torch.float16,
                  target_modules=capacity.TARGETS)
    scal = sum(t.numel() * t.element_size() for t in qv.scalings.values())
    assert 3 * capacity.slot_bytes(arch, 8, targets=capacity.TARGETS) == qv.nbytes + scal < pool.nbytes


def test_account_and_cli_on_13b_shapes(capacity, tmp_path) -> None:
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"rows": [{"quant": "fp16", "verified": 24, "max_adapters": 24},
                                            {"quant": "w4", "max_adapters": 62}]}))
    rc = capacity.main(["--budget-gb", "40", "32", "--table-budgets", "40", "--carry-verified", str(earlier),
                        "--out", str(tmp_path)])
    assert rc == 0
    obj = json.loads((tmp_path / "capacity.json").read_text())
    fp, w4 = obj["rows"][0], obj["rows"][1]
    assert (fp["quant"], w4["quant"], fp["budget_gb"], fp["targets"]) == ("fp16", "w4", 40.0, "q_proj,v_proj")
    assert 23 < fp["weights_gb"] < 26 and w4["weights_gb"] < fp["weights_gb"] / 3
    free = 40 * 2**30 - fp["weights_gb"] * 2**30 - fp["kv_gb"] * 2**30 - 2**30
    assert fp["max_adapters"] == int(free // (fp["slot_mb"] * 2**20))
    assert w4["max_adapters"] > fp["max_adapters"] > 0
    # 13B: q,v at rank 64 = 64 * 2 * (5120 + 5120) * 40 layers * 2 bytes (+ fp32 scalings)
    assert fp["slot_mb"] * 2**20 == 64 * 2 * 10240 * 40 * 2 + 40 * 2 * 4
    all7 = [r for r in obj["table"] if r["targets"].count(",") == 6 and r["quant"] == "fp16"]
    assert all7 and all7[0]["max_adapters"] < fp["max_adapters"] / 4
    assert any("32 GB" in line for line in obj["summary_lines"])
    assert any("up to" in line for line in obj["summary_lines"])
    assert obj["verified_earlier"] == [{"quant": "fp16", "verified": 24, "max_adapters": 24,
                                        "targets": ",".join(capacity.ALL7)}]


def test_try_engine_serves_through_an_adapter(capacity, tiny_llama_dir) -> None:
    out = capacity._try_engine(str(tiny_llama_dir), "fp16", 2, 64, 8, device="cpu")
    assert out["ok"], out
