"""Liveness of the online re-quantization (issue 7 on GPU): the stall watchdog (injected clock), the capture
gate the worker holds around its GPU work, and dynamic.py's give-up path (poll timeout -> partial page)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import inlaid.quant.requant as requant_mod
from inlaid import LLM
from inlaid.engine.requant_hook import attach_requantizer
from inlaid.model.arch import ModelArch
from inlaid.quant.linear import PROJECTIONS
from inlaid.quant.requant import Requantizer
from inlaid.quant.requant_source import CaptureGate

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "benchmarks")]
KEYS = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture
def ckpt(ab_base, tmp_path):
    shutil.copytree(ab_base["ab"], tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _served(llm: LLM) -> dict[str, torch.Tensor]:
    return {f"{i}.{rel}.{k}": layer.get_submodule(rel)._buffers[k].clone()
            for i, layer in enumerate(llm.engine.parts.model.model.layers) for rel in PROJECTIONS for k in KEYS}


def test_a_stalled_job_fails_with_where_it_stalled_and_the_old_base_keeps_serving(ab_base, ckpt, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="inlaid.quant.requant")
    llm = LLM(model=str(ckpt), adapters={n: ab_base["ads"][n] for n in "ab"}, device="cpu", num_blocks=64)
    before, stored = _served(llm), (ckpt / "model.safetensors").read_bytes()
    now = [1000.0]
    rq = attach_requantizer(llm.engine, stall_timeout=10.0, monotonic=lambda: now[0])
    llm.engine.requantizer = rq
    release, real = threading.Event(), requant_mod.requantize_layer

    def wedged(idx, *a, **kw):  # layer 1 never returns until the test lets it (a wedged GPU call)
        if idx == 1:
            release.wait(60)
        return real(idx, *a, **kw)

    monkeypatch.setattr(requant_mod, "requantize_layer", wedged)
    llm.add_adapter("c", ab_base["ads"]["c"], calibration=str(ab_base["calib"]["c"]))
    deadline = time.monotonic() + 60
    while rq.status("c")["layers_swapped"] < 1 and time.monotonic() < deadline:
        rq.apply_ready_swaps()  # the engine's step boundary
        time.sleep(0.02)
    assert rq.status("c")["layers_swapped"] == 1 and rq.status("c")["quantization"] == "running"
    assert rq.check_stalled() == []  # no time has passed on the watchdog's clock
    now[0] += 11.0
    rq.check_stalled()  # (the watchdog thread may get there first: same effect)
    st = rq.status("c")
    assert st["quantization"] == "failed"
    assert "stalled at layer 1/2 (phase quantize)" in st["error"] and "(last: swapped layer 1/2)" in st["error"]
    rq.apply_ready_swaps()  # the rollback of layer 0
    assert all(torch.equal(v, before[k]) for k, v in _served(llm).items())
    release.set()
    assert rq.wait("c", timeout=30)
    deadline = time.monotonic() + 30
    while "c" in rq.store.tasks() and time.monotonic() < deadline:  # the worker drops them once it returns
        time.sleep(0.05)
    assert "c" not in rq.store.tasks() and rq.status("c")["quantization"] == "failed"
    assert (ckpt / "model.safetensors").read_bytes() == stored
    events = " | ".join(r.getMessage() for r in caplog.records)
    for want in ("phase calibrate begins", "calibrated layer 2/2", "quantized layer 1/2", "swapped layer 1/2"):
        assert want in events
    rq.close()


def test_stall_timeout_must_be_positive(ckpt, tiny_llama_dir):
    with pytest.raises(ValueError, match="stall_timeout"):
        Requantizer(ckpt, ModelArch.from_dir(tiny_llama_dir), stall_timeout=0)


def test_worker_holds_the_capture_lock_while_working_and_releases_it_while_resting(ab_base, ckpt, tiny_llama_dir,
                                                                                   monkeypatch):
    lock, seen = threading.Lock(), {"work": [], "rest": []}
    real = requant_mod.requantize_layer

    def layer(*a, **kw):
        seen["work"].append(lock.locked())
        return real(*a, **kw)

    def sleep(s: float) -> None:
        seen["rest"].append(lock.locked())

    monkeypatch.setattr(requant_mod, "requantize_layer", layer)
    rq = Requantizer(ckpt, ModelArch.from_dir(tiny_llama_dir), duty_cycle=0.5, sleep=sleep, capture_gate=lock)
    from inlaid.engine.requant_hook import load_samples
    from transformers import AutoTokenizer

    samples = load_samples(str(ab_base["calib"]["c"]), AutoTokenizer.from_pretrained(str(tiny_llama_dir)))
    rq.submit("c", None, samples)
    assert rq.wait("c", timeout=60) and rq.status("c")["quantization"] == "done"
    assert seen["work"] == [True, True] and seen["rest"] and not any(seen["rest"])
    assert not lock.locked()
    rq.close()


def test_capture_gate_without_a_lock_is_a_no_op_and_release_restores_the_hold():
    with CaptureGate().hold(), CaptureGate().released():
        pass
    lock = threading.Lock()
    gate = CaptureGate(lock)
    with gate.hold():
        assert lock.locked()
        with gate.released():
            assert not lock.locked()
        assert lock.locked()
    assert not lock.locked()


class _StuckLLM:
    """An AsyncLLM whose re-quantization stays 'running' (what the four GPU runs showed)."""

    def requant_statuses(self):
        return [{"name": "new", "quantization": "running", "phase": "quantize", "layers_calibrated": 2,
                 "layer": 1, "layers_swapped": 1, "num_layers": 2, "last_event": "quantized layer 1/2",
                 "error": None, "seconds": {"calibrate": 1.0}}]


def test_dynamic_gives_up_after_the_timeout_and_writes_a_partial_page(tmp_path, caplog):
    import dynamic
    from dynamic_page import merge_page

    caplog.set_level(logging.INFO, logger="dynamic")
    t0 = time.perf_counter()
    st, timed_out = asyncio.run(dynamic.await_job(_StuckLLM(), "new", timeout=0.3, poll=0.05))
    assert timed_out and time.perf_counter() - t0 < 5 and st["timed_out_after_s"] == 0.3
    assert any("gave up after" in r.getMessage() for r in caplog.records)
    args = argparse.Namespace(model="tiny", device="cpu", load_format="auto", bits=4, group_size=32,
                              method="mlgptq", calib_samples=4, max_seq_len=64, old=["a"], new="new", clients=1,
                              max_tokens=4, requant_threads=1, duty_cycle=0.5)  # fmt: skip
    load = {"status": st, "peak_mb": 1.0, "phases": {}}
    res = {"command": "x", "cost": {"full (all tasks, from scratch)": {"seconds": 12.5, "peak_mb": 3.0},
                                    "online incremental (while serving)": {"seconds": float("nan"), "phases": {}}},
           "load": {"error": "_online failed in its subprocess"},
           "incomplete": [dynamic.online_failure(load, st)], "identical": {"online": None, "offline": True}}
    page = merge_page([(args, res)])
    assert "**Incomplete run:** the online addition gave up after 0 s" in page
    assert "phase quantize" in page and "swapped 1 of 2" in page
    assert "| full (all tasks, from scratch) | 12.5 |" in page
    assert "not compared (the job did not finish)" in page and "Not measured: the online run" in page
