"""The re-quantization worker's bounds as engine options (issue 7): ``requant_duty_cycle`` / ``requant_threads``
are validated, reach ``inlaid serve`` as flags, reach the ``Requantizer`` the engine creates, and are reported
by the adapter status."""

from __future__ import annotations

import json

import pytest

from inlaid.cli import build_parser, engine_config_from_args
from inlaid.config import EngineConfig, ModelConfig


def test_duty_cycle_and_threads_are_validated_with_clear_errors():
    assert ModelConfig().requant_duty_cycle == 0.5 and ModelConfig().requant_threads is None
    for bad in (0, -0.1, 1.01):
        with pytest.raises(ValueError, match=r"requant_duty_cycle must be in \(0, 1\]"):
            EngineConfig.from_kwargs(requant_duty_cycle=bad)
    with pytest.raises(ValueError, match="requant_threads must be >= 1"):
        EngineConfig.from_kwargs(requant_threads=0)
    cfg = EngineConfig.from_kwargs(requant_duty_cycle=1.0, requant_threads=2)
    assert (cfg.model.requant_duty_cycle, cfg.model.requant_threads) == (1.0, 2)


def test_serve_flags_set_them():
    args = build_parser().parse_args(["serve", "--requant-duty-cycle", "0.25", "--requant-threads", "1"])
    cfg = engine_config_from_args(args)
    assert (cfg.model.requant_duty_cycle, cfg.model.requant_threads) == (0.25, 1)
    args = build_parser().parse_args(["serve"])
    assert engine_config_from_args(args).model.requant_duty_cycle == 0.5
    with pytest.raises(ValueError, match="requant_duty_cycle"):
        engine_config_from_args(build_parser().parse_args(["serve", "--requant-duty-cycle", "0"]))


def test_the_engine_passes_them_to_its_requantizer_and_reports_them(tiny_llama_dir, tmp_path):
    from inlaid import LLM
    from inlaid.quant.quantize_model import quantize_model

    rows = [{"prompt": f"Translate: cat {i}", "completion": "chat " * (i % 3 + 1)} for i in range(4)]
    calib = tmp_path / "a.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    quantize_model(str(tiny_llama_dir), {}, {"a": str(calib)}, "mlgptq", 4, 32, tmp_path / "q")
    llm = LLM(model=str(tmp_path / "q"), device="cpu", num_blocks=16, requant_duty_cycle=0.75, requant_threads=1)
    assert llm.engine.requantizer is None
    from tiny import make_peft_adapter

    ad = make_peft_adapter(tiny_llama_dir, tmp_path / "c", 4, ["q_proj", "v_proj"], seed=7)
    llm.add_adapter("c", str(ad), calibration=rows)
    rq = llm.engine.requantizer
    assert (rq.duty_cycle, rq.pacer.duty, rq.num_threads) == (0.75, 0.75, 1)
    status = llm.wait_requant("c", timeout=120)
    assert status["quantization"] == "done"
    got = llm.adapter_status("c")
    assert got["duty_cycle"] == 0.75 and got["requant_threads"] == 1
    llm.shutdown()
