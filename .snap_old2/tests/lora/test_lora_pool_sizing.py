"""Slot sizing: a pool holds only the projections (and rank) it was sized for, and refuses adapters that need more."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import ALL7, make_batch, peft_delta

from inlaid.config import EngineConfig, LoRAConfig
from inlaid.lora import AdapterRegistry, IncompatibleAdapterError, load_adapter
from inlaid.lora.pool import LoRAPool, resolve_target_modules, slot_spec
from inlaid.lora.synthetic import random_adapter

QV = ("q_proj", "v_proj")


def _expected_bytes(shapes, modules, slots: int, rank: int, layers: int, elem: int) -> int:
    return slots * layers * rank * sum(shapes[m][0] + shapes[m][1] for m in modules) * elem


def test_qv_pool_holds_two_of_seven_equal_projections() -> None:
    shapes = {m: (16, 16) for m in ALL7}  # every projection the same size: q,v = exactly 2/7
    full = LoRAPool(4, 8, 3, shapes, dtype=torch.float16)
    qv = LoRAPool(4, 8, 3, shapes, dtype=torch.float16, target_modules=QV)
    assert qv.slot_modules == QV and set(qv.a) == set(qv.b) == set(QV)
    assert qv.nbytes * 7 == full.nbytes * 2
    assert qv.nbytes == _expected_bytes(shapes, QV, 4, 8, 3, 2)


def test_qv_pool_bytes_on_a_gqa_base(tiny_shapes) -> None:
    full = LoRAPool(3, 8, 2, tiny_shapes)
    qv = LoRAPool(3, 8, 2, tiny_shapes, target_modules="q_proj, v_proj")
    assert qv.nbytes == _expected_bytes(tiny_shapes, QV, 3, 8, 2, 4)
    assert qv.nbytes == sum(full.a[m].numel() * 4 + full.b[m].numel() * 4 for m in QV) < full.nbytes * 2 / 7 + 1


def test_qv_pool_deltas_equal_peft_and_untouched_elsewhere(peft_adapters, tiny_shapes) -> None:
    pool = LoRAPool(2, 4, 2, tiny_shapes, target_modules=QV)
    pool.load(1, load_adapter("r1", peft_adapters["r1"][0]))  # r1 targets q_proj, v_proj
    slots = [1, -1, 1, 1]
    batch = make_batch(slots)
    pool.prepare(batch)
    g = torch.Generator().manual_seed(3)
    for module in ALL7:
        d_in, d_out = tiny_shapes[module]
        x, out0 = torch.randn(4, d_in, generator=g), torch.randn(4, d_out, generator=g)
        got = pool.apply(1, module, x, out0.clone(), batch) - out0
        expected = torch.zeros(4, d_out)
        expected[[0, 2, 3]] = peft_delta(peft_adapters["r1"][1], 1, module, x[[0, 2, 3]])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if module not in QV:
            assert not got.any()


def test_adapter_outside_the_slot_modules_is_refused(peft_adapters, tiny_shapes) -> None:
    pool = LoRAPool(2, 8, 2, tiny_shapes, target_modules=QV)
    adapter = load_adapter("all7", peft_adapters["r4_rslora_all"][0])
    with pytest.raises(IncompatibleAdapterError, match=r"k_proj.*hold only q_proj, v_proj.*--lora-target-modules"):
        pool.load(0, adapter)
    assert pool.slot_names == [None, None] and not any(t.any() for t in pool.a.values())
    registry = AdapterRegistry(tiny_shapes, 2, 8, slot_modules=pool.slot_modules)
    with pytest.raises(IncompatibleAdapterError, match="lora-target-modules"):
        registry.add(adapter)
    assert "all7" not in registry
    registry.add(load_adapter("qv", peft_adapters["r1"][0]))
    with pytest.raises(IncompatibleAdapterError, match="max-lora-rank 16"):
        AdapterRegistry(tiny_shapes, 2, 8, slot_modules=QV).add(random_adapter("big", tiny_shapes, 2, 16, QV))


def test_slot_spec_and_target_resolution(tiny_shapes) -> None:
    adapters = [random_adapter("a", tiny_shapes, 2, 4, ("v_proj", "q_proj")),
                random_adapter("b", tiny_shapes, 2, 16, ("o_proj",))]
    assert slot_spec(adapters) == (("o_proj", "q_proj", "v_proj"), 16)
    assert resolve_target_modules("all", tiny_shapes) == ALL7 == resolve_target_modules(None, tiny_shapes)
    assert resolve_target_modules(["v_proj", "q_proj"], tiny_shapes) == QV  # base order, not given order
    with pytest.raises(ValueError, match="'qq_proj' is not a projection"):
        resolve_target_modules("q_proj,qq_proj", tiny_shapes)
    with pytest.raises(ValueError, match="empty list"):
        resolve_target_modules(" , ", tiny_shapes)
    with pytest.raises(ValueError, match="slot_spec needs"):
        slot_spec([])


def test_config_field_validates() -> None:
    assert LoRAConfig(lora_target_modules="q_proj,v_proj").lora_target_modules == "q_proj,v_proj"
    assert EngineConfig.from_kwargs(lora_target_modules="all").lora.lora_target_modules == "all"
    with pytest.raises(ValueError, match="lora_target_modules"):
        LoRAConfig(lora_target_modules="q_proj,lm_head")


def test_engine_sized_for_qv_refuses_all7_and_matches_all_pool(tiny_llama_dir, peft_adapters) -> None:
    from inlaid.engine.llm_engine import LLMEngine
    from inlaid.sampling import SamplingParams

    tokens = {}
    for targets in ("all", "q_proj,v_proj"):
        eng = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", max_loras=2,
                                                 max_lora_rank=8, num_blocks=32, lora_target_modules=targets))
        eng.add_adapter("qv", str(peft_adapters["r1"][0]))
        if targets != "all":
            assert set(eng.parts.pool.a) == set(QV)
            with pytest.raises(IncompatibleAdapterError, match="lora-target-modules"):
                eng.add_adapter("all7", str(peft_adapters["r4_rslora_all"][0]))
        eng.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True), "qv")
        out = []
        while eng.has_unfinished_requests():
            out += [o for o in eng.step() if o.finished]
        tokens[targets] = out[0].token_ids
    assert tokens["all"] == tokens["q_proj,v_proj"]
