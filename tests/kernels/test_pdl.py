"""Programmatic dependent launch switch (``inlaid.kernels._triton``): ``INLAID_PDL`` and where it applies.

On CPU: the mode read at import (default 1, 0 turns it off, read in a fresh interpreter per value) and no PDL for
CPU tensors. The ``gpu`` test: on a Hopper GPU the launch options ask for it, and a CUDA-graphed chain of the
decode-step kernels (RMSNorm -> W4 GEMV -> RMSNorm) under PDL gives the bits of the same chain without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from inlaid.kernels import _triton


@pytest.mark.parametrize("env,mode", [(None, 1), ("0", 0), ("2", 2)])
def test_mode_comes_from_the_environment(env: str | None, mode: int) -> None:
    envs = {k: v for k, v in os.environ.items() if k != "INLAID_PDL"}
    if env is not None:
        envs["INLAID_PDL"] = env
    out = subprocess.run([sys.executable, "-c", "from inlaid.kernels import _triton; print(_triton.PDL_MODE)"],
                         capture_output=True, text=True, env=envs, check=True)
    assert int(out.stdout.strip()) == mode


def test_no_pdl_off_cuda() -> None:
    assert _triton.pdl_options(torch.zeros(2)) == {"PDL": 0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_chain_under_pdl_matches_without(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    from inlaid.bench.w4_inputs import random_w4
    from inlaid.kernels import w4_layout
    from inlaid.kernels.rms_norm import rms_norm_triton
    from inlaid.kernels.w4a16_tcl import TclConfig, w4a16_tcl

    torch.manual_seed(0)
    ws = [w4_layout.prepare_w4(w["qweight"], w["qzeros"], w["scales"], None, 128, layout="tc")
          for w in (random_w4(4096, 4096) for _ in range(4))]
    g = torch.Generator(device="cuda").manual_seed(0)
    norm_w = torch.rand(4096, generator=g, device="cuda").half() + 0.5
    x = torch.randn(1, 4096, generator=g, device="cuda").half()
    one = TclConfig(16, 128, 4, 1, 0.01)  # one K split: no atomics, so the sums are deterministic

    def chain() -> torch.Tensor:
        h, res = x, torch.zeros_like(x)
        for w in ws:  # each GEMV reads the norm's output, each norm the GEMV's: every boundary is a dependency
            h, res = rms_norm_triton(h, norm_w, 1e-5, res)
            h = w4a16_tcl(h, w, config=one)
        return h

    results = []
    for mode in (0, 1):
        monkeypatch.setattr(_triton, "PDL_MODE", mode)
        assert ("launch_pdl" in _triton.pdl_options(x)) == (mode == 1)
        graph, out = torch.cuda.CUDAGraph(), None
        chain()  # compile outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = chain()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        results.append(out.clone())
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
