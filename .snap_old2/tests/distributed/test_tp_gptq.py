"""LLM(tensor_parallel_size=2) on an RTN GPTQ 4-bit checkpoint: greedy outputs equal TP=1 with mixed adapters;
then a killed worker makes the engine raise TPWorkerError quickly (and keep raising), never hang."""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load_file
from tp_helpers import PROMPTS, generate_tp as _generate

from inlaid import SamplingParams
from inlaid.distributed import TPWorkerError
from inlaid.quant.pack import quantization_config, save_quantized_checkpoint
from inlaid.quant.quantize_model import copy_side_files, quantize_weights


@pytest.fixture(scope="module")
def adapters(tiny_adapters):
    return {n: str(p) for n, p in tiny_adapters.items()}


@pytest.fixture(scope="module")
def gptq_dir(tiny_llama_dir, tmp_path_factory):
    """A 4-bit g32 RTN checkpoint of the tiny model (standard GPTQ layout)."""
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    packed = quantize_weights(state, None, None, "rtn", 4, 32, sym=False)
    other = {k: v for k, v in state.items() if not any(k.startswith(q + ".") for q in packed)}
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    out = tmp_path_factory.mktemp("gptq") / "q4"
    save_quantized_checkpoint(out, packed, quantization_config(4, 32, False, False, False), other, config)
    copy_side_files(tiny_llama_dir, out)
    return out


def test_tp2_gptq_greedy_equals_tp1_then_dead_worker_raises(gptq_dir, adapters):
    ref, _ = _generate(str(gptq_dir), adapters, 1)
    got, llm = _generate(str(gptq_dir), adapters, 2)
    try:
        assert got == ref
        qw = llm.engine.parts.model.model.layers[0].self_attn.o_proj.qweight
        assert qw.shape[0] * 8 == 32  # o_proj K=64 split over 2 ranks: this rank holds 32 packed rows
        worker = llm.engine.parts.tp_group.procs[0]
        worker.kill()
        worker.join(10)
        t0 = time.monotonic()
        with pytest.raises(TPWorkerError, match="rank 1"):
            llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.0))
        assert time.monotonic() - t0 < 20
        with pytest.raises(TPWorkerError):  # the engine stays failed, never hangs
            llm.engine.step()
    finally:
        llm.shutdown()
