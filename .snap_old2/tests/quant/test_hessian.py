"""Hessian accumulation, aggregation (max | mean | single), PD repair and the on-disk store."""

from __future__ import annotations

import json

import pytest
import torch

from inlaid.quant.gptq import gptq_quantize
from inlaid.quant.hessian import (
    HessianAccumulator,
    HessianStore,
    aggregate,
    ensure_pd,
    update_aggregate,
)
from inlaid.quant.pack import pack

IN = 64


def _acts(seed: int, tokens: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, IN, generator=g) @ (torch.eye(IN) + 0.3 * torch.randn(IN, IN, generator=g)) + shift


def _h(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.double().t() @ x.double()


def test_accumulator_incremental_batches_match_definition() -> None:
    x = _acts(0, 300)
    acc = HessianAccumulator(IN)
    for chunk in (x[:7], x[7:7], x[7:200].reshape(1, 193, IN), x[200:]):  # uneven, empty and 3-D batches
        acc.add(chunk)
    assert acc.n_samples == 300
    torch.testing.assert_close(acc.hessian.double(), _h(x), rtol=1e-5, atol=1e-5)
    one = HessianAccumulator(IN)
    one.add(x)
    torch.testing.assert_close(acc.hessian, one.hessian, rtol=1e-6, atol=1e-6)


def test_accumulator_bad_input() -> None:
    acc = HessianAccumulator(IN)
    with pytest.raises(ValueError, match="no calibration rows"):
        _ = acc.hessian
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.zeros(3, IN + 1))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(torch.full((2, IN), float("nan")))


def _tasks() -> dict[str, tuple[torch.Tensor, int]]:
    out = {}
    for i, (name, n) in enumerate((("A", 50), ("B", 120), ("C", 80))):
        x = _acts(10 + i, n, shift=0.5 * i)
        out[name] = ((2.0 / n * x.t() @ x).float(), n)
    return out


def test_aggregate_max_mean_single() -> None:
    hs = _tasks()
    a, b, c = (hs[k][0] for k in "ABC")
    assert torch.equal(aggregate({"A": hs["A"]}, "max"), a)
    assert torch.equal(aggregate(hs, "max"), torch.maximum(torch.maximum(a, b), c))
    want = (50 * a.double() + 120 * b.double() + 80 * c.double()) / 250
    torch.testing.assert_close(aggregate(hs, "mean").double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(aggregate({"A": hs["A"]}, "mean"), a)
    assert torch.equal(aggregate(hs, "single", task="B"), b)
    with pytest.raises(ValueError, match="task="):
        aggregate(hs, "single", task="Z")
    with pytest.raises(ValueError, match="method"):
        aggregate(hs, "median")
    with pytest.raises(ValueError, match="no Hessians"):
        aggregate({}, "max")
    with pytest.raises(ValueError, match="shapes differ"):
        aggregate({"A": hs["A"], "X": (torch.eye(3), 5)}, "max")


def test_update_aggregate_max_is_exact() -> None:
    hs = _tasks()
    ab = update_aggregate(update_aggregate(None, hs["A"], "max"), hs["B"], "max")
    abc = update_aggregate(ab, hs["C"], "max")
    assert torch.equal(abc[0], aggregate(hs, "max")) and abc[1] == 250
    m = update_aggregate(update_aggregate(update_aggregate(None, hs["A"], "mean"), hs["B"], "mean"), hs["C"], "mean")
    torch.testing.assert_close(m[0], aggregate(hs, "mean"), rtol=1e-5, atol=1e-6)


def test_max_of_low_rank_tasks_is_repaired() -> None:
    low = {}
    for i in range(3):
        x = _acts(20 + i, 8, shift=float(i))  # rank 8 << 64 each
        low[str(i)] = ((2.0 / 8 * x.t() @ x).float(), 8)
    h = aggregate(low, "max")
    assert float(torch.linalg.eigvalsh(h.double()).min()) < 0  # element-wise max is not PSD
    fixed, damp = ensure_pd(h)
    assert damp > 0 and int(torch.linalg.cholesky_ex(fixed)[1]) == 0
    torch.testing.assert_close(fixed - h, damp * torch.eye(IN))
    q = gptq_quantize(torch.randn(16, IN), h, 4, 32)
    assert torch.isfinite(q.weight).all() and q.damp > 0
    pd, zero = ensure_pd(torch.eye(IN) * 2)
    assert zero == 0.0 and torch.equal(pd, torch.eye(IN) * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_round_trip(tmp_path, dtype: torch.dtype) -> None:
    hs = _tasks()
    store = HessianStore(tmp_path / "hs", dtype=dtype)
    for name, (h, n) in hs.items():
        store.add_task(name, {0: {"qkv": h, "down": h * 3}, 2: {"o": h + 1}}, n)
    again = HessianStore(tmp_path / "hs")  # reopen: dtype comes from the index
    assert again.dtype == dtype and again.tasks() == ["A", "B", "C"] and again.layers("B") == [0, 2]
    loaded, n = again.load("B", 0, "down")
    assert n == 120 and loaded.dtype == torch.float32
    if dtype == torch.float32:
        assert torch.equal(loaded, hs["B"][0] * 3)
    else:
        torch.testing.assert_close(loaded, hs["B"][0] * 3, rtol=1e-3, atol=1e-3 * float(loaded.abs().max()))
    index = json.loads((tmp_path / "hs" / "index.json").read_text())
    assert index["dtype"] == str(dtype).split(".")[1] and index["tasks"]["A"]["layers"]["2"]["groups"] == ["o"]
    with pytest.raises(ValueError, match="holds"):
        HessianStore(tmp_path / "hs", dtype=torch.float32 if dtype == torch.float16 else torch.float16)


def test_store_incremental_task_gives_bit_identical_weights(tmp_path) -> None:
    hs = _tasks()
    w = torch.randn(32, IN, generator=torch.Generator().manual_seed(3)) * 0.02
    store = HessianStore(tmp_path / "hs")
    for name in ("A", "B"):
        store.add_task(name, {0: {"gate_up": hs[name][0]}}, hs[name][1])
    old = store.aggregate(0, "gate_up", "max")
    first = pack(gptq_quantize(w, old, 4, 32, act_order=True))
    store.add_task("C", {0: {"gate_up": hs["C"][0]}}, hs["C"][1])
    incremental = update_aggregate((old, 170), (store.load("C", 0, "gate_up")[0], 80), "max")[0]
    from_store = store.aggregate(0, "gate_up", "max")
    at_once = aggregate(hs, "max")
    assert torch.equal(incremental, at_once) and torch.equal(from_store, at_once)
    ref = pack(gptq_quantize(w, at_once, 4, 32, act_order=True))
    for h in (incremental, from_store):
        got = pack(gptq_quantize(w, h, 4, 32, act_order=True))
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not all(torch.equal(first[k], ref[k]) for k in ref)  # adding C really changed the weights
    torch.testing.assert_close(store.aggregate(0, "gate_up", "mean"), aggregate(hs, "mean"), rtol=1e-5, atol=1e-6)
    assert torch.equal(store.aggregate(0, "gate_up", "single", task="C"), hs["C"][0])


def test_store_remove_and_bad_keys(tmp_path) -> None:
    store = HessianStore(tmp_path / "hs")
    h = torch.eye(IN)
    store.add_task("t1", {0: {"o": h}}, 10)
    store.add_task("t2", {0: {"o": h}}, 10)
    store.remove_task("t1")
    assert store.tasks() == ["t2"] and not (tmp_path / "hs" / "t1").exists()
    with pytest.raises(KeyError, match="t1"):
        store.load("t1", 0, "o")
    with pytest.raises(KeyError, match="no group 'qkv'"):
        store.load("t2", 0, "qkv")
    with pytest.raises(KeyError, match="no layer 5"):
        store.load("t2", 5, "o")
    with pytest.raises(ValueError, match="task name"):
        store.write_layer("../evil", 0, {"o": h}, 10)
    with pytest.raises(ValueError, match="groups"):
        store.write_layer("t3", 0, {"q_proj": h}, 10)
    with pytest.raises(ValueError, match="n_samples"):
        store.write_layer("t3", 0, {"o": h}, 0)
    with pytest.raises(ValueError, match="NaN"):
        store.write_layer("t3", 0, {"o": h * float("nan")}, 10)
    assert store.tasks() == ["t2"]
    leftovers = [p.name for p in (tmp_path / "hs").rglob(".*")]
    assert leftovers == []  # no temp files left behind


def test_store_corrupt_file(tmp_path) -> None:
    store = HessianStore(tmp_path / "hs")
    store.add_task("t", {1: {"down": torch.eye(IN)}}, 4)
    path = tmp_path / "hs" / "t" / "layer_00001.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        store.load("t", 1, "down")
    (tmp_path / "hs" / "index.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid Hessian store"):
        HessianStore(tmp_path / "hs")
