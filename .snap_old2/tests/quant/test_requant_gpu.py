"""Online task addition on CUDA with CUDA graphs on (issue 7: the job hung on the GPU). Run by the lead."""

from __future__ import annotations

import time

import pytest
import torch

from inlaid import LLM
from inlaid.quant.quantize_model import quantize_model
from inlaid.sampling import SamplingParams


@pytest.mark.gpu
def test_online_addition_finishes_on_cuda_with_graphs_while_decoding(tiny_llama_dir, tiny_adapters, tmp_path,
                                                                      write_calib):
    calib = write_calib(tmp_path, ["a", "b", "c"])
    ads = {n: str(tiny_adapters[n]) for n in "abc"}
    ckpt = tmp_path / "ab"
    quantize_model(str(tiny_llama_dir), {k: ads[k] for k in "ab"}, {k: calib[k] for k in "ab"}, "mlgptq", 4, 32,
                   ckpt, device="cuda", dtype=torch.float16)
    llm = LLM(model=str(ckpt), adapters={k: ads[k] for k in "ab"}, device="cuda", dtype="float16", num_blocks=64)
    graphs = llm.engine.runner.graphs
    assert graphs is not None, "CUDA graphs must be on for this test"
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm.generate(["Hello world"] * 3, params, adapter="a")  # capture before the addition
    captured = set(graphs.graphs)
    llm.add_adapter("c", ads["c"], calibration=str(calib["c"]))
    rq, t0 = llm.engine.requantizer, time.monotonic()
    while rq.status("c")["quantization"] in ("pending", "running") and time.monotonic() - t0 < 60:
        llm.generate(["Hello world", "The cat"] * 2, params, adapter="a")  # decode steps: replays and recaptures
    st = rq.status("c")
    assert st["quantization"] == "done", st
    assert st["layers_swapped"] == st["num_layers"]
    # swaps copy into the captured buffers: the graphs from before the addition are still the ones replayed
    assert captured and captured <= set(graphs.graphs), (captured, set(graphs.graphs))
    out = llm.generate(["Hello world"], params, adapter="c")
    assert len(out[0].token_ids) == 8
