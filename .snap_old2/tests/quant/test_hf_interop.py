"""transformers' GPTQ integration loads a checkpoint we write and computes the same logits.

Needs ``optimum`` and ``gptqmodel`` (transformers' GPTQ backend); skipped where they are
not installed (the default environment). Checked by hand with optimum 2.3.0 and
gptqmodel 7.7.0 (torch backend, CPU): max |Δlogit| 0.008 on logits of scale 5 (fp16 compute).
"""

from __future__ import annotations

import json

import pytest
import torch

from inlaid.quant import pack, quantization_config, rtn_quantize, save_quantized_checkpoint

pytest.importorskip("optimum")
pytest.importorskip("gptqmodel")


@pytest.mark.slow
def test_transformers_loads_our_checkpoint(tmp_path, tiny_llama_dir, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, GPTQConfig

    monkeypatch.setattr(torch._dynamo.config, "disable", True)  # gptqmodel's compile step is slow on CPU
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    sd = model.state_dict()
    layers, other = {}, {}
    for key, value in list(sd.items()):
        if key.endswith("_proj.weight") and ".layers." in key:
            res = rtn_quantize(value, 4, 32, sym=False)
            layers[key[: -len(".weight")]] = pack(res)
            sd[key] = res.weight
        else:
            other[key] = value.half()
    out = save_quantized_checkpoint(
        tmp_path / "q", layers, quantization_config(4, 32, False, False, False), other, cfg
    )
    model.load_state_dict(sd)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    ref = model(ids).logits
    q = AutoModelForCausalLM.from_pretrained(
        out, device_map="cpu", dtype=torch.float16, quantization_config=GPTQConfig(bits=4, backend="torch")
    )
    got = q(ids).logits.float()
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())
