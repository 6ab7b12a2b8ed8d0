"""LoRAPool's sync-free Triton decode path (fused q/k/v and gate/up shrink) vs its SGMV path.

Runs the Triton kernels under ``TRITON_INTERPRET=1`` on CPU (compiled on CUDA). Two pools hold the same
adapters (different ranks, one targeting only some modules); every projection's delta of a decode batch with
mixed slots (and -1) must match, and the fused group's shrink must run once per layer.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first `import triton`
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
if not HAS_CUDA and type(sys.modules["triton"].language.standard.cdiv).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run tests/kernels in its own process",
                allow_module_level=True)

lt = importlib.import_module("inlaid.kernels.lora_sgmv_triton")
if not HAS_CUDA and not lt.kernels_interpreted():
    lt = importlib.reload(lt)
pool_mod = importlib.reload(importlib.import_module("inlaid.lora.pool"))  # bind the (re)loaded kernels

from inlaid.lora.synthetic import random_adapter  # noqa: E402
from inlaid.model.batch import ForwardBatch  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
          "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}


def _batch(slots: list[int]) -> ForwardBatch:
    t = len(slots)
    ar = torch.arange(t, device=DEV)
    return ForwardBatch(ar, ar, ar, torch.arange(t + 1, device=DEV, dtype=torch.int32),
                        torch.ones(t, device=DEV, dtype=torch.int32), torch.zeros(t, 1, device=DEV, dtype=torch.int32),
                        torch.tensor(slots, device=DEV), ar, max_query_len=1, max_seq_len=1)


def _pools(seed: int, slots: tuple[int, int]) -> list:
    """The device-path and SGMV-path pools (fp32), each holding adapter "a" (rank 4, all targets) in ``slots[0]``
    and "b" (rank 8, q/v/down only) in ``slots[1]``; adapter seeds ``seed`` and ``seed + 1``."""
    adapters = [random_adapter("a", SHAPES, 2, 4, seed=seed, std=0.3),
                random_adapter("b", SHAPES, 2, 8, targets=["q_proj", "v_proj", "down_proj"], seed=seed + 1, std=0.3)]
    pools = [pool_mod.LoRAPool(3, 8, 2, SHAPES, DEV, torch.float32, triton_decode=flag) for flag in (True, False)]
    for p in pools:
        for slot, adapter in zip(slots, adapters):
            p.load(slot, adapter)
    return pools


def test_device_path_matches_sgmv_and_fuses_group_shrinks(monkeypatch: pytest.MonkeyPatch) -> None:
    pools = _pools(seed=1, slots=(0, 2))
    assert pools[0].triton_decode and not pools[1].triton_decode
    assert pools[0].a["k_proj"].data_ptr() == pools[0].a["q_proj"].data_ptr() + 8 * 32 * 4  # views of one buffer
    calls = []
    real = pool_mod.lt.lora_shrink_partials
    monkeypatch.setattr(pool_mod.lt, "lora_shrink_partials", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    slots = [0, -1, 2, 2, 0]
    batches = [_batch(slots), _batch(slots)]
    for p, b in zip(pools, batches):
        p.prepare(b)
    assert isinstance(batches[0].lora_meta, pool_mod.DecodeMeta)
    g = torch.Generator().manual_seed(0)
    for layer in (1,):
        xs = {i: torch.randn(len(slots), i, generator=g).to(DEV) for i in (32, 48)}
        for mod, (i, o) in SHAPES.items():
            base = torch.randn(len(slots), o, generator=g).to(DEV)
            got = pools[0].apply(layer, mod, xs[i], base.clone(), batches[0])
            want = pools[1].apply(layer, mod, xs[i], base.clone(), batches[1])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert torch.equal(got[1], base[1])  # slot -1 row untouched
    # one shrink for q/k/v, one for gate/up, one each for o and down
    assert len(calls) == 4 and calls[0] == (3, 24, 32), calls


def test_apply_group_fuses_the_expands_and_matches_sgmv(monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v and gate/up through ``apply_group``: one shrink and one expand launch per group on the device path,
    the same deltas as the SGMV path's per-module ``apply`` (adapter "b" targets only q/v of the group)."""
    pools = _pools(seed=3, slots=(1, 2))
    launches = []
    for name in ("lora_shrink_partials", "lora_expand", "lora_expand_group"):
        real = getattr(pool_mod.lt, name)
        monkeypatch.setattr(pool_mod.lt, name, lambda *a, _n=name, _r=real, **k: launches.append(_n) or _r(*a, **k))
    slots = [2, 1, -1, 1]
    batches = [_batch(slots), _batch(slots)]
    g = torch.Generator().manual_seed(5)
    for group, d_in in ((("q_proj", "k_proj", "v_proj"), 32), (("gate_proj", "up_proj"), 32)):
        x = torch.randn(len(slots), d_in, generator=g).to(DEV)
        base = [torch.randn(len(slots), SHAPES[m][1], generator=g).to(DEV) for m in group]
        got = pools[0].apply_group(0, group, x, [b.clone() for b in base], batches[0])
        want = pools[1].apply_group(0, group, x, [b.clone() for b in base], batches[1])
        for gm, wm, b in zip(got, want, base):
            torch.testing.assert_close(gm, wm, atol=1e-4, rtol=1e-4)
            assert torch.equal(gm[2], b[2])  # slot -1 row untouched
    assert launches == ["lora_shrink_partials", "lora_expand_group"] * 2, launches


def test_expand_group_rejects_bad_members() -> None:
    b = torch.zeros(2, 16, 4, device=DEV)
    part = torch.zeros(1, 3, 8, device=DEV)
    sc, out, slots = torch.zeros(2, device=DEV), torch.zeros(3, 16, device=DEV), torch.zeros(3, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="2 or 3"):
        lt.lora_expand_group(part, [b], [sc], slots, [out])
    with pytest.raises(ValueError, match="partials"):
        lt.lora_expand_group(torch.zeros(1, 3, 4, device=DEV), [b, b], [sc, sc], slots, [out, out])
    with pytest.raises(ValueError, match="must be"):
        lt.lora_expand_group(part, [b, b], [sc, sc], slots, [out, torch.zeros(3, 8, device=DEV)])


@pytest.mark.gpu
def test_prefill_segment_kernel_matches_torch_sgmv() -> None:
    """A prefill batch (is_decode_only False): the pool's segmented Triton path equals its torch SGMV loop."""
    adapters = [random_adapter("a", SHAPES, 2, 4, seed=1, std=0.3),
                random_adapter("b", SHAPES, 2, 8, targets=["q_proj", "v_proj", "down_proj"], seed=2, std=0.3)]
    pools = [pool_mod.LoRAPool(3, 8, 2, SHAPES, DEV, torch.float16) for _ in range(2)]
    pools[1].triton_prefill = False
    for p in pools:
        p.load(0, adapters[0])
        p.load(2, adapters[1])
    assert pools[0].triton_prefill
    slots = [0] * 40 + [-1] * 5 + [2] * 37 + [0] * 3
    batches = []
    for p in pools:
        b = _batch(slots)
        b.max_query_len = len(slots)  # a prefill: not decode-only
        p.prepare(b)
        batches.append(b)
    g = torch.Generator().manual_seed(0)
    xs = {i: torch.randn(len(slots), i, generator=g).to(DEV, torch.float16) for i in (32, 48)}
    for mod, (i, o) in SHAPES.items():
        base = torch.randn(len(slots), o, generator=g).to(DEV, torch.float16)
        got = pools[0].apply(1, mod, xs[i], base.clone(), batches[0])
        want = pools[1].apply(1, mod, xs[i], base.clone(), batches[1])
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
        assert torch.equal(got[40:45], base[40:45])


def test_apply_group_takes_the_shrink_a_base_launch_ran_and_shrinks_itself_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``offer_shrink`` hands the group's shrink to the base launch; ``apply_group`` uses the partials the launch
    set (no shrink launch of its own) and runs its own shrink when the launch left them None; ``apply`` does the
    same for a projection outside the groups (o_proj). A pool without adapters, a group that is not one fused
    group and a group member on its own get no offer."""
    pools = _pools(seed=7, slots=(0, 1))
    launches = []
    real = pool_mod.lt.lora_shrink_partials
    monkeypatch.setattr(pool_mod.lt, "lora_shrink_partials", lambda *a, **k: launches.append(1) or real(*a, **k))
    slots = [1, 0]
    g = torch.Generator().manual_seed(2)
    group = ("q_proj", "k_proj", "v_proj")
    x = torch.randn(len(slots), 32, generator=g).to(DEV)
    base = [torch.randn(len(slots), SHAPES[m][1], generator=g).to(DEV) for m in group]
    want = pools[1].apply_group(1, group, x, [b.clone() for b in base], _batch(slots))
    for base_ran_it in (True, False):
        batch = _batch(slots)
        offer = pools[0].offer_shrink(1, group, x, batch)
        assert offer is not None and offer.a_stack.shape == (3, 24, 32)
        if base_ran_it:  # what w4a16_tcl_group does at M = 1 (tests/kernels/test_w4a16_tcl.py)
            offer.partials = real(x, offer.a_stack, offer.token_slots)
        launches.clear()
        got = pools[0].apply_group(1, group, x, [b.clone() for b in base], batch)
        assert len(launches) == (0 if base_ran_it else 1)
        for gm, wm in zip(got, want):
            torch.testing.assert_close(gm, wm, atol=1e-4, rtol=1e-4)
    empty = pool_mod.LoRAPool(3, 8, 2, SHAPES, DEV, torch.float32, triton_decode=True)
    assert empty.offer_shrink(1, group, x, _batch(slots)) is None  # no adapter loaded: nothing to shrink
    assert pools[0].offer_shrink(1, ("q_proj",), x, _batch(slots)) is None  # a group member on its own
    # a projection outside the groups (o_proj): apply takes the partials the same way
    base_o = torch.randn(len(slots), SHAPES["o_proj"][1], generator=g).to(DEV)
    want_o = pools[1].apply(1, "o_proj", x, base_o.clone(), _batch(slots))
    for base_ran_it in (True, False):
        batch = _batch(slots)
        offer = pools[0].offer_shrink(1, ("o_proj",), x, batch)
        assert offer is not None and offer.a_stack.shape == (3, 8, 32)
        if base_ran_it:
            offer.partials = real(x, offer.a_stack, offer.token_slots)
        launches.clear()
        got_o = pools[0].apply(1, "o_proj", x, base_o.clone(), batch)
        assert len(launches) == (0 if base_ran_it else 1)
        torch.testing.assert_close(got_o, want_o, atol=1e-4, rtol=1e-4)
    assert pools[0].offer_shrink(1, ("q_proj", "v_proj"), x, _batch(slots)) is None  # not one fused group


def _w4_parent(shapes: dict, seed: int):
    """A module holding one tensor-core-layout W4 ``ParallelLinear`` (fp16, CUDA, group 128) per ``shapes`` entry."""
    from torch import nn

    from inlaid.kernels import w4_layout
    from inlaid.model.layers import ParallelLinear
    from inlaid.quant.linear import GPTQLinearMethod, _install

    g = torch.Generator().manual_seed(seed)
    parent = nn.Module()
    for name, (k, n) in shapes.items():
        layer = ParallelLinear(k, n, False, "column", torch.device("cuda"), torch.float16,
                               quant_method=GPTQLinearMethod(4, 128))
        zeros = w4_layout.pack4_rows(torch.randint(0, 16, (n, k // 128), generator=g)).t().contiguous()
        _install(layer, {"qweight": w4_layout.pack4_rows(torch.randint(0, 16, (k, n), generator=g)).cuda(),
                         "qzeros": zeros.cuda(), "scales": (torch.rand(k // 128, n, generator=g) * 0.02 + 1e-3).half().cuda(),
                         "g_idx": (torch.arange(k) // 128).to(torch.int32).cuda()})
        layer.quant_method.finalize(layer, torch.float16)
        assert layer._buffers["w4_qweight"] is layer._buffers["qweight"]  # tensor-core words (serving_layout)
        setattr(parent, name, layer)
    return parent


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_down_proj_computes_the_swiglu_product_and_its_shrink_in_one_launch(monkeypatch) -> None:
    """``_project(..., gate, up=up)`` on a tensor-core W4 down_proj at M = 1: no ``silu_mul`` launch, the pool's
    shrink runs in the W4 launch at rank 16; at rank 288 (> ``SHRINK_MAX_ROWS``) the pool shrinks the product the
    launch stored. Both equal the base on ``silu_mul(gate, up)`` plus the SGMV pool's delta."""
    from inlaid.kernels import silu_mul as sm
    from inlaid.model.llama import _project

    k, shapes = 512, {"down_proj": (512, 256)}
    parent = _w4_parent(shapes, seed=9)
    real_shrink, real_silu = pool_mod.lt.lora_shrink_partials, sm.silu_mul_triton
    for rank, fused in ((16, True), (288, False)):
        adapter = random_adapter("a", {"down_proj": (512, 256)}, 1, rank, seed=rank, std=0.05)
        pools = [pool_mod.LoRAPool(2, rank, 1, shapes, "cuda", torch.float16, triton_decode=flag)
                 for flag in (True, False)]
        for p in pools:
            p.load(1, adapter)
        gate = torch.randn(1, k, device="cuda", dtype=torch.float16) * 3
        up = torch.randn(1, k, device="cuda", dtype=torch.float16)
        calls = []
        monkeypatch.setattr(pool_mod.lt, "lora_shrink_partials",
                            lambda *a, **kw: calls.append("shrink") or real_shrink(*a, **kw))
        monkeypatch.setattr(sm, "silu_mul_triton", lambda *a, **kw: calls.append("silu") or real_silu(*a, **kw))
        got = _project(parent, "down_proj", 0, gate, _batch([1]), pools[0], up=up)
        assert calls == ([] if fused else ["shrink"])
        monkeypatch.undo()
        prod = sm.silu_mul(gate, up)
        base = parent.down_proj(prod)
        want = pools[1].apply(0, "down_proj", prod, base.clone(), _batch([1]))
        assert (want.float() - base.float()).abs().max() > 1e-3  # the delta counts
        torch.testing.assert_close(got.float(), want.float(), atol=5e-3, rtol=5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_projections_run_the_shrink_in_the_m1_w4_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode token through ``llama._project_group`` (q/k/v) and ``_project`` (o_proj) on tensor-core-layout W4
    weights: the M = 1 launches run the pool's shrinks (no ``lora_shrink_partials`` launch), and the results equal
    the base plus the SGMV pool's deltas; at rank 96 (288 q/k/v rows > ``SHRINK_MAX_ROWS``) the pool shrinks q/k/v
    itself (o_proj's 96 rows are still taken, in two rounds), with the same results."""
    from inlaid.model.llama import _project, _project_group

    k, shapes = 256, {"q_proj": (256, 128), "k_proj": (256, 64), "v_proj": (256, 64), "o_proj": (256, 256)}
    parent = _w4_parent(shapes, seed=4)
    names = ("q_proj", "k_proj", "v_proj")
    real = pool_mod.lt.lora_shrink_partials
    for rank, fused in ((16, True), (96, False)):
        adapter = random_adapter("a", shapes, 1, rank, seed=rank, std=0.05)
        pools = [pool_mod.LoRAPool(2, rank, 1, shapes, "cuda", torch.float16, triton_decode=flag)
                 for flag in (True, False)]
        for p in pools:
            p.load(1, adapter)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        shrinks = []
        monkeypatch.setattr(pool_mod.lt, "lora_shrink_partials", lambda *a, **kw: shrinks.append(1) or real(*a, **kw))
        got = _project_group(parent, names, 0, x, _batch([1]), pools[0])
        got.append(_project(parent, "o_proj", 0, x, _batch([1]), pools[0]))  # 16 / 96 rows: taken both times
        assert len(shrinks) == (0 if fused else 1)
        base = [getattr(parent, n)(x) for n in (*names, "o_proj")]
        want = [pools[1].apply(0, n, x, b.clone(), _batch([1])) for n, b in zip((*names, "o_proj"), base)]
        for gm, wm, b in zip(got, want, base):
            assert (wm.float() - b.float()).abs().max() > 1e-3  # the deltas count
            torch.testing.assert_close(gm.float(), wm.float(), atol=5e-3, rtol=5e-3)
