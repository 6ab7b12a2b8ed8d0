"""Dynamic task addition over HTTP (real engine, tiny 4-bit base, loopback uvicorn): load with calibration
while requests stream, status endpoint, Prometheus gauges, bad input, and ``inlaid add-adapter``."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import ServerThread, parse_sse, wait_for
from requant_gate import hold_requant_layers

from inlaid.cli import main
from inlaid.config import EngineConfig
from inlaid.engine.async_llm import AsyncLLM
from inlaid.quant.quantize_model import quantize_model
from inlaid.server.app import build_app

ROWS = [{"prompt": f"Translate: cat {i}", "completion": "chat " * (i % 3 + 1)} for i in range(6)]


@pytest.fixture(scope="module")
def srv(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    calib = root / "a.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ads = {n: str(tiny_adapters[n]) for n in "abc"}
    quantize_model(str(tiny_llama_dir), {"a": ads["a"]}, {"a": str(calib)}, "mlgptq", 4, 32, root / "q")
    config = EngineConfig.from_kwargs(model=str(root / "q"), device="cpu", num_blocks=128, requant_duty_cycle=0.75)
    llm = AsyncLLM.from_config(config, adapters={"a": ads["a"]})
    with ServerThread(build_app(llm)) as server:
        server.llm, server.ads, server.root = llm, ads, root
        with httpx.Client(base_url=server.url, timeout=60) as client:
            server.client = client
            yield server


def _status(srv, name):
    return srv.client.get(f"/v1/adapters/{name}").json()


def test_streams_all_complete_while_a_task_is_added(srv):
    assert _status(srv, "a")["duty_cycle"] == 0.75  # the configured bound, before any re-quantization
    assert "inlaid_requant_duty_cycle 0.75" in srv.client.get("/metrics").text
    results: list[str] = []
    stop = threading.Event()

    def stream(model: str) -> None:
        for _ in range(40):  # bounded: at most 40 requests per client
            body = {"model": model, "prompt": "Hello world", "max_tokens": 12, "stream": True, "ignore_eos": True}
            results.append(srv.client.post("/v1/completions", json=body).text)
            if stop.is_set():
                return

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("a", srv.llm.model_name, "a")]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) >= 1, timeout=30, what="first stream")
    body = {"lora_name": "b", "lora_path": srv.ads["b"], "calibration_samples": ROWS}
    r = srv.client.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200 and "Re-quantization queued" in r.text, r.text
    # servable at once, on the old base
    r = srv.client.post("/v1/completions", json={"model": "b", "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200, r.text
    seen = {_status(srv, "b")["quantization"]}
    wait_for(lambda: seen.add(_status(srv, "b")["quantization"]) or "done" in seen or "failed" in seen,
             timeout=120, what="re-quantization")  # fmt: skip
    n_during = len(results)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    status = _status(srv, "b")
    assert status["quantization"] == "done", status
    assert status["tasks"] == ["a", "b"] and status["layers_swapped"] == status["num_layers"] == 2
    assert status["loaded"] and status["base_tasks"] == ["a", "b"] and status["seconds"]["total"] > 0
    assert status["duty_cycle"] == 0.75 and status["requant_threads"] is None
    assert len(results) >= n_during >= 1
    for text in results:  # every request completed normally
        events = parse_sse(text)[:-1]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events) >= 1
    metrics = srv.client.get("/metrics").text
    assert 'inlaid_requant_jobs{state="done"} 1.0' in metrics
    assert 'inlaid_requant_layers_swapped{adapter="b"} 2.0' in metrics
    assert 'inlaid_requant_phase_seconds{adapter="b",phase="quantize"}' in metrics
    assert "inlaid_requant_duty_cycle 0.75" in metrics
    assert _status(srv, "a")["quantization"] == "none"


def test_bad_additions_are_clear_errors(srv):
    post = srv.client.post
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": srv.ads["c"],
                                            "calibration_path": str(srv.root / "missing.jsonl")})  # fmt: skip
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": srv.ads["c"],
                                            "calibration_path": "p", "calibration_samples": ROWS})  # fmt: skip
    assert r.status_code == 400 and "not both" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": srv.ads["c"], "calibration_samples": []})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": srv.ads["c"],
                                            "calibration_samples": [{"prompt": 3}]})  # fmt: skip
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    assert srv.client.get("/v1/adapters/x").status_code == 404
    assert "x" not in [m["id"] for m in srv.client.get("/v1/models").json()["data"]]
    assert post("/v1/completions", json={"model": "a", "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_cli_add_adapter_waits_for_the_new_base(srv, tmp_path, capsys):
    calib = tmp_path / "c.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    t0 = time.monotonic()
    code = main(["add-adapter", "--server", srv.url, "--name", "c", "--path", srv.ads["c"], "--calib", str(calib),
                 "--wait", "--timeout", "120"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    status = json.loads(out[-1])
    assert status["quantization"] == "done" and "c" in status["tasks"] and time.monotonic() - t0 < 120
    code = main(["add-adapter", "--server", srv.url, "--name", "c", "--path", srv.ads["c"]])
    assert code == 2 and "already registered" in capsys.readouterr().err
    assert main(["add-adapter", "--server", srv.url, "--name", "z", "--path", "p", "--calib", str(tmp_path / "no")]) == 2


def test_more_bad_additions_leave_the_old_base_serving(srv, tmp_path):
    """Empty calibration file and an adapter for another base: 400 naming the problem, nothing registered,
    no job, the base unchanged and still serving."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    post = srv.client.post
    base_before = (srv.root / "q" / "model.safetensors").read_bytes()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": srv.ads["c"],
                                            "calibration_path": str(empty)})  # fmt: skip
    assert r.status_code == 400 and "no usable examples" in r.json()["error"]["message"], r.text
    foreign = tmp_path / "foreign"  # adapter "a" as if trained for a base with twice the hidden size
    shutil.copytree(srv.ads["a"], foreign)
    tensors = load_file(str(foreign / "adapter_model.safetensors"))
    save_file({k: torch.cat([t, t], 1) if "lora_A" in k else t for k, t in tensors.items()},
              str(foreign / "adapter_model.safetensors"))  # fmt: skip
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(foreign), "calibration_samples": ROWS})
    assert r.status_code == 400 and "another base" in r.json()["error"]["message"], r.text
    assert srv.client.get("/v1/adapters/x").status_code == 404
    assert "x" not in [m["id"] for m in srv.client.get("/v1/models").json()["data"]]
    assert (srv.root / "q" / "model.safetensors").read_bytes() == base_before
    assert post("/v1/completions", json={"model": "a", "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_addition_while_one_is_running(srv, monkeypatch):
    """While task y is being re-quantized (held at its first layer): y again is a 400, z queues behind it, and
    requests keep completing; once released both finish in order and the base holds both."""
    gate, entered = hold_requant_layers(monkeypatch)
    post = srv.client.post
    r = post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": srv.ads["b"], "calibration_samples": ROWS})
    assert r.status_code == 200, r.text
    assert entered.wait(60) and _status(srv, "y")["quantization"] == "running"
    r = post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": srv.ads["b"], "calibration_samples": ROWS})
    assert r.status_code == 400 and "already" in r.json()["error"]["message"], r.text
    r = post("/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": srv.ads["c"], "calibration_samples": ROWS})
    assert r.status_code == 200 and _status(srv, "z")["quantization"] == "pending", r.text
    for model in ("a", "y", "z"):  # all servable while the job is held
        r = post("/v1/completions", json={"model": model, "prompt": "ok", "max_tokens": 2})
        assert r.status_code == 200, r.text
    gate.set()
    wait_for(lambda: _status(srv, "z")["quantization"] in ("done", "failed"), timeout=120, what="both additions")
    y, z = _status(srv, "y"), _status(srv, "z")
    assert y["quantization"] == z["quantization"] == "done", (y, z)
    assert z["started_at"] >= y["finished_at"] and {"y", "z"} <= set(z["base_tasks"])
