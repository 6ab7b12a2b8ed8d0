"""Scale-normalized aggregates (mlgptq-norm | mlgptq-normdiag | mlgptq-rowmax): PSD, one-task identity,
scale invariance per task, and the bit-identical incremental property through the store."""

from __future__ import annotations

import pytest
import torch

from inlaid.commands.quantize import _METHODS as CLI_METHODS
from inlaid.quant.hessian import (
    NORMALIZED,
    HessianStore,
    aggregate,
    aggregate_normalized,
    normalize,
)
from inlaid.quant.quantize_model import (
    METHODS,
    NORMALIZED_OF,
    QuantConfig,
    aggregate_loaded,
    requantize_layer,
)

IN = 64
NEW = list(NORMALIZED_OF)


def _task_h(seed: int, scale: float, tokens: int = 80) -> torch.Tensor:
    """A PSD task Hessian with correlated channels, per-channel scales spread over 100x, times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, IN, generator=g) @ (torch.eye(IN) + 0.5 * torch.randn(IN, IN, generator=g))
    x = x * torch.logspace(-1, 1, IN)[torch.randperm(IN, generator=g)]
    return (2.0 / tokens * x.t() @ x).float() * scale


def _tasks() -> dict[str, tuple[torch.Tensor, int]]:
    # very different scales (1e-3 .. 1e4) and sample counts
    return {"a": (_task_h(1, 1e-3), 40), "b": (_task_h(2, 1.0), 300), "c": (_task_h(3, 1e4), 90)}


def test_cli_and_config_know_the_new_methods() -> None:
    assert CLI_METHODS == METHODS
    for m in NEW:
        assert QuantConfig(method=m).method == m


@pytest.mark.parametrize("method", NEW)
def test_aggregate_is_symmetric_psd_where_the_plain_max_is_not(method: str) -> None:
    hs = _tasks()
    h32 = aggregate_loaded(hs, method)
    assert h32.dtype == torch.float32 and torch.isfinite(h32).all()
    h = h32.double()
    torch.testing.assert_close(h, h.t(), rtol=0, atol=0)
    ev = torch.linalg.eigvalsh(h)
    assert ev[0] >= -1e-6 * ev[-1], (method, float(ev[0]), float(ev[-1]))
    hmax = aggregate(hs, "max").double()
    assert torch.linalg.eigvalsh(hmax)[0] < 0  # the case the normalized aggregates repair


@pytest.mark.parametrize("method", NEW)
def test_single_task_gives_its_normalized_hessian(method: str) -> None:
    h, n = _task_h(7, 123.0), 50
    got = aggregate_loaded({"only": (h, n)}, method)
    hn = h.double() / torch.diagonal(h.double()).mean()
    want = ((hn + hn.t()) / 2).float()
    if method == "mlgptq-rowmax":  # D C D with C = D^-1 H D^-1: exact up to rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)
    assert abs(float(torch.diagonal(got).double().mean()) - 1.0) < 1e-5


@pytest.mark.parametrize("method", NEW)
def test_rescaling_one_task_or_its_sample_count_does_not_change_the_aggregate(method: str) -> None:
    hs = _tasks()
    ref = aggregate_loaded(hs, method)
    changed = dict(hs, b=(hs["b"][0] * 1000.0, 7))  # 1000x activations energy, 40x fewer samples
    torch.testing.assert_close(aggregate_loaded(changed, method), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(aggregate(changed, "mean"), aggregate(hs, "mean"), rtol=1e-2)  # the mixed mean moves


def test_norm_mean_is_the_equal_weight_mean_and_dominates_each_task_in_loewner_order() -> None:
    hs = _tasks()
    hn = {t: normalize(h) for t, (h, _) in hs.items()}
    want = sum(hn.values()) / len(hn)
    want = (want + want.t()) / 2
    torch.testing.assert_close(aggregate_normalized(hs, "norm-mean").double(), want, rtol=1e-6, atol=1e-6)
    total = sum(hn.values())
    for h in hn.values():  # sum_s Ĥ_s - Ĥ_t is PSD
        assert torch.linalg.eigvalsh(total - h)[0] >= -1e-6 * float(torch.linalg.eigvalsh(total)[-1])
    diag = aggregate_normalized(hs, "norm-diag").double()
    top = torch.stack([torch.diagonal(h) for h in hn.values()]).amax(0)
    torch.testing.assert_close(torch.diagonal(diag), torch.maximum(top, torch.diagonal(want)), rtol=1e-6, atol=1e-6)
    off = ~torch.eye(IN, dtype=torch.bool)
    torch.testing.assert_close(diag[off], want[off], rtol=1e-6, atol=1e-7)
    rowmax = aggregate_normalized(hs, "rowmax").double()
    torch.testing.assert_close(torch.diagonal(rowmax), top, rtol=1e-5, atol=1e-7)


def test_bad_input() -> None:
    hs = _tasks()
    with pytest.raises(ValueError, match="normalized method"):
        aggregate_normalized(hs, "max")
    with pytest.raises(ValueError, match="no Hessians"):
        aggregate_normalized({}, "norm-mean")
    with pytest.raises(ValueError, match="shapes differ"):
        aggregate_normalized({"a": hs["a"], "z": (torch.eye(3), 5)}, "rowmax")
    with pytest.raises(ValueError, match="n_samples"):
        aggregate_normalized({"a": (hs["a"][0], 0)}, "norm-mean")
    assert set(NORMALIZED) == set(NORMALIZED_OF.values())


def _layer_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    shapes = {"self_attn.q_proj": (IN, IN), "self_attn.k_proj": (16, IN), "self_attn.v_proj": (16, IN),
              "self_attn.o_proj": (IN, IN), "mlp.gate_proj": (64, IN), "mlp.up_proj": (64, IN),
              "mlp.down_proj": (IN, 96)}  # fmt: skip
    return {k: torch.randn(*s, generator=g) * 0.05 for k, s in shapes.items()}


def _groups(seed: int, scale: float) -> dict[str, torch.Tensor]:
    big = _task_h(seed + 100, scale, tokens=120)
    big = torch.block_diag(big, big[:32, :32])  # a 64-wide PSD Hessian for down
    return {"qkv": _task_h(seed, scale), "o": _task_h(seed + 1, scale), "gate_up": _task_h(seed + 2, scale),
            "down": big}  # fmt: skip


@pytest.mark.parametrize("method", NEW)
def test_adding_a_task_through_the_store_is_bit_identical(tmp_path, method: str) -> None:
    fp = _layer_weights()
    tasks = {"a": (_groups(1, 1e-2), 40), "b": (_groups(2, 1.0), 300), "c": (_groups(3, 50.0), 90)}
    qcfg = QuantConfig(method, 4, 32)
    inc = HessianStore(tmp_path / "inc")
    for t in ("a", "b"):
        inc.add_task(t, {0: tasks[t][0]}, tasks[t][1])
    before = requantize_layer(0, fp, inc, None, qcfg)
    inc.add_task("c", {0: tasks["c"][0]}, tasks["c"][1])  # a task added later
    added = requantize_layer(0, fp, inc, None, qcfg)
    once = HessianStore(tmp_path / "once")
    for t in ("c", "b", "a"):  # another insertion order, all at once
        once.add_task(t, {0: tasks[t][0]}, tasks[t][1])
    at_once = requantize_layer(0, fp, once, None, qcfg)
    for rel, tensors in at_once.items():
        for k, t in tensors.items():
            assert torch.equal(added[rel][k], t), (rel, k)
    assert any(not torch.equal(before[r]["qweight"], added[r]["qweight"]) for r in added)  # c changed the weights
