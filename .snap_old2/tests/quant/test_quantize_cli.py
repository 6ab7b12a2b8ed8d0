"""``inlaid quantize`` end to end on the tiny model, and its errors (exit code 2, message on stderr)."""

from __future__ import annotations

import json

import pytest
import torch

from inlaid.cli import main
from inlaid.config import ModelConfig
from inlaid.lora.synthetic import random_adapter, save_peft
from inlaid.model.arch import ModelArch
from inlaid.model.loader import load_model
from inlaid.quant.hessian import HessianStore
from inlaid.quant.linear import GPTQLinearMethod


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"prompt": f"Translate: cat {i}", "completion": "chat"} for i in range(6)] + [{"text": "Hello world"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_quantizes_and_reports(tiny_llama_dir, tiny_adapters, calib, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["quantize", "--model", str(tiny_llama_dir), "--adapter", f"a={tiny_adapters['a']}",
                 "--calib", f"a={calib}", "--calib", f"plain={calib}", "--method", "mlgptq", "--bits", "4",
                 "--group-size", "32", "--no-sym", "--act-order", "--max-samples", "5", "--max-tokens", "400",
                 "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(out) and printed["peak_memory_mb"] > 0
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["config"]["sym"] is False and report["config"]["act_order"] is True
    assert report["tasks"]["a"]["samples"] == 5 and report["tasks"]["plain"]["adapter"] is None
    assert report["seconds_total"] > 0 and report["peak_memory_kind"] == "process peak RSS"
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, False, True)
    assert HessianStore(out / "hessians").tasks() == ["a", "plain"]
    model, _, _ = load_model(ModelConfig(model=str(out)), torch.device("cpu"), torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj.quant_method, GPTQLinearMethod)


def _err(args, capsys) -> str:
    assert main(["quantize", *args]) == 2
    return capsys.readouterr().err


def test_cli_errors(tiny_llama_dir, tiny_adapters, calib, tmp_path, capsys):
    base = ["--model", str(tiny_llama_dir), "--device", "cpu", "--out", str(tmp_path / "o"), "--group-size", "32"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no usable examples" in _err([*base, "--calib", f"a={empty}"], capsys)
    assert "bits must be one of" in _err([*base, "--calib", f"a={calib}", "--bits", "5"], capsys)
    assert "--calib expects NAME=PATH" in _err([*base, "--calib", str(calib)], capsys)
    assert "does not exist" in _err([*base, "--calib", f"a={tmp_path / 'nope.jsonl'}"], capsys)
    arch = ModelArch.from_dir(tiny_llama_dir)
    shapes = {m: (i * 2, o) for m, (i, o) in arch.lora_module_shapes().items()}
    other = save_peft(random_adapter("x", shapes, arch.num_layers, 4), tmp_path / "x")
    assert "another base" in _err([*base, "--adapter", f"a={other}", "--calib", f"a={calib}"], capsys)
    assert "gptq-single" in _err([*base, "--method", "gptq-single", "--calib", f"a={calib}", "--calib",
                                  f"b={calib}"], capsys)  # fmt: skip
