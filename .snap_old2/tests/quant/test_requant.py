"""Incremental re-quantization (issue 7): equivalence with quantizing from scratch, per-layer swap atomicity,
failure rollback, bad input, FIFO additions and crash recovery, on the tiny model (CPU)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inlaid import LLM, SamplingParams
from inlaid.lora.errors import IncompatibleAdapterError
from inlaid.quant import requant as requant_mod
from inlaid.quant.calibrate import CalibrationError
from inlaid.quant.hessian import HessianStore
from inlaid.quant.linear import PROJECTIONS
from inlaid.quant.quantize_model import REPORT_NAME, quantize_model
from inlaid.quant.requant import TASKS_KEY, RequantError, Requantizer, committed_tasks

KEYS = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, ab_base, tmp_path_factory):
    """The 4-bit g32 MLGPTQ base for {a, b} (``ab_base``, kept pristine), and the from-scratch {a, b, c} one."""
    calib, ads = ab_base["calib"], ab_base["ads"]
    abc = tmp_path_factory.mktemp("requant") / "abc"
    quantize_model(str(tiny_llama_dir), ads, calib, "mlgptq", 4, 32, abc)
    return {"ab": ab_base["ab"], "abc": abc, "calib": calib, "ads": ads, "base": tiny_llama_dir}


@pytest.fixture
def ckpt(setup, tmp_path):
    """A fresh copy of the {a, b} checkpoint (each test mutates its own)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(setup["ab"], dst)
    return dst


def _served(llm: LLM) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(llm.engine.parts.model.model.layers):
        for rel in PROJECTIONS:
            lin = layer.get_submodule(rel)
            out.update({f"model.layers.{i}.{rel}.{k}": lin._buffers[k] for k in KEYS})
    return out


def _llm(ckpt, setup, names="ab") -> LLM:
    return LLM(model=str(ckpt), adapters={n: setup["ads"][n] for n in names}, device="cpu", num_blocks=64)


def test_added_task_is_bit_identical_to_quantizing_all_tasks_from_scratch(setup, ckpt):
    llm = _llm(ckpt, setup)
    before = {k: t.clone() for k, t in _served(llm).items()}
    ptrs = {k: t.data_ptr() for k, t in _served(llm).items()}
    llm.add_adapter("c", setup["ads"]["c"], calibration=str(setup["calib"]["c"]))
    status = llm.wait_requant("c", timeout=120)
    assert status["quantization"] == "done", status
    assert status["layers_swapped"] == status["num_layers"] == 2 and status["tasks"] == ["a", "b", "c"]
    want = load_file(str(setup["abc"] / "model.safetensors"))
    served = _served(llm)
    for key, t in served.items():
        assert torch.equal(t, want[key]), key
    assert any(not torch.equal(before[k], served[k]) for k in served if k.endswith("qweight"))
    # copied into the served buffers (same storage: captured CUDA graphs stay valid), not re-allocated
    assert {k: t.data_ptr() for k, t in served.items()} == ptrs
    # the stored checkpoint is the from-scratch one, tensor for tensor, and records its tasks
    stored = load_file(str(ckpt / "model.safetensors"))
    assert set(stored) == set(want)
    assert all(torch.equal(stored[k], want[k]) for k in want)
    assert committed_tasks(ckpt, json.loads((ckpt / REPORT_NAME).read_text())) == ["a", "b", "c"]
    assert json.loads((ckpt / REPORT_NAME).read_text())["config"]["calib_tasks"] == ["a", "b", "c"]
    assert HessianStore(ckpt / "hessians").tasks() == ["a", "b", "c"]
    # the new adapter is served and greedy outputs match a server started on the from-scratch checkpoint
    params = SamplingParams(max_tokens=5, temperature=0.0)
    got = [o.token_ids for o in llm.generate(["Hello world", "Translate: cat"], params, adapter=["c", "a"])]
    fresh = _llm(setup["abc"], setup, "abc")
    assert got == [o.token_ids for o in fresh.generate(["Hello world", "Translate: cat"], params, adapter=["c", "a"])]
    # a restart keeps the new base and its store (nothing is "uncommitted")
    rq = Requantizer(ckpt, llm.engine.parts.arch)
    assert rq.committed_tasks() == ["a", "b", "c"] and rq.store.tasks() == ["a", "b", "c"]


def test_forwards_during_requant_see_each_layer_all_old_or_all_new(setup, ckpt):
    llm = _llm(ckpt, setup)
    model = llm.engine.parts.model
    old = {i: _layer_state(model, i) for i in range(2)}
    seen: list[tuple[int, tuple]] = []
    hooks = [model.model.layers[i].register_forward_pre_hook(
        lambda mod, args, i=i: seen.append((i, _layer_state(model, i)))) for i in range(2)]  # fmt: skip
    llm.add_adapter("c", setup["ads"]["c"], calibration=str(setup["calib"]["c"]))
    params = SamplingParams(max_tokens=3, temperature=0.0)
    rq = llm.engine.requantizer
    deadline = time.monotonic() + 180  # a bound in time, not in steps: the worker's pace (duty cycle, CPU load) varies
    while time.monotonic() < deadline:  # engine steps race the worker; swaps land only at step boundaries
        llm.generate(["Hello world"], params, adapter="a")
        if rq.status("c")["quantization"] in ("done", "failed"):
            break
    assert rq.status("c")["quantization"] == "done"
    llm.generate(["Hello world"], params, adapter="c")
    for h in hooks:
        h.remove()
    new = {i: _layer_state(model, i) for i in range(2)}
    assert all(old[i] != new[i] for i in range(2))
    for i, ptrs in seen:
        assert ptrs in (old[i], new[i]), f"layer {i}: a forward saw a mix of old and new linears"
    assert any(p == new[i] for i, p in seen) and any(p == old[i] for i, p in seen)


def _layer_state(model, i):
    """What layer ``i`` holds now, per linear and tensor (contents: swaps copy into the same storage)."""
    layer = model.model.layers[i]
    return tuple(hash(layer.get_submodule(rel)._buffers[k].numpy().tobytes()) for rel in PROJECTIONS for k in KEYS)


@pytest.mark.parametrize("where", ["quantize", "persist"])
def test_a_failure_keeps_the_old_base_serving_and_stored(setup, ckpt, monkeypatch, where):
    llm = _llm(ckpt, setup)
    before = {k: v.clone() for k, v in _served(llm).items()}
    stored = (ckpt / "model.safetensors").read_bytes()
    real = requant_mod.requantize_layer

    def flaky(idx, *args, **kw):
        if where == "quantize" and idx == 1:
            raise RuntimeError("injected failure at layer 1")
        return real(idx, *args, **kw)

    def bad_persist(self, job):
        raise OSError("injected: disk full")

    monkeypatch.setattr(requant_mod, "requantize_layer", flaky)
    if where == "persist":
        monkeypatch.setattr(Requantizer, "_persist", bad_persist)
    llm.add_adapter("c", setup["ads"]["c"], calibration=str(setup["calib"]["c"]))
    status = llm.wait_requant("c", timeout=120)
    assert status["quantization"] == "failed"
    assert ("injected failure at layer 1" if where == "quantize" else "disk full") in status["error"]
    served = _served(llm)
    assert all(torch.equal(before[k], served[k]) for k in before)  # layer 0 was swapped, then rolled back
    assert (ckpt / "model.safetensors").read_bytes() == stored
    assert HessianStore(ckpt / "hessians").tasks() == ["a", "b"]
    out = llm.generate(["Hello world"], SamplingParams(max_tokens=3, temperature=0.0), adapter="c")
    assert len(out[0].token_ids) == 3  # the adapter stays servable on the old base


def test_bad_input_is_a_clear_error_and_changes_nothing(setup, ckpt, tmp_path, tiny_llama_dir, calib_rows):
    llm = _llm(ckpt, setup)
    ad = setup["ads"]["c"]
    with pytest.raises(CalibrationError, match="does not exist"):
        llm.add_adapter("c", ad, calibration=str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationError, match="no usable examples"):
        llm.add_adapter("c", ad, calibration=str(empty))
    with pytest.raises(CalibrationError, match="samples are empty"):
        llm.add_adapter("c", ad, calibration=[])
    foreign = tmp_path / "foreign"  # adapter "a" as if trained for a base with another hidden size
    shutil.copytree(setup["ads"]["a"], foreign)
    tensors = load_file(str(foreign / "adapter_model.safetensors"))
    tensors = {k: torch.cat([t, t], 1) if "lora_A" in k else t for k, t in tensors.items()}
    save_file(tensors, str(foreign / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match="another base"):
        llm.add_adapter("f", str(foreign), calibration=calib_rows(0))
    with pytest.raises(RequantError, match="already part of the quantized base"):
        llm.engine.requantizer.submit("a", None, [[1, 2, 3]])
    assert "c" not in llm.engine.list_adapters() and "f" not in llm.engine.list_adapters()
    llm.add_adapter("c", ad, calibration=calib_rows(2))
    with pytest.raises(ValueError, match="already registered|already being added"):
        llm.add_adapter("c", ad, calibration=calib_rows(2))
    assert llm.wait_requant("c", timeout=120)["quantization"] == "done"
    # a full-precision base has no quantized weights to re-quantize
    fp = LLM(model=str(tiny_llama_dir), device="cpu", num_blocks=16)
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        fp.add_adapter("c", ad, calibration=calib_rows(0))
    assert "c" not in fp.engine.list_adapters()


def test_two_additions_queue_in_order_and_compose(setup, ckpt, tiny_adapters, calib_rows):
    llm = _llm(ckpt, setup)
    llm.add_adapter("c", setup["ads"]["c"], calibration=str(setup["calib"]["c"]))
    llm.add_adapter("d", str(tiny_adapters["a"]), calibration=calib_rows(5))
    assert llm.adapter_status("d")["quantization"] in ("pending", "running")
    llm.wait_requant(timeout=240)
    c, d = llm.adapter_status("c"), llm.adapter_status("d")
    assert c["quantization"] == d["quantization"] == "done"
    assert d["tasks"] == ["a", "b", "c", "d"] and d["started_at"] >= c["finished_at"]
    # composed: the served and the stored weights agree, and both moved past the {a, b, c} base
    stored = load_file(str(ckpt / "model.safetensors"))
    abc = load_file(str(setup["abc"] / "model.safetensors"))
    served = _served(llm)
    assert all(torch.equal(t, stored[k]) for k, t in served.items())
    assert any(not torch.equal(t, abc[k]) for k, t in served.items() if k.endswith("qweight"))
    assert HessianStore(ckpt / "hessians").tasks() == ["a", "b", "c", "d"]
    assert llm.adapter_status("a")["quantization"] == "none"  # an adapter added without calibration


def test_restart_mid_requant_removes_uncommitted_hessians(setup, ckpt):
    """A crash after the new task's Hessians were written but before the commit: old checkpoint, clean store."""
    llm = _llm(ckpt, setup)
    arch = llm.engine.parts.arch
    stored = (ckpt / "model.safetensors").read_bytes()
    store = HessianStore(ckpt / "hessians")
    h = store.load("a", 0, "qkv")[0]
    store.write_layer("c", 0, {"qkv": h}, 10)  # what a killed job leaves behind
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert TASKS_KEY not in (f.metadata() or {})  # the original checkpoint: tasks come from the report
    rq = Requantizer(ckpt, arch)
    assert rq.committed_tasks() == ["a", "b"] and rq.store.tasks() == ["a", "b"]
    assert (ckpt / "model.safetensors").read_bytes() == stored


def test_worker_thread_limits_and_bad_options(setup, ckpt):
    llm = _llm(ckpt, setup)
    arch = llm.engine.parts.arch
    with pytest.raises(ValueError, match="duty_cycle"):
        Requantizer(ckpt, arch, duty_cycle=0)
    with pytest.raises(RequantError, match="quantize_report.json"):
        bad = ckpt.parent / "noreport"
        shutil.copytree(ckpt, bad)
        (bad / REPORT_NAME).unlink()
        Requantizer(bad, arch)
    rq = Requantizer(ckpt, arch, num_threads=1, duty_cycle=0.5)
    seen = []
    real = requant_mod.requantize_layer

    def spy(*a, **kw):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*a, **kw)

    requant_mod.requantize_layer = spy
    try:
        rq.submit("c", None, [[5, 6, 7, 8, 9]] * 3)  # no model: only the stored checkpoint is updated
        assert rq.wait("c", timeout=120) and rq.status("c")["quantization"] == "done"
    finally:
        requant_mod.requantize_layer = real
    assert seen and all(s == ("inlaid-requant", 1) for s in seen)
    assert torch.get_num_threads() >= 1 and rq.committed_tasks() == ["a", "b", "c"]
    rq.close()


def test_adding_a_task_to_a_gptq_mixed_base_equals_quantizing_all_tasks_at_once(setup, tmp_path):
    """The CLI default method (the sample-weighted mean) keeps the bit-identity guarantee of task addition."""
    root, ads, calib = tmp_path, setup["ads"], setup["calib"]
    quantize_model(str(setup["base"]), {k: ads[k] for k in "ab"}, {k: calib[k] for k in "ab"}, "gptq-mixed", 4, 32,
                   root / "ab")  # fmt: skip
    quantize_model(str(setup["base"]), ads, calib, "gptq-mixed", 4, 32, root / "abc")
    llm = _llm(root / "ab", setup)
    llm.add_adapter("c", ads["c"], calibration=str(calib["c"]))
    assert llm.wait_requant("c", timeout=120)["quantization"] == "done"
    want = load_file(str(root / "abc" / "model.safetensors"))
    for key, t in _served(llm).items():
        assert torch.equal(t, want[key]), key
    mlgptq = load_file(str(setup["abc"] / "model.safetensors"))  # the same tasks under the max: a different base
    assert any(not torch.equal(want[k], mlgptq[k]) for k in want if k.endswith("qweight"))
