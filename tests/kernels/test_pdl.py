"""Programmatic dependent launch switch (``inlaid.kernels._triton``): ``INLAID_PDL`` and where it applies.

On CPU: the setting read at import (default ``auto``, 0/1/2 fixed, anything else refused; read in a fresh
interpreter per value), the ``auto`` mode picked by the enclosing ``decode_batch`` (and not leaking into another
thread), the ModelRunner's eager decode forward running inside ``decode_batch`` of its batch, and no PDL for CPU
tensors. The ``gpu`` test: on a Hopper GPU the launch options ask for it, and a CUDA-graphed chain of the
decode-step kernels (RMSNorm -> W4 GEMV -> RMSNorm) under modes 1 and 2 gives the bits of the same chain without
PDL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from inlaid.kernels import _triton


def _import_mode(env: str | None) -> subprocess.CompletedProcess:
    envs = {k: v for k, v in os.environ.items() if k != "INLAID_PDL"}
    if env is not None:
        envs["INLAID_PDL"] = env
    return subprocess.run([sys.executable, "-c", "from inlaid.kernels import _triton; print(_triton.PDL_MODE)"],
                          capture_output=True, text=True, env=envs, check=False)


@pytest.mark.parametrize("env,mode", [(None, "None"), ("auto", "None"), (" AUTO ", "None"), ("0", "0"), ("1", "1"),
                                      ("2", "2")])
def test_setting_comes_from_the_environment(env: str | None, mode: str) -> None:
    out = _import_mode(env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == mode


def test_a_bad_setting_is_refused_with_the_accepted_values() -> None:
    out = _import_mode("3")
    assert out.returncode != 0 and "INLAID_PDL must be auto, 0, 1 or 2, got '3'" in out.stderr


def test_auto_mode_lets_the_next_kernel_launch_early_only_in_small_decode_batches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton, "PDL_MODE", None)
    small, large = _triton.PDL_EARLY_MAX_BATCH, _triton.PDL_EARLY_MAX_BATCH + 1
    assert _triton.pdl_mode() == 1  # outside a decode step (prefill, benchmarks)
    with _triton.decode_batch(small):
        assert _triton.pdl_mode() == 2
        with _triton.decode_batch(large):
            assert _triton.pdl_mode() == 1
        assert _triton.pdl_mode() == 2
        seen = []
        worker = threading.Thread(target=lambda: seen.append(_triton.pdl_mode()))  # e.g. the requant worker
        worker.start()
        worker.join()
        assert seen == [1]
    assert _triton.pdl_mode() == 1
    for fixed in (0, 1, 2):
        monkeypatch.setattr(_triton, "PDL_MODE", fixed)
        with _triton.decode_batch(small):
            assert _triton.pdl_mode() == fixed
        with _triton.decode_batch(large):
            assert _triton.pdl_mode() == fixed


def test_no_pdl_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    for fixed in (None, 1, 2):
        monkeypatch.setattr(_triton, "PDL_MODE", fixed)
        with _triton.decode_batch(1):
            assert _triton.pdl_options(torch.zeros(2)) == {"PDL": 0}


def test_the_runner_runs_eager_decode_steps_inside_their_batch(tiny_llama_dir,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from inlaid.core.outputs import ScheduledSeq, SchedulerOutput
    from inlaid.lora.pool import LoRAPool
    from inlaid.model.arch import ModelArch
    from inlaid.model.loader import build_model, init_dummy_weights
    from inlaid.sampling import SamplingParams
    from inlaid.worker.forward_batch import build_forward_batch
    from inlaid.worker.model_runner import ModelRunner

    monkeypatch.setattr(_triton, "PDL_MODE", None)
    dev, dtype = torch.device("cpu"), torch.float32
    arch = ModelArch.from_dir(tiny_llama_dir)
    model = build_model(arch, dev, dtype)
    init_dummy_weights(model, seed=1)
    runner = ModelRunner(model, arch, LoRAPool(1, 8, arch.num_layers, arch.lora_module_shapes(), dev, dtype),
                         lambda name: None, 16, 4, dev, dtype, cuda_graphs=False, max_seq_len=64)
    modes = []

    def spy(batch, kv):
        modes.append((batch.num_seqs, batch.is_decode_only, _triton.pdl_mode()))
        return model(batch, kv)

    runner.model = spy
    params = SamplingParams(max_tokens=4, temperature=0.0)
    steps = [[ScheduledSeq("p", [5, 6, 7], 0, [0], -1, True, params)],  # prefill of 3 tokens: not a decode step
             [ScheduledSeq("d", [8], 4, [0, 1], -1, True, params)],
             [ScheduledSeq(f"d{i}", [8], 4, [2 * i, 2 * i + 1], -1, True, params) for i in range(2)]]
    for seqs in steps:
        runner._forward(build_forward_batch(SchedulerOutput(scheduled=seqs), 4, dev))
    assert modes == [(1, False, 1), (1, True, 2 if _triton.PDL_EARLY_MAX_BATCH >= 1 else 1),
                     (2, True, 2 if _triton.PDL_EARLY_MAX_BATCH >= 2 else 1)]


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
    for mode in (0, 1, 2):
        monkeypatch.setattr(_triton, "PDL_MODE", mode)
        assert ("launch_pdl" in _triton.pdl_options(x)) == (mode >= 1)
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
    for under_pdl in results[1:]:
        torch.testing.assert_close(under_pdl, results[0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_are_captured_inside_their_size(tiny_llama_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``auto`` mode is baked into each graph by its padded size, whichever batch triggered the capture."""
    from inlaid.core.outputs import ScheduledSeq, SchedulerOutput
    from inlaid.kernels.paged_attention import allocate_kv_caches
    from inlaid.model.arch import ModelArch
    from inlaid.model.loader import build_model, init_dummy_weights
    from inlaid.sampling import SamplingParams
    from inlaid.worker.cuda_graphs import CudaGraphRunner
    from inlaid.worker.forward_batch import build_forward_batch

    monkeypatch.setattr(_triton, "PDL_MODE", None)
    dev, dtype = torch.device("cuda"), torch.float16
    arch = ModelArch.from_dir(tiny_llama_dir)
    model = build_model(arch, dev, dtype)
    init_dummy_weights(model, seed=1)
    kv = allocate_kv_caches(arch.num_layers, 17, 4, arch.num_kv_heads, arch.head_dim, dtype, dev)
    modes: dict[int, set[int]] = {}

    def spy(batch, caches):
        modes.setdefault(batch.num_seqs, set()).add(_triton.pdl_mode())
        return model(batch, caches)

    runner = CudaGraphRunner(spy, kv, 4, 4, 16, dev, (1, 2, 4))
    params = SamplingParams(max_tokens=4, temperature=0.0)
    with torch.inference_mode():
        for n in (1, 3):  # 3 sequences replay the size-4 graph
            seqs = [ScheduledSeq(f"d{i}", [8], 4, [2 * i, 2 * i + 1], -1, True, params) for i in range(n)]
            out = runner.run(build_forward_batch(SchedulerOutput(scheduled=seqs), 4, dev))
            assert out.shape[0] == n and torch.isfinite(out).all()
    mode = lambda size: 2 if size <= _triton.PDL_EARLY_MAX_BATCH else 1
    assert modes == {1: {mode(1)}, 4: {mode(4)}}
