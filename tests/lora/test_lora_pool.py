"""LoRAPool deltas for mixed-adapter batches equal PEFT's own layer deltas."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import ALL7, make_batch, peft_delta

from inlaid.kernels.lora_sgmv import LoRASegments
from inlaid.lora import load_adapter
from inlaid.lora.pool import LoRAPool

# slot -> adapter name; slot 4 stays empty
SLOT_OF = {"r4_rslora_all": 0, "r8_patterns_bin": 1, "r4_k_layer1": 2, "r1": 3}
# interleaved sequences of different adapters plus base-only tokens
TOKEN_SLOTS = [3, 3, -1, 0, 1, 1, 1, 2, 0, -1, 3, 2, 2, 1, 0]


def _check_layer_module(pool: LoRAPool, peft_adapters, by_slot: dict[int, str], layer: int, module: str,
                        slots: list[int], seed: int) -> None:
    d_in, d_out = pool.module_shapes[module]
    g = torch.Generator().manual_seed(seed)
    x, out0 = torch.randn(len(slots), d_in, generator=g), torch.randn(len(slots), d_out, generator=g)
    batch = make_batch(slots)
    pool.prepare(batch)
    got = pool.apply(layer, module, x, out0.clone(), batch) - out0
    expected = torch.zeros(len(slots), d_out)
    for slot, name in by_slot.items():
        rows = [t for t, s in enumerate(slots) if s == slot]
        if rows:
            expected[rows] = peft_delta(peft_adapters[name][1], layer, module, x[rows])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def loaded_pool(peft_adapters, tiny_shapes) -> LoRAPool:
    pool = LoRAPool(num_slots=5, max_rank=8, num_layers=2, module_shapes=tiny_shapes)
    for name, slot in SLOT_OF.items():
        pool.load(slot, load_adapter(name, peft_adapters[name][0]))
    return pool


@pytest.mark.parametrize("module", ALL7)
def test_mixed_batch_delta_equals_peft_per_module(module: str, loaded_pool, peft_adapters) -> None:
    by_slot = {s: n for n, s in SLOT_OF.items()}
    for layer in range(2):
        _check_layer_module(loaded_pool, peft_adapters, by_slot, layer, module, TOKEN_SLOTS, seed=layer)


def test_prepare_builds_segments_once_and_apply_uses_them(loaded_pool) -> None:
    batch = make_batch(TOKEN_SLOTS)
    loaded_pool.prepare(batch)
    meta = batch.lora_meta
    assert isinstance(meta, LoRASegments)
    assert meta.slots == (0, 1, 2, 3)  # one segment per distinct adapter, not per sequence
    assert meta.token_order.numel() == sum(s >= 0 for s in TOKEN_SLOTS)
    x, out = torch.randn(len(TOKEN_SLOTS), 64), torch.zeros(len(TOKEN_SLOTS), 64)
    loaded_pool.apply(0, "q_proj", x, out, batch)
    assert batch.lora_meta is meta
    base_rows = [t for t, s in enumerate(TOKEN_SLOTS) if s < 0]
    assert torch.count_nonzero(out[base_rows]) == 0 and torch.count_nonzero(out) > 0


def test_all_base_tokens_leave_out_untouched(loaded_pool) -> None:
    batch = make_batch([-1, -1, -1])
    out = torch.randn(3, 64)
    assert torch.equal(loaded_pool.apply(1, "o_proj", torch.randn(3, 64), out.clone(), batch), out)


def test_reloading_a_slot_with_smaller_rank_and_fewer_modules_zeroes_the_rest(peft_adapters, tiny_shapes) -> None:
    pool = LoRAPool(num_slots=2, max_rank=8, num_layers=2, module_shapes=tiny_shapes)
    pool.load(1, load_adapter("big", peft_adapters["r4_rslora_all"][0]))
    pool.load(1, load_adapter("small", peft_adapters["r1"][0]))
    assert pool.slot_names == [None, "small"]
    assert torch.count_nonzero(pool.a["q_proj"][:, 1, 1:]) == 0  # padded rows past rank 1
    assert torch.count_nonzero(pool.a["down_proj"][:, 1]) == 0  # module r1 does not target
    for module in ("q_proj", "down_proj"):
        _check_layer_module(pool, peft_adapters, {1: "r1"}, 0, module, [1, -1, 1], seed=5)
    pool.clear(1)
    assert pool.slot_names[1] is None and torch.count_nonzero(pool.b["v_proj"]) == 0
    assert torch.count_nonzero(pool.scalings["q_proj"]) == 0


def test_rank4_adapter_in_rank16_pool_gives_same_deltas(peft_adapters, tiny_shapes) -> None:
    adapter = load_adapter("r4", peft_adapters["r4_rslora_all"][0])
    small = LoRAPool(num_slots=1, max_rank=4, num_layers=2, module_shapes=tiny_shapes)
    big = LoRAPool(num_slots=3, max_rank=16, num_layers=2, module_shapes=tiny_shapes)
    small.load(0, adapter)
    big.load(2, adapter)
    for module in ALL7:
        d_in, d_out = tiny_shapes[module]
        x = torch.randn(6, d_in, generator=torch.Generator().manual_seed(7))
        a = small.apply(1, module, x, torch.zeros(6, d_out), make_batch([0] * 6))
        b = big.apply(1, module, x, torch.zeros(6, d_out), make_batch([2] * 6))
        # only the fp32 summation order may differ (the BLAS kernel picked for rank 4 or 16): a few ulps of the
        # dot products over d_in, ~5e-6 on this CPU's torch 2.13 build
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, peft_delta(peft_adapters["r4_rslora_all"][1], 1, module, x), atol=1e-5, rtol=1e-5)


def test_pool_rejects_bad_slots(loaded_pool, peft_adapters) -> None:
    with pytest.raises(ValueError, match="slot 5 out of range"):
        loaded_pool.load(5, load_adapter("r1", peft_adapters["r1"][0]))
    with pytest.raises(ValueError, match="slot 4, which has no adapter loaded"):
        loaded_pool.prepare(make_batch([0, 4]))
    with pytest.raises(ValueError, match="pool has slots 0..4"):
        loaded_pool.prepare(make_batch([7]))
    with pytest.raises(ValueError, match="no module 'lm_head'"):
        loaded_pool.apply(0, "lm_head", torch.zeros(1, 64), torch.zeros(1, 64), make_batch([0]))


@pytest.mark.gpu
def test_mixed_batch_on_cuda_fp16_matches_peft(peft_adapters, tiny_shapes) -> None:
    pool = LoRAPool(num_slots=4, max_rank=8, num_layers=2, module_shapes=tiny_shapes, device="cuda",
                    dtype=torch.float16)
    for name, slot in SLOT_OF.items():
        pool.load(slot, load_adapter(name, peft_adapters[name][0]))
    batch = make_batch(TOKEN_SLOTS)
    batch.lora_slots = batch.lora_slots.cuda()
    x = torch.randn(len(TOKEN_SLOTS), 64)
    got = pool.apply(0, "v_proj", x.cuda().half(), torch.zeros(len(TOKEN_SLOTS), 32, device="cuda",
                                                                  dtype=torch.float16), batch)
    exp = torch.zeros(len(TOKEN_SLOTS), 32)
    for name, slot in SLOT_OF.items():
        rows = [t for t, s in enumerate(TOKEN_SLOTS) if s == slot]
        exp[rows] = peft_delta(peft_adapters[name][1], 0, "v_proj", x[rows])
    torch.testing.assert_close(got.float().cpu(), exp, atol=5e-2, rtol=2e-2)
